"""The benchmarks' assets, built once under a work folder: the model folder (the built-in character Llama,
or a Llama with a byte-level BPE trained on GSM8K), its tokenizer, the pairs file, and the order in
which miopt's loop visits the pairs (``bench_vs_trl.py``, ``memory_floor.py``, ``gpu_throughput.py``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


@dataclass
class Config:
    name: str
    batch_size: int
    steps: int  # measured steps
    warmup: int  # steps discarded before measuring
    max_length: int
    objective: str = "dpo"
    beta: float = 0.1
    learning_rate: float = 1e-4
    seed: int = 0
    model: dict = field(default_factory=dict)


CONFIGS = {
    # The built-in model of docs/calibration.md (hidden 128, 4 layers, vocab 100) on the arithmetic task.
    "tiny": Config("tiny", batch_size=8, steps=50, warmup=5, max_length=128, model={"hidden_size": 128, "num_layers": 4, "num_heads": 4}),
    # hidden 512, 8 layers, FFN 2048, 32k byte-level BPE trained here on GSM8K train; GSM8K pairs <= 512 tokens.
    "mid": Config("mid", batch_size=8, steps=6, warmup=1, max_length=512, model={"hidden_size": 512, "num_layers": 8, "num_heads": 8, "vocab_size": 32000}),
}  # fmt: skip


def training_order(num_pairs: int, spec: dict) -> list[int]:
    """The pair indices in the order miopt's loop visits them (its seeded data order)."""
    from miopt.run.data_order import DataOrder

    order = DataOrder(num_pairs, spec["batch_size"], spec["seed"], 0, 1)
    return [i for step in range(num_pairs // spec["batch_size"]) for i in order.micro_batch(step)]


def build_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (digits merged like any text), with pad/bos/eos/unk
    specials and no BOS added."""
    from miopt.experiments.gsm8k_model import train_tokenizer

    return train_tokenizer(texts, vocab_size, split_digits=False)


def tiny_pairs(count: int, seed: int) -> list[dict]:
    import random

    from miopt.tasks import arithmetic

    problems, _ = arithmetic.generate_splits(count, 0, seed=seed)
    rng = random.Random(seed)
    return [
        {"prompt": p.prompt, "chosen": p.solution, "rejected": arithmetic.wrong_solution(p, rng)}
        for p in problems
    ]


def gsm8k_pairs(work: Path, tokenizer, max_length: int) -> list[dict]:
    """``miopt data gsm8k-pairs`` train pairs, first rejected response of each (TRL takes one), kept when
    prompt + each response fits ``max_length`` tokens with the EOS (so neither side truncates)."""
    from miopt.cli import main

    folder = work / "gsm8k-pairs"
    if not (folder / "pairs_train.jsonl").is_file():
        code = main(
            [
                "data",
                "gsm8k-pairs",
                "--input",
                str(GSM8K / "example_model_solutions.jsonl"),
                "--output-dir",
                str(folder),
            ]
        )
        assert code == 0
    pairs = []
    for line in (folder / "pairs_train.jsonl").read_text().splitlines():
        row = json.loads(line)
        rejected = row["rejected"][0] if isinstance(row["rejected"], list) else row["rejected"]
        pair = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": rejected}
        prompt = len(tokenizer(pair["prompt"])["input_ids"])
        longest = max(len(tokenizer(pair[k])["input_ids"]) for k in ("chosen", "rejected")) + 1
        if prompt + longest <= max_length:
            pairs.append(pair)
    return pairs


def prepare(config: Config, work: Path) -> tuple[Path, Path]:
    """The model folder (weights + tokenizer) and pairs file of ``config``, built once."""
    from miopt.model.builtin import build_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    model_dir, pairs_file = work / "model", work / "pairs.jsonl"
    count = config.batch_size * (config.steps + config.warmup)
    stamp = work / "assets.json"
    wanted = {"config": asdict(config), "pairs": count, "version": 3}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return model_dir, pairs_file
    if config.name == "tiny":
        tokenizer = build_tokenizer()
        pairs = tiny_pairs(count, config.seed)
    else:
        texts = []
        for line in (GSM8K / "train.jsonl").read_text().splitlines():
            record = json.loads(line)
            texts += [record["question"], record["answer"]]
        tokenizer = build_bpe_tokenizer(texts, config.model["vocab_size"])
        pairs = gsm8k_pairs(work, tokenizer, config.max_length)
        import random

        random.Random(config.seed).shuffle(pairs)
        pairs = pairs[:count]
        assert len(pairs) == count, f"only {len(pairs)} GSM8K pairs fit {config.max_length} tokens"
    save_model_and_pairs(config, tokenizer, pairs, model_dir, pairs_file)
    stamp.write_text(json.dumps(wanted))
    return model_dir, pairs_file


def save_model_and_pairs(
    config: Config, tokenizer, pairs: list[dict], model_dir: Path, pairs_file: Path
) -> int:
    """The built-in Llama of ``config.model`` for ``tokenizer`` (float32), saved with the tokenizer into
    ``model_dir``, and ``pairs`` into ``pairs_file``; returns its parameter count.

    A ``vocab_size`` above the tokenizer's pads the embedding and head with rows no token uses (a BPE
    trained on a small corpus stops short of the size asked for), so their cost is that of the full
    vocabulary."""
    import torch

    from miopt.model.builtin import build_model

    model = build_model(
        tokenizer,
        hidden_size=config.model["hidden_size"],
        num_layers=config.model["num_layers"],
        num_heads=config.model["num_heads"],
        max_positions=max(512, config.max_length),
        seed=config.seed,
    )
    if config.model.get("vocab_size", len(tokenizer)) > len(tokenizer):
        with torch.random.fork_rng(devices=[]):  # the new rows' random values, seeded too
            torch.manual_seed(config.seed)
            model.resize_token_embeddings(config.model["vocab_size"], mean_resizing=False)
    model.to(torch.float32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return sum(p.numel() for p in model.parameters())

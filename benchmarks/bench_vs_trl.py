"""miopt against TRL's DPOTrainer, side by side: pairs per second, tokens per second, peak memory.

    python benchmarks/bench_vs_trl.py --config tiny            # built-in char model, synthetic arithmetic pairs
    python benchmarks/bench_vs_trl.py --config mid             # hidden 512 x 8 layers, 32k BPE, GSM8K pairs
    python benchmarks/bench_vs_trl.py --config tiny --repeats 3 --threads 1 --variants padded
    python benchmarks/bench_vs_trl.py --config mid --modifier use_weighting=true   # TRL's modifiers on both sides

Both sides train the same saved model folder on the same pairs (one rejected response each: TRL's
format), batch size, max length, optimizer (AdamW, constant learning rate, clipping at 1.0) and
objective (miopt ``dpo`` = TRL ``sigmoid``, miopt ``mio`` = TRL ``nca_pair``), each with its best
reference handling: reference log-probs precomputed before training (TRL
``precompute_ref_log_probs=True``; miopt's ``compute_reference_logps``), not timed as steps. TRL reads
the pairs in the order miopt's data order visits them (``train_sampling_strategy="sequential"``), so
step ``i`` is the same batch on both sides and the logged losses must agree (checked).

Each side runs in its own subprocess (peak RSS of one library is not polluted by the other), one after
the other (alternating which goes first per repeat), with the same torch thread count. Per side:
median step time after warm-up -> pairs/s; tokens/s (prompt + response tokens of every sequence, the
same count for both sides); peak RSS (``VmHWM``, or peak CUDA memory on a GPU); FLOP/s as a fraction of
a dense fp32 matmul measured in the same subprocess: *executed* FLOPs (what the side actually computes:
TRL's padded rows and its log-prob head over every position; miopt's packed rows and head over the
distinct response tokens) and *useful* FLOPs (each sequence alone, causal, no padding: the same for both
sides, so its ratio is the speed ratio). Everything printed is also written as JSON (``--json``).

Assets (model folder, tokenizer, pairs file) are built once under ``--work-dir`` and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

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
TRL_LOSS = {"dpo": "sigmoid", "mio": "nca_pair"}
# --modifier choices: TRL's DPOConfig keyword and value (miopt's objective option of the same name).
MODIFIERS = {"use_weighting=true": ("use_weighting", True), "ld_alpha=0.5": ("ld_alpha", 0.5)}


# ----------------------------------------------------------------------------------------------- assets


def build_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, with pad/bos/eos/unk specials and no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from miopt.builtin import SPECIAL_TOKENS

    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.padding_side = "right"
    return tokenizer


def _tiny_pairs(count: int, seed: int) -> list[dict]:
    import random

    from miopt.tasks import arithmetic

    problems, _ = arithmetic.generate_splits(count, 0, seed=seed)
    rng = random.Random(seed)
    return [
        {"prompt": p.prompt, "chosen": p.solution, "rejected": arithmetic.wrong_solution(p, rng)}
        for p in problems
    ]


def _gsm8k_pairs(work: Path, tokenizer, max_length: int) -> list[dict]:
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
    import torch

    from miopt.builtin import build_model, build_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    model_dir, pairs_file = work / "model", work / "pairs.jsonl"
    count = config.batch_size * (config.steps + config.warmup)
    stamp = work / "assets.json"
    wanted = {"config": asdict(config), "pairs": count, "version": 3}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return model_dir, pairs_file
    if config.name == "tiny":
        tokenizer = build_tokenizer()
        pairs = _tiny_pairs(count, config.seed)
    else:
        texts = []
        for line in (GSM8K / "train.jsonl").read_text().splitlines():
            record = json.loads(line)
            texts += [record["question"], record["answer"]]
        tokenizer = build_bpe_tokenizer(texts, config.model["vocab_size"])
        pairs = _gsm8k_pairs(work, tokenizer, config.max_length)
        import random

        random.Random(config.seed).shuffle(pairs)
        pairs = pairs[:count]
        assert len(pairs) == count, f"only {len(pairs)} GSM8K pairs fit {config.max_length} tokens"
    model = build_model(
        tokenizer,
        hidden_size=config.model["hidden_size"],
        num_layers=config.model["num_layers"],
        num_heads=config.model["num_heads"],
        max_positions=max(512, config.max_length),
        seed=config.seed,
    )
    if config.model.get("vocab_size", len(tokenizer)) > len(tokenizer):
        # the BPE trainer stops short of the requested size on GSM8K alone (~25.6k merges): the head is
        # padded to the nominal vocabulary (rows no token uses), so its cost is that of a ~32k vocabulary
        model.resize_token_embeddings(config.model["vocab_size"], mean_resizing=False)
    model.to(torch.float32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    stamp.write_text(json.dumps(wanted))
    return model_dir, pairs_file


# ------------------------------------------------------------------------------------------ one side


def _rss_mb(field_name: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 1024, repeats: int = 7, bf16: bool = False) -> float:
    """Dense matmul throughput of this process (median of ``repeats``), GFLOP/s: fp32, or bf16 when
    both sides train in bf16 mixed precision (their matmuls then run in bf16). On a GPU (where the
    sides train) the matmul runs there, at n = 8192 so that it reaches the device's rate."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    cuda = torch.cuda.is_available()
    n = 8192 if cuda else n
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def training_order(num_pairs: int, spec: dict) -> list[int]:
    """The pair indices in the order miopt's loop visits them (its seeded data order)."""
    from miopt.loop import DataOrder

    order = DataOrder(num_pairs, spec["batch_size"], spec["seed"], 0, 1)
    return [i for step in range(num_pairs // spec["batch_size"]) for i in order.micro_batch(step)]


def _ids_digest(rows) -> str:
    return hashlib.sha256(json.dumps([list(map(list, r)) for r in rows]).encode()).hexdigest()[:16]


def side_trl(spec: dict) -> dict:
    import warnings

    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (in the import floor, as on miopt's side)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    imported = _rss_mb()
    pairs = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines()]
    ordered = [pairs[i] for i in training_order(len(pairs), spec)]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    floor = _rss_mb()
    events: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                events.append((time.perf_counter(), float(logs["loss"])))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(
            output_dir=spec["tmp"],
            report_to="none",
            beta=spec["beta"],
            loss_type=[TRL_LOSS[spec["objective"]]],
            **spec.get("modifiers", {}),
            max_length=spec["max_length"],
            per_device_train_batch_size=spec["batch_size"],
            max_steps=len(ordered) // spec["batch_size"],
            learning_rate=spec["learning_rate"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            disable_dropout=True,
            bf16=spec["bf16"],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            train_sampling_strategy="sequential",
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=spec["batch_size"],
            seed=spec["seed"],
        )
        setup = time.perf_counter()
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=Dataset.from_list(ordered),
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        trainer.remove_callback(PrinterCallback)  # no per-step printing (miopt's side prints nothing either)
        setup = time.perf_counter() - setup
        rows = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
        start = time.perf_counter()
        trainer.train()
    return {
        "ids": _ids_digest(rows),
        "train_start": start,
        "setup_seconds": setup,
        "events": events,
        "rss_floor_mb": floor,
        "rss_imports_mb": imported,
    }


def side_miopt(spec: dict) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (in the import floor, as on TRL's side)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miopt import objectives
    from miopt.data.records import PreferenceRecord
    from miopt.data.tokenize import tokenize_preferences
    from miopt.logprobs import DEFAULT_CHUNK_TOKENS
    from miopt.loop import LoopOptions, make_accelerator, run_loop
    from miopt.reference import compute_reference_logps
    from miopt.train import PreferenceData, make_step_function

    imported = _rss_mb()
    pairs = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines()]
    records = [
        PreferenceRecord(p["prompt"], p["chosen"], (p["rejected"],), f"pairs:{i}")
        for i, p in enumerate(pairs)
    ]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    floor = _rss_mb()
    setup = time.perf_counter()
    examples, report = tokenize_preferences(records, tokenizer, max_length=spec["max_length"])
    assert report.truncated == 0 and report.skipped == 0, report.describe()
    pad = tokenizer.pad_token_id
    accelerator = make_accelerator(spec["bf16"])
    model.to(accelerator.device)  # the reference pass on the training device, as TRL's precomputation
    reference = compute_reference_logps(
        model,
        examples,
        pad,
        batch_size=spec["batch_size"],
        chunk_tokens=DEFAULT_CHUNK_TOKENS,
        progress=False,
        autocast=accelerator.autocast,
        packing=spec["packing"],
    )
    modifiers = spec.get("modifiers", {})
    step = make_step_function(
        objectives.build(spec["objective"], modifiers),
        PreferenceData(examples, reference),
        beta=spec["beta"],
        pad_token_id=pad,
        chunk_tokens=DEFAULT_CHUNK_TOKENS,
        packing=spec["packing"],
        ld_alpha=modifiers.get("ld_alpha"),
        use_weighting=modifiers.get("use_weighting", False),
    )
    setup = time.perf_counter() - setup
    options = LoopOptions(
        output_dir=spec["tmp"],
        max_steps=len(examples) // spec["batch_size"],
        batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        lr_scheduler="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        logging_steps=1,
        progress=False,
        bf16=spec["bf16"],
    )
    events: list[tuple[float, float]] = []
    start = time.perf_counter()
    run_loop(
        options,
        model=model,
        num_examples=len(examples),
        step_fn=step,
        accelerator=accelerator,
        on_log=lambda record: events.append((time.perf_counter(), record["loss"])),
    )
    order = training_order(len(examples), spec)
    rows = [(examples[i].prompt_ids, examples[i].chosen_ids, examples[i].rejected_ids[0]) for i in order]
    return {
        "ids": _ids_digest(rows),
        "train_start": start,
        "setup_seconds": setup,
        "events": events,
        "rss_floor_mb": floor,
        "rss_imports_mb": imported,
    }


def run_side(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    before = matmul_gflops(bf16=spec["bf16"])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak of the side, not of the matmul's operands
    result = side_trl(spec) if spec["side"] == "trl" else side_miopt(spec)
    peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    after = matmul_gflops(bf16=spec["bf16"])
    result.update(
        matmul_gflops=(before + after) / 2,
        matmul_gflops_before_after=(before, after),
        peak_rss_mb=_rss_mb("VmHWM"),
        peak_cuda_mb=peak_cuda_mb,
        threads=torch.get_num_threads(),
    )
    return result


# ------------------------------------------------------------------------------------- accounting


def batch_accounting(
    config: Config,
    model_dir: Path,
    pairs_file: Path,
    packing: str,
    attention: str = "sdpa",
    bf16: bool = False,
) -> list[dict]:
    """Per step: sequence tokens and FLOPs (useful; executed by TRL's padded batch; by miopt's layout,
    with its lengths rounded to SHAPE_MULTIPLE in bf16 on CPU, as ``miopt.packing.rounds_shapes`` does)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from miopt.data.records import PreferenceRecord
    from miopt.data.tokenize import collate, tokenize_preferences
    from miopt.packing import SHAPE_MULTIPLE, make_batch, round_up

    model_config = AutoConfig.from_pretrained(model_dir)
    # what make_batch looks at: the attention implementation a model loaded from this folder gets (sdpa
    # by default), and a forward that passes keyword arguments on (transformers 5)
    model = SimpleNamespace(
        config=SimpleNamespace(_attn_implementation=attention), forward=lambda *args, **kwargs: None
    )
    multiple = SHAPE_MULTIPLE if bf16 and not torch.cuda.is_available() else 1
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    records = [
        PreferenceRecord(p["prompt"], p["chosen"], (p["rejected"],), str(i)) for i, p in enumerate(pairs)
    ]
    examples, _ = tokenize_preferences(records, tokenizer, max_length=config.max_length)
    h, v, layers = model_config.hidden_size, model_config.vocab_size, model_config.num_hidden_layers
    kv = h * model_config.num_key_value_heads // model_config.num_attention_heads
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * model_config.intermediate_size)

    # fwd + bwd: 6 per weight per token; attention scores and values: 4 * h per (query, key) pair, x3;
    # the log-prob head: forward, recomputed forward, 2 backward matmuls (both libraries checkpoint it).
    def trunk(tokens: int, pairs_qk: int) -> float:
        return 6 * linear * tokens + 12 * layers * h * pairs_qk

    head = 8 * h * v
    order = training_order(len(examples), {"batch_size": config.batch_size, "seed": config.seed})
    steps = []
    for s in range(len(order) // config.batch_size):
        batch = [examples[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size]]
        lengths = [len(e.prompt_ids) + len(r) for e in batch for r in (e.chosen_ids, *e.rejected_ids)]
        responses = [len(r) for e in batch for r in (e.chosen_ids, *e.rejected_ids)]
        padded = collate(batch, tokenizer.pad_token_id)
        rows, width = padded.input_ids.shape
        layout = make_batch(batch, tokenizer.pad_token_id, packing, model)
        if packing == "padded":
            ours = trunk(rows * width, rows * width**2) + head * int(padded.response_mask[:, 1:].sum())
            positions = rows * width
        else:
            r, c = layout.input_ids.shape
            c = round_up(c, multiple)
            if layout.attention_blocks is not None:  # one row; attention within each unit only
                pairs_qk = sum(round_up(b - a, multiple) ** 2 for a, b, _ in layout.attention_blocks)
            else:
                pairs_qk = r * c * c
            scored = round_up(layout.targets.numel(), multiple)
            ours = trunk(r * c, pairs_qk) + head * scored + 2 * h * v * r
            positions = r * c
        steps.append(
            {
                "pairs": len(batch),
                "tokens": sum(lengths),
                "useful_flops": trunk(sum(lengths), sum(n * (n + 1) // 2 for n in lengths))
                + head * sum(responses),
                "trl_flops": trunk(rows * width, rows * width**2) + head * rows * (width - 1),
                "trl_positions": rows * width,
                "miopt_flops": ours,
                "miopt_positions": positions,
            }
        )
    return steps


def summarise(result: dict, steps: list[dict], warmup: int, side: str) -> dict:
    times = [result["events"][0][0] - result["train_start"]]
    times += [b[0] - a[0] for a, b in zip(result["events"], result["events"][1:])]
    measured = list(zip(times, steps))[warmup:]
    peak = result["matmul_gflops"] * 1e9
    key = "trl" if side == "trl" else "miopt"
    median = statistics.median

    return {
        "step_seconds": median(t for t, _ in measured),
        "pairs_per_second": median(s["pairs"] / t for t, s in measured),
        "tokens_per_second": median(s["tokens"] / t for t, s in measured),
        "positions_per_step": median(s[f"{key}_positions"] for _, s in measured),
        "executed_flops_fraction": median(s[f"{key}_flops"] / t for t, s in measured) / peak,
        "useful_flops_fraction": median(s["useful_flops"] / t for t, s in measured) / peak,
        "executed_gflops": median(s[f"{key}_flops"] / t for t, s in measured) / 1e9,
        "matmul_gflops": result["matmul_gflops"],
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_floor_mb": result["rss_floor_mb"],
        "rss_imports_mb": result["rss_imports_mb"],
        "rss_above_imports_mb": result["peak_rss_mb"] - result["rss_imports_mb"],
        "peak_cuda_mb": result["peak_cuda_mb"],
        "setup_seconds": result["setup_seconds"],
        "losses": [loss for _, loss in result["events"]],
        "ids": result["ids"],
        "threads": result["threads"],
    }


# ------------------------------------------------------------------------------------------- driver


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _spawn(spec: dict, work: Path) -> dict:
    out = work / f"result-{spec['label']}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    command = [sys.executable, __file__, "--side-spec", json.dumps(spec), "--side-out", str(out)]
    subprocess.run(command, check=True, env=env, cwd=work)
    return json.loads(out.read_text())


def _versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "deepspeed": _deepspeed_version(),
    }


def _deepspeed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny")
    parser.add_argument(
        "--repeats", type=int, default=1, help="Runs of each side (alternating which goes first)."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side.")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Measured steps (after --warmup).")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--objective", choices=list(TRL_LOSS), default="dpo")
    parser.add_argument(
        "--modifier",
        action="append",
        default=[],
        choices=[*MODIFIERS],
        metavar="|".join(MODIFIERS),
        help="TRL's DPO modifier on both sides (TRL's DPOConfig name and value), repeatable.",
    )
    parser.add_argument(
        "--packing", default="shared-prompt", help="miopt's layout (shared-prompt, packed, padded)."
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision on both sides (TRL bf16=True, miopt --bf16).",
    )
    parser.add_argument("--variants", default="", help="Extra miopt layouts to time too, comma-separated.")
    parser.add_argument("--work-dir", default=None, help="Assets and results (default runs/bench/CONFIG).")
    parser.add_argument(
        "--json", default=None, help="Write every figure here (default WORK_DIR/report.json)."
    )
    parser.add_argument("--side-spec", help=argparse.SUPPRESS)
    parser.add_argument("--side-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side_spec:
        spec = json.loads(args.side_spec)
        Path(args.side_out).write_text(json.dumps(run_side(spec)))
        return 0

    base = CONFIGS[args.config]
    config = Config(
        **{
            **asdict(base),
            "batch_size": args.batch_size or base.batch_size,
            "steps": args.steps or base.steps,
            "warmup": base.warmup if args.warmup is None else args.warmup,
            "objective": args.objective,
        }
    )
    work = Path(args.work_dir or ROOT / "runs" / "bench" / config.name).resolve()
    model_dir, pairs_file = prepare(config, work)
    layouts = [args.packing] + [v for v in args.variants.split(",") if v and v != args.packing]
    accounting = {
        layout: batch_accounting(config, model_dir, pairs_file, layout, bf16=args.bf16) for layout in layouts
    }
    common = {
        "model": str(model_dir),
        "pairs": str(pairs_file),
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "objective": config.objective,
        "beta": config.beta,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "threads": args.threads,
        "bf16": args.bf16,
        "modifiers": dict(MODIFIERS[m] for m in args.modifier),
    }
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"{config.name}: {asdict(config)}\nload average before: {_load()}", flush=True)
    if _deepspeed_version():
        print(
            "warning: deepspeed is installed; TRL's trainer imports it (miopt does not unless launched with "
            "it), which adds to TRL's peak RSS: uninstall it for a fair memory comparison",
            flush=True,
        )
    runs = []
    for repeat in range(args.repeats):
        sides = ["trl", *[f"miopt:{layout}" for layout in layouts]]
        if repeat % 2:
            sides = sides[::-1]
        figures = {"load_before": _load()}
        for side in sides:
            name, _, layout = side.partition(":")
            spec = {**common, "side": name, "packing": layout or "padded", "label": side.replace(":", "-")}
            spec["tmp"] = str(work / "tmp" / spec["label"])
            raw = _spawn(spec, work)
            figures[side] = summarise(raw, accounting[layout or args.packing], config.warmup, name)
            print(f"  repeat {repeat}: {side}: {_line(figures[side])}  (load {_load()})", flush=True)
        figures["load_after"] = _load()
        runs.append(figures)
    report = _report(config, args, layouts, runs, accounting[args.packing], started)
    out = Path(args.json or work / "report.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out}")
    return 0


def _line(f: dict) -> str:
    return (
        f"{f['pairs_per_second']:.2f} pairs/s, {f['tokens_per_second']:.0f} tok/s, "
        f"step {f['step_seconds'] * 1000:.0f} ms, peak RSS {f['peak_rss_mb']:.0f} MB, "
        f"{f['executed_gflops']:.1f} GFLOP/s = {f['executed_flops_fraction']:.0%} of matmul "
        f"({f['matmul_gflops']:.0f}), useful {f['useful_flops_fraction']:.0%}"
    )


def _report(
    config: Config, args, layouts: list[str], runs: list[dict], steps: list[dict], started: str
) -> dict:
    median = statistics.median
    sides = ["trl", *[f"miopt:{layout}" for layout in layouts]]
    table = {}
    for side in sides:
        table[side] = {
            key: median(run[side][key] for run in runs)
            for key in ("pairs_per_second", "tokens_per_second", "step_seconds", "peak_rss_mb", "rss_floor_mb", "rss_imports_mb", "rss_above_imports_mb",
                        "executed_flops_fraction", "useful_flops_fraction", "matmul_gflops", "setup_seconds",
                        "positions_per_step")
        }  # fmt: skip
    ratios = {}
    for side in sides[1:]:
        speed = [run[side]["pairs_per_second"] / run["trl"]["pairs_per_second"] for run in runs]
        memory = [run[side]["peak_rss_mb"] / run["trl"]["peak_rss_mb"] for run in runs]
        above = [run[side]["rss_above_imports_mb"] / run["trl"]["rss_above_imports_mb"] for run in runs]
        ratios[side] = {
            "memory_above_imports": above,
            "memory_above_imports_median": median(above),
            "speed": speed,
            "speed_median": median(speed),
            "memory": memory,
            "memory_median": median(memory),
        }
    checks = {}
    for side in sides[1:]:
        diffs = [max(abs(a - b) for a, b in zip(run["trl"]["losses"], run[side]["losses"])) for run in runs]
        checks[side] = {
            "same_token_ids": all(run["trl"]["ids"] == run[side]["ids"] for run in runs),
            "max_loss_difference": max(diffs),
        }
    measured = steps[config.warmup :]
    modifiers = "".join(f" + {m}" for m in args.modifier)
    print(f"\n== {config.name}: batch {config.batch_size}, {config.objective}{modifiers} (TRL {TRL_LOSS[config.objective]}), "
          f"{'bf16' if args.bf16 else 'fp32'}, {len(runs)} repeat(s), {args.threads} thread(s); "
          f"medians over repeats of per-run medians ==")  # fmt: skip
    print(f"sequence tokens/step {median(s['tokens'] for s in measured):.0f}; positions computed/step: TRL "
          f"{table['trl']['positions_per_step']:.0f}, miopt {table[sides[1]]['positions_per_step']:.0f}")  # fmt: skip
    print(
        f"{'side':22s} {'pairs/s':>9s} {'tok/s':>9s} {'peak RSS':>9s} {'>imports':>9s} {'exec FLOP':>9s} {'useful':>7s}"
    )
    for side in sides:
        row = table[side]
        print(
            f"{side:22s} {row['pairs_per_second']:9.2f} {row['tokens_per_second']:9.0f} {row['peak_rss_mb']:7.0f}MB "
            f"{row['rss_above_imports_mb']:7.0f}MB {row['executed_flops_fraction']:9.1%} {row['useful_flops_fraction']:7.1%}"
        )
    for side in sides[1:]:
        r, c = ratios[side], checks[side]
        print(
            f"{side} / trl: pairs/s x{r['speed_median']:.2f} (runs {', '.join(f'{x:.2f}' for x in r['speed'])}), "
            f"peak RSS x{r['memory_median']:.2f} (runs {', '.join(f'{x:.2f}' for x in r['memory'])}), "
            f"above imports x{r['memory_above_imports_median']:.2f}; "
            f"same token ids: {c['same_token_ids']}, max |loss diff| over steps: {c['max_loss_difference']:.1e}"
        )
    return {
        "config": asdict(config),
        "started": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "bf16": args.bf16,
        "modifiers": args.modifier,
        "versions": _versions(),
        "runs": runs,
        "medians": table,
        "ratios": ratios,
        "checks": checks,
        "steps": steps,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())

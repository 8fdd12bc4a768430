"""The SFT start of the GSM8K comparison: a BPE tokenizer and a small Llama model, both trained here.

Nothing is downloaded. The tokenizer is a byte-level BPE (Hugging Face ``tokenizers``; digits split
one per token so that numbers share their pieces) trained on GSM8K train questions and solutions;
the model is a Llama-architecture decoder (default hidden 256, 4 layers, ~6M parameters with an
8k vocabulary) trained from scratch on GSM8K train (Cobbe et al. 2021) with the loss on the
solution only, the prompt being the evaluation harness's ``Question: ...\\nAnswer:\\n``.

Solutions are written as the preference pairs of ``miopt data gsm8k-pairs`` write them: GSM8K's
final line ``#### <number>`` becomes ``A: <number>`` (the ``ground_truth`` form of
example_model_solutions.jsonl), calculator annotations ``<<...>>`` kept. The trained folder (model
and tokenizer, ``save_pretrained``) is cached like the default run's SFT start
(:func:`miopt.experiments.default_run.sft_cache_path`): keyed by these settings and the train file's bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from miopt.data.sources import read_jsonl
from miopt.data.tokenize import tokenize_examples
from miopt.errors import DataError
from miopt.logprobs.reference import default_cache_dir
from miopt.run.atomic_io import atomic_directory, atomic_write_json, cache_lock, commit_directory
from miopt.tasks.gsm8k import gsm8k_prompt
from miopt.training.sft import SFTOptions, sft_on_examples

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_HASH_LINE = re.compile(r"\n?[ \t]*####\s*([^\n]*)\s*$")


@dataclass(frozen=True)
class Gsm8kSFTSettings:
    """What makes the GSM8K SFT start; every field but the file's path enters the cache key (with the
    file's content)."""

    train_file: str = "../shared/data/gsm8k/train.jsonl"
    train_limit: int | None = None  # first N train records (None: all 7,473)
    vocab_size: int = 8000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_length: int = 512
    sft_steps: int = 1400  # 3 epochs of 7,473 at batch 16
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    seed: int = 0


def solution_text(answer: str) -> str:
    """A GSM8K train answer with its final ``#### n`` line rewritten as ``A: n`` (the pairs' form)."""
    match = _HASH_LINE.search(answer)
    if not match:
        return answer.strip()
    return f"{answer[: match.start()].rstrip()}\nA: {match.group(1).strip()}"


def read_train(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, solution) pairs of a GSM8K-format JSONL file (``question``, ``answer``)."""

    path = Path(path)
    if not path.is_file():
        raise DataError("GSM8K train file not found", source=str(path))
    rows = []
    for number, record in read_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError("expected string fields 'question' and 'answer'", source=f"{path}:{number}")
        rows.append((gsm8k_prompt(question), solution_text(answer)))
    if not rows:
        raise DataError("no records", source=str(path))
    return rows


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, *, split_digits: bool = True):
    """A byte-level BPE tokenizer trained on ``texts`` (digits one per token unless not
    ``split_digits``), as a Hugging Face ``PreTrainedTokenizerFast`` with pad/bos/eos/unk specials; no
    BOS is added to inputs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
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


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def sft_cache_path(settings: Gsm8kSFTSettings) -> Path:
    """Keyed by the settings and the train file's content (not its path)."""
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k != "train_file"}
    text = json.dumps(fields, sort_keys=True) + "|" + _file_digest(Path(settings.train_file))
    return default_cache_dir() / "gsm8k-sft" / hashlib.sha256((text + "|v1").encode()).hexdigest()[:16]


def sft_examples(rows: Sequence[tuple[str, str]], tokenizer, max_length: int):
    """Tokenised SFT examples (solutions cut at ``max_length`` with the harness's truncation rule)."""

    return tokenize_examples(
        [prompt for prompt, _ in rows],
        [(solution,) for _, solution in rows],
        [f"gsm8k-train:{i + 1}" for i in range(len(rows))],
        tokenizer,
        max_length=max_length,
        skip_invalid=True,
    )


def warm_start(settings: Gsm8kSFTSettings, progress: bool = True) -> Path:
    """The cached SFT start folder (model and tokenizer); trained on the first call."""
    final = sft_cache_path(settings)
    with cache_lock(final):
        return _warm_start(settings, progress, final)


def _warm_start(settings: Gsm8kSFTSettings, progress: bool, final: Path) -> Path:
    # here, not at the top: ``miopt compare --help`` imports this module (its settings), and the
    # built-in model's module loads transformers' model code (seconds at start-up)
    from miopt.model.builtin import build_model

    if (final / "config.json").is_file():
        print(f"GSM8K SFT start: cached at {final}", file=sys.stderr)
        return final
    rows = read_train(settings.train_file, settings.train_limit)
    print(
        f"GSM8K SFT start: BPE tokenizer (vocab {settings.vocab_size}) and a hidden-{settings.hidden_size}, "
        f"{settings.num_layers}-layer model from scratch, {settings.sft_steps} steps on {len(rows)} "
        "solutions (cached for the next run)",
        file=sys.stderr,
    )
    tokenizer = train_tokenizer((prompt + solution for prompt, solution in rows), settings.vocab_size)
    examples, report = sft_examples(rows, tokenizer, settings.max_length)
    print(f"  {report.describe()}", file=sys.stderr)
    model = build_model(
        tokenizer,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        max_positions=settings.max_length,
        seed=settings.seed,
    )
    temporary = atomic_directory(final)
    options = SFTOptions(
        output_dir=str(temporary),
        max_steps=settings.sft_steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler="cosine",
        warmup_ratio=settings.warmup_ratio,
        logging_steps=50,
        seed=settings.seed,
        progress=progress,
        max_length=settings.max_length,
    )
    summary = sft_on_examples(options, model, tokenizer, examples)
    atomic_write_json(
        temporary / "gsm8k_sft.json",
        {"settings": dataclasses.asdict(settings), "examples": len(examples), "seconds": summary["seconds"]},
    )
    commit_directory(temporary, final)
    return final

"""Helpers the CLI tests share: the ``miopt train`` arguments of a tiny run, reading what a run wrote,
and the one uninterrupted run that stopped-and-resumed runs are compared with."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def train_args(model_dir, data, output, *extra) -> list[str]:
    """``miopt train`` on a tiny model: batch 4, lr 1e-3, a logged row every step, beta 0.5."""
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(output),
        "--batch-size", "4", "--learning-rate", "1e-3", "--logging-steps", "1", "--progress", "false",
        "--beta", "0.5", *extra,
    ]  # fmt: skip


def read_metrics(folder: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_names(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("checkpoint-"))


def uninterrupted_run(root: Path, run: tuple[str, ...]) -> SimpleNamespace:
    """A tiny model and pairs file under ``root``, and ``miopt train`` on them with ``run`` into
    ``root/full`` (its reference cache in ``root/cache``): the run the interrupted ones must equal."""
    from miopt.cli import main
    from miopt.model.builtin import build_model, build_tokenizer
    from tests.conftest import write_pairs

    tokenizer = build_tokenizer()
    model_dir = root / "model"
    build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_pairs(root / "pairs.jsonl")
    out = root / "full"
    assert main(train_args(model_dir, data, out, *run, "--cache-dir", str(root / "cache"))) == 0
    return SimpleNamespace(root=root, model=model_dir, data=data, out=out, cache=root / "cache")

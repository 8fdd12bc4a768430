"""Shared fixtures: tiny models built in the test, small preference files, an isolated cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own miopt cache (reference log-probs, default SFT start)."""
    monkeypatch.setenv("MIOPT_CACHE", str(tmp_path_factory.mktemp("miopt-cache")))


@pytest.fixture(scope="session")
def tokenizer():
    from miopt.model.builtin import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    from miopt.model.builtin import build_model

    return build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)


def write_pairs(path: Path, count: int = 24, seed: int = 0, rejected_per_prompt: int = 1) -> Path:
    """Arithmetic preference pairs (correct worked solution vs. wrong ones) as JSONL."""
    from miopt.tasks import arithmetic

    problems, _ = arithmetic.generate_splits(count, 0, seed=seed)
    rng = random.Random(seed)
    with path.open("w") as file:
        for problem in problems:
            rejected = []
            while len(rejected) < rejected_per_prompt:
                wrong = arithmetic.wrong_solution(problem, rng)
                if wrong not in rejected:
                    rejected.append(wrong)
            value = rejected[0] if rejected_per_prompt == 1 else rejected
            file.write(
                json.dumps({"prompt": problem.prompt, "chosen": problem.solution, "rejected": value}) + "\n"
            )
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl")


@pytest.fixture
def small_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny model saved as a Hugging Face folder (the code path real checkpoints take)."""
    from miopt.model.builtin import build_model

    folder = tmp_path_factory.mktemp("tiny-model")
    build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

"""The shipped start (``builtin:arith``): a plain Hugging Face folder inside the package that scores
what docs/experiments.md says it scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miopt.model.loading import BUILTIN_ARITH, resolve_model, shipped_model_dir

DOCS = Path(__file__).resolve().parents[2] / "docs" / "experiments.md"


def test_shipped_start_loads_from_the_package_and_scores_its_documented_accuracy():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miopt.evaluation import evaluate_arithmetic
    from miopt.tasks.default import DefaultTask, task_splits

    folder = shipped_model_dir()
    assert folder.parent.name == "assets" and folder.parent.parent.name == "miopt"
    assert resolve_model(BUILTIN_ARITH) == str(folder) and resolve_model("builtin") == "builtin"
    assert sum(file.stat().st_size for file in folder.iterdir()) <= 16 * 2**20
    card = json.loads((folder / "miopt_start.json").read_text())
    documented = card["heldout_accuracy"]
    assert 0.45 <= documented <= 0.85
    assert f"{documented:.1%}" in DOCS.read_text()  # the figure the docs give

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    subset = task_splits(DefaultTask()).heldout[:200]
    accuracy = evaluate_arithmetic(model, tokenizer, subset)
    assert abs(accuracy - documented) <= 0.06, (accuracy, documented)


def test_builtin_stays_a_fresh_model_and_unknown_shipped_names_are_refused():
    from miopt.errors import OptionError
    from miopt.model.loading import load_model

    fresh, shipped = load_model("builtin"), load_model(BUILTIN_ARITH)
    name = "model.embed_tokens.weight"
    assert not fresh.state_dict()[name].equal(shipped.state_dict()[name])
    with pytest.raises(OptionError, match="unknown shipped model"):
        shipped_model_dir("builtin:nope")

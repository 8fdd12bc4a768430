"""The embedded default pipeline on a tiny budget: wiring, outputs and the SFT cache."""

from __future__ import annotations

import json

import pytest

from miopt.default_run import DefaultTask, run_default, warm_start
from miopt.train import TrainOptions

TINY = DefaultTask(
    sft_problems=256, preference_prompts=96, heldout_problems=64, sft_steps=8, sft_batch_size=32
)


def test_default_pipeline_reports_both_accuracies_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "default"
    options = TrainOptions(output_dir=str(out), progress=False, max_steps=3)
    summary = run_default(options, explicit={"output_dir", "progress", "max_steps"}, task=TINY)
    for key in ("sft_start_accuracy", "final_accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["objective"] == "mio" and summary["beta"] == 0.5
    saved = json.loads((out / "summary.json").read_text())
    assert saved["heldout_problems"] == 64 and saved["pairs"] == summary["pairs"] > 0
    assert (out / "model.safetensors").is_file() and (out / "curves.png").is_file()
    printed = capsys.readouterr().out
    assert "SFT start" in printed and str(out) in printed
    for key in ("sft_start", "final"):
        low, high = saved[f"{key}_accuracy_interval_95"]
        assert low <= saved[f"{key}_accuracy"] <= high and high - low > 0.05  # 64 problems: a wide interval
        assert f"{key} [{low:.1%}, {high:.1%}]" in printed


def test_flags_given_by_the_user_win_over_the_default_settings(tmp_path):
    options = TrainOptions(output_dir=str(tmp_path / "d"), progress=False, objective="dpo", max_steps=2)
    summary = run_default(options, explicit={"output_dir", "progress", "objective", "max_steps"}, task=TINY)
    assert summary["objective"] == "dpo" and summary["steps"] == 2


def test_sft_start_is_cached(tmp_path, monkeypatch, tokenizer):
    import miopt.sft as sft_module
    from miopt.tasks import arithmetic

    problems, _ = arithmetic.generate_splits(TINY.sft_problems, 0, seed=TINY.seed)
    first = warm_start(TINY, tokenizer, problems, progress=False)

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached SFT start was trained again")

    monkeypatch.setattr(sft_module, "sft_on_examples", must_not_train)
    assert warm_start(TINY, tokenizer, problems, progress=False) == first
    with pytest.raises(AssertionError):
        warm_start(DefaultTask(sft_problems=256, sft_steps=9), tokenizer, problems, progress=False)


def test_eval_arithmetic_default_is_the_default_runs_held_out_split():
    from miopt.evaluation.tasks import ARITHMETIC_DEFAULTS, load_records
    from miopt.tasks import arithmetic

    task = DefaultTask()
    assert ARITHMETIC_DEFAULTS == {
        "n_train": task.sft_problems + task.preference_prompts,
        "n_heldout": task.heldout_problems,
        "seed": task.seed,
    }
    _, heldout = arithmetic.generate_splits(
        task.sft_problems + task.preference_prompts, task.heldout_problems, seed=task.seed
    )
    assert [r.prompt for r in load_records("arithmetic", limit=5)] == [p.prompt for p in heldout[:5]]

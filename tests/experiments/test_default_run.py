"""The embedded default on a tiny budget: the three arms from the shipped start, the comparison
table, the plot, the rerun, and the held-out problems kept out of every training set."""

from __future__ import annotations

import json

import pytest

import miopt.experiments.default_run as default_run
from miopt.errors import OptionError
from miopt.experiments.default_run import ARMS, DefaultTask, run_default
from miopt.tasks.default import reserved_questions, start_problems, task_splits
from miopt.training.preference import TrainOptions

PNG = b"\x89PNG\r\n\x1a\n"
TINY = DefaultTask(pool_problems=200, validation_problems=40, preference_prompts=48, heldout_problems=40)


def tiny_run(out, capsys=None, **flags):
    flags = {"max_steps": 2, "batch_size": 4, "logging_steps": 1, **flags}
    options = TrainOptions(output_dir=str(out), progress=False, **flags)
    return run_default(options, explicit={"output_dir", "progress", *flags}, task=TINY)


def test_default_run_trains_every_arm_from_the_shipped_start_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "default"
    comparison = tiny_run(out)
    saved = json.loads((out / "comparison.json").read_text())
    assert set(ARMS) == {"mio", "dpo", "sft"} and {"start", *ARMS} <= set(saved)
    assert saved["heldout_problems"] == 40 and saved["pairs"] == comparison["pairs"] > 0
    for name in ("start", *ARMS):
        low, high = saved[name]["interval_95"]
        assert low <= saved[name]["heldout_accuracy"] <= high and high - low > 0.1  # 40 problems: wide
    for arm in ARMS:
        assert saved[arm]["settings"]["objective"] == arm and saved[arm]["settings"]["max_steps"] == 2
        assert isinstance(saved[arm]["chosen_change"], float) and isinstance(
            saved[arm]["rejected_change"], float
        )
    # MIO is the run's result (the folder itself); the other arms sit beside it.
    assert saved["mio"]["output_dir"] == str(out)
    for folder in (out, out / "dpo", out / "sft"):
        assert (folder / "model.safetensors").is_file() and (folder / "metrics.jsonl").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "mio" and summary["final_accuracy"] == saved["mio"]["heldout_accuracy"]
    assert summary["start_accuracy"] == saved["start"]["heldout_accuracy"]
    assert (out / "chosen_logps.png").read_bytes().startswith(PNG)
    printed = capsys.readouterr().out
    for name in ("start", *ARMS):
        low, high = saved[name]["interval_95"]
        assert f"[{low:.1%}, {high:.1%}]" in printed
    assert str(out / "dpo") in printed


def test_rerun_replaces_the_previous_default_and_a_foreign_folder_is_refused(tmp_path):
    out = tmp_path / "default"
    tiny_run(out, max_steps=1)
    (out / "dpo" / "stale.txt").write_text("from the first run")
    tiny_run(out, max_steps=1)
    assert not (out / "dpo" / "stale.txt").exists() and (out / "comparison.json").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OptionError, match="no default run wrote"):
        tiny_run(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_held_out_problems_are_in_neither_the_start_data_nor_the_pairs(tmp_path, monkeypatch):
    task = DefaultTask()
    splits = task_splits(task)
    heldout = {p.expression for p in splits.heldout}
    assert len(heldout) == 1000
    assert heldout <= reserved_questions(task)
    assert not heldout & {p.expression for p in start_problems(5000, seed=0)}
    assert not heldout & {p.expression for p in splits.preference + splits.validation}
    assert not {p.expression for p in splits.preference} & {p.expression for p in splits.validation}
    # The pairs the default run trains on come from prompts none of which is held out.
    seen = []
    real = default_run.on_policy_pairs

    def recording(model, tokenizer, problems, *args, **kwargs):
        seen.extend(p.prompt for p in problems)
        return real(model, tokenizer, problems, *args, **kwargs)

    monkeypatch.setattr(default_run, "on_policy_pairs", recording)
    tiny_run(tmp_path / "d", max_steps=1)
    tiny_splits = task_splits(TINY)
    assert seen == [p.prompt for p in tiny_splits.preference]
    assert not set(seen) & {p.prompt for p in tiny_splits.heldout}


def test_sft_data_source_draws_fresh_problems_outside_the_reserved_ones(tokenizer, monkeypatch):
    import miopt.training.sft
    from miopt.training.sft import SFTOptions, arithmetic_examples

    monkeypatch.setattr(miopt.training.sft, "ARITHMETIC_PROBLEMS", 100)  # the real floor: 128,000
    options = SFTOptions(model="builtin", data="builtin:arithmetic", max_steps=3, batch_size=50)
    examples = arithmetic_examples(options, tokenizer)
    prompts = [tokenizer.decode(example.prompt_ids) for example in examples]
    assert len(set(prompts)) == len(examples) == 100
    reserved = {f"Q: {question}=?\n" for question in reserved_questions(DefaultTask())}
    assert not set(prompts) & reserved
    with pytest.raises(OptionError, match="--max-steps"):
        arithmetic_examples(SFTOptions(model="builtin", data="builtin:arithmetic"), tokenizer)


def test_eval_arithmetic_default_is_the_default_runs_held_out_split():
    from miopt.evaluation.tasks import ARITHMETIC_DEFAULTS, load_records

    task = DefaultTask()
    assert ARITHMETIC_DEFAULTS == {
        "n_train": task.pool_problems,
        "n_heldout": task.heldout_problems,
        "seed": task.seed,
    }
    heldout = task_splits(task).heldout
    assert [r.prompt for r in load_records("arithmetic", limit=5)] == [p.prompt for p in heldout[:5]]

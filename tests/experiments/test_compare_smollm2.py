"""``miopt compare --preset smollm2-arith``'s machinery on the tiny shipped start: SFT to a plateau in
exact segments, pairs from the start's own samples, pass@k columns, the summary table, reuse."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from miopt.cli import main
from miopt.errors import OptionError
from miopt.experiments.compare import (
    SAMPLING_COLUMNS,
    TABLE_JSON,
    CompareOptions,
    PlateauSFT,
    SmolLM2ArithPreset,
    preset_from_options,
    run_compare,
    summary_table,
)
from miopt.experiments.compare import smollm2 as preset_module
from miopt.experiments.compare.smollm2 import PAIRS_FILE, PLATEAU_FILE, SMOLLM2_TASK, START_DIR, plateau_sft
from miopt.tasks import arithmetic
from miopt.tasks.default import task_splits

TINY_TASK = dataclasses.replace(
    SMOLLM2_TASK,
    pool_problems=120,
    validation_problems=16,
    preference_prompts=60,
    heldout_problems=16,
    difficulty=arithmetic.STANDARD,  # what the tiny shipped start can do
)


def tiny_preset(**changes) -> SmolLM2ArithPreset:
    base = dict(SmolLM2ArithPreset().base, max_steps=3, batch_size=4, save_steps=2, logging_steps=1)
    settings = dict(
        start_model="builtin:arith",
        task=TINY_TASK,
        sft=PlateauSFT(segment_steps=2, max_segments=2, min_segments=1, batch_size=4, train_problems=48),
        preference_prompts=40,
        heldout_pair_prompts=8,
        pass_problems=8,
        eval_limit=16,
        seeds=1,
        base=base,
        settings_grid=(),  # the selection has its own test
    )
    return SmolLM2ArithPreset(**{**settings, **changes})


def test_preset_is_listed_and_defaults_to_the_five_arms():
    assert "smollm2" in " ".join(preset_from_options.__globals__["PRESETS"])
    assert SmolLM2ArithPreset.objectives == ("mio", "dpo", "dpop", "cal_dpo", "sft")
    preset = preset_from_options(CompareOptions(output_dir="x", preset="smollm2-arith", sft_steps=100))
    assert preset.sft.max_segments * preset.sft.segment_steps >= 100
    assert preset.task.difficulty == arithmetic.Difficulty(max_operand=99, operand_counts=(3, 4))


def test_plateau_stops_when_a_segment_gains_less_than_min_gain(tmp_path, monkeypatch):
    scripted = iter([0.10, 0.50, 0.60, 0.61, 0.99])
    monkeypatch.setattr(preset_module, "greedy_accuracy", lambda *args: next(scripted))
    preset = tiny_preset(sft=PlateauSFT(segment_steps=2, max_segments=5, min_segments=2, train_problems=48))
    folder = plateau_sft(preset, "builtin:arith", [], tmp_path / START_DIR, progress=False)
    record = json.loads((folder / PLATEAU_FILE).read_text())
    assert [point["step"] for point in record["curve"]] == [0, 2, 4, 6]  # +0.01 at step 6 < 0.02
    assert [point["validation_accuracy"] for point in record["curve"]] == [0.10, 0.50, 0.60, 0.61]
    assert record["done"] and (folder / "config.json").is_file()

    # Finished: a second call trains and measures nothing.
    monkeypatch.setattr(preset_module, "greedy_accuracy", lambda *args: pytest.fail("measured again"))
    assert plateau_sft(preset, "builtin:arith", [], tmp_path / START_DIR, progress=False) == folder


def test_plateau_segments_continue_one_run_exactly(tmp_path, monkeypatch):
    """Two segments of 2 steps end on the same weights as one uninterrupted 4-step run."""
    monkeypatch.setattr(preset_module, "greedy_accuracy", lambda *args: 0.5)
    segmented = tiny_preset(
        sft=PlateauSFT(segment_steps=2, max_segments=2, min_segments=2, train_problems=48)
    )
    whole = tiny_preset(sft=PlateauSFT(segment_steps=4, max_segments=1, min_segments=1, train_problems=48))
    torch.set_num_threads(1)
    original, starts = preset_module.sft_on_examples, []

    def recording(options, *args, **kwargs):
        checkpoints = sorted(path.name for path in (tmp_path / "a").glob("checkpoint-*"))
        starts.append((options.max_steps, options.resume, checkpoints))
        return original(options, *args, **kwargs)

    monkeypatch.setattr(preset_module, "sft_on_examples", recording)
    a = plateau_sft(segmented, "builtin:arith", [], tmp_path / "a", progress=False)
    # the second segment continued from the first one's last step; it did not train from scratch
    assert starts == [(2, None, []), (4, "latest", ["checkpoint-0000002"])]
    rows = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [2, 4]  # one row per segment end, none twice
    monkeypatch.setattr(preset_module, "sft_on_examples", original)
    b = plateau_sft(whole, "builtin:arith", [], tmp_path / "b", progress=False)
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


def test_plateau_refuses_a_folder_made_from_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(preset_module, "greedy_accuracy", lambda *args: 0.5)
    plateau_sft(tiny_preset(), "builtin:arith", [], tmp_path / START_DIR, progress=False)
    other = tiny_preset(sft=PlateauSFT(segment_steps=3, max_segments=1, min_segments=1, train_problems=48))
    with pytest.raises(OptionError, match="another model or other settings"):
        plateau_sft(other, "builtin:arith", [], tmp_path / START_DIR, progress=False)


def test_compare_on_own_samples_writes_pass_at_k_and_reuses_everything(tmp_path, monkeypatch):
    output = tmp_path / "compare"
    options = CompareOptions(output_dir=str(output), objectives=["mio", "sft"], threads=1, progress=False)
    table = run_compare(options, preset=tiny_preset())

    # Pairs are the start's own samples: chosen correct, rejected wrong, by the task's checker.
    saved = json.loads((output / PAIRS_FILE).read_text())
    splits = task_splits(TINY_TASK)
    problems = {problem.prompt: problem for problem in splits.preference}
    assert saved["pairs"], "the tiny start gave no contrast"
    for pair in saved["pairs"]:
        answer = problems[pair["prompt"]].answer
        assert arithmetic.is_correct(pair["chosen"], answer)
        assert pair["rejected"] and not any(arithmetic.is_correct(text, answer) for text in pair["rejected"])
    counts = saved["counts"]
    assert counts["prompts"] == 40 and counts["pairs"] == len(saved["pairs"])
    held_out = sum(1 for pair in saved["pairs"] if pair["index"] >= 40 - 8)
    assert table["info"]["heldout_pairs"] == held_out
    assert table["info"]["train_pairs"] == len(saved["pairs"]) - held_out

    # pass@1 <= pass@k, for the start and every arm; the summary names every arm and the start.
    start = table["start"]
    assert 0 <= start["pass_at_1"] <= start["pass_at_k"] <= 1 and start["pass_k"] == 4
    for row in table["rows"]:
        assert row["pass_at_1"]["mean"] <= row["pass_at_k"]["mean"]
        low, high = row["final_accuracy_ci95"]
        assert low <= row["final_accuracy"]["mean"] <= high
    assert {key for key, *_ in SAMPLING_COLUMNS} <= set(
        json.loads((output / TABLE_JSON).read_text())["rows"][0]
    )
    text = summary_table(table)
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["start", "mio", "sft"]
    assert "pass@4" in text and "%" in text.splitlines()[3]
    for run in ("mio-seed0", "sft-seed0"):
        assert not list((output / "runs" / run).glob("checkpoint-*"))  # a finished run keeps no checkpoint

    # A second invocation samples, trains and evaluates the start nothing again.
    monkeypatch.setattr(preset_module, "_sample_pairs", lambda *a: pytest.fail("sampled again"))
    monkeypatch.setattr(preset_module, "greedy_accuracy", lambda *a: pytest.fail("start re-measured"))
    again = run_compare(options, preset=tiny_preset())
    assert again["start"] == table["start"] and again["reused_runs"] == 2


def test_compare_model_flag_is_checked_before_any_work(tmp_path, capsys):
    code = main(["compare", "--preset", "smollm2-arith", "--model", str(tmp_path / "none.gguf"),
                 "--output-dir", str(tmp_path / "c")])  # fmt: skip
    assert code == 2
    assert "none.gguf" in capsys.readouterr().err
    assert not (tmp_path / "c" / START_DIR).exists()
    with pytest.raises(OptionError, match="gsm8k trains its own start"):
        run_compare(CompareOptions(output_dir=str(tmp_path / "g"), preset="gsm8k", model="builtin"))


def test_a_preempted_compare_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """SIGTERM during an arm's training: the arm stops with a checkpoint; the same command again
    finishes it from there, ending on the weights and result of an uninterrupted comparison."""
    import os
    import signal

    import miopt.training.preference as train_module
    from miopt.run.preemption import Preempted

    torch.set_num_threads(1)
    preset = tiny_preset(base=dict(tiny_preset().base, max_steps=4, save_steps=0))
    options = CompareOptions(
        output_dir=str(tmp_path / "whole"), objectives=["mio"], threads=1, progress=False
    )
    whole = run_compare(options, preset=preset)

    original, calls = train_module.make_step_function, {"n": 0}

    def signalling(*args, **kwargs):
        step = original(*args, **kwargs)

        def wrapped(model, indices):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(model, indices)

        return wrapped

    monkeypatch.setattr(train_module, "make_step_function", signalling)
    stopped = dataclasses.replace(options, output_dir=str(tmp_path / "stopped"))
    with pytest.raises(Preempted) as raised:
        run_compare(stopped, preset=preset)
    run = tmp_path / "stopped" / "runs" / "mio-seed0"
    assert raised.value.step == 2 and [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-0000002"]
    assert not (run / "compare_result.json").exists()

    monkeypatch.setattr(train_module, "make_step_function", original)
    resumed = run_compare(stopped, preset=preset)
    want = load_file(tmp_path / "whole" / "runs" / "mio-seed0" / "model.safetensors")
    got = load_file(run / "model.safetensors")
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())
    drop = {"seconds", "key"}  # the key names the start folder, which differs
    assert {k: v for k, v in resumed["runs"][0].items() if k not in drop} == {
        k: v for k, v in whole["runs"][0].items() if k not in drop
    }


def test_a_start_stopped_at_max_segments_continues_when_allowed_more(tmp_path, monkeypatch):
    """Still rising at the segment limit: 'max_segments'; a larger limit continues the same start
    from its last checkpoint (one more segment, not a retraining); a changed trajectory is refused."""
    scripted = iter([0.10, 0.30, 0.50, 0.70])
    monkeypatch.setattr(preset_module, "greedy_accuracy", lambda *args: next(scripted))
    short = tiny_preset(sft=PlateauSFT(segment_steps=2, max_segments=2, min_segments=1, train_problems=48))
    folder = plateau_sft(short, "builtin:arith", [], tmp_path / START_DIR, progress=False)
    record = json.loads((folder / PLATEAU_FILE).read_text())
    assert [p["step"] for p in record["curve"]] == [0, 2, 4] and record["stopped"] == "max_segments"

    longer = tiny_preset(sft=dataclasses.replace(short.sft, max_segments=3))
    plateau_sft(longer, "builtin:arith", [], tmp_path / START_DIR, progress=False)
    record = json.loads((folder / PLATEAU_FILE).read_text())
    assert [p["validation_accuracy"] for p in record["curve"]] == [0.10, 0.30, 0.50, 0.70]
    rows = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6]


def test_settings_are_chosen_per_arm_on_validation_and_the_chosen_seed0_run_is_not_retrained(
    tmp_path, monkeypatch
):
    """Two learning rates per arm, seed 0, scored on the validation split only: each arm gets its best
    (the first on a tie); seed 1 trains with it; the chosen seed-0 run is evaluated, not retrained;
    the other candidate is never scored on the held-out problems; a second invocation trains nothing."""
    import miopt.experiments.compare.runs as runs_module

    grid = ((("learning_rate", 1e-5),), (("learning_rate", 1e-4),))
    preset = tiny_preset(settings_grid=grid, seeds=2)
    output = tmp_path / "compare"
    options = CompareOptions(output_dir=str(output), objectives=["mio", "dpo"], threads=1, progress=False)
    validation = {p.prompt for p in task_splits(TINY_TASK).validation}
    heldout = {p.prompt for p in task_splits(TINY_TASK).heldout}
    assert validation and not validation & heldout
    # scripted validation scores: mio prefers 1e-4, dpo ties (so keeps the first listed, 1e-5)
    scores = {("mio", 1e-5): 0.25, ("mio", 1e-4): 0.5, ("dpo", 1e-5): 0.5, ("dpo", 1e-4): 0.5}
    scored, trained = [], []
    original_validate = runs_module.validation_score

    def validation_score(prepared, spec, *, progress):
        true_accuracy = original_validate(prepared, spec, progress=progress)  # trains and scores for real
        assert 0 <= true_accuracy <= 1
        scored.append((spec.objective, spec.preference["learning_rate"]))
        return scores[scored[-1]]

    original_train = runs_module.train_on_examples

    def counting_train(options, *args, **kwargs):
        trained.append((options.objective, options.learning_rate, options.seed))
        return original_train(options, *args, **kwargs)

    monkeypatch.setattr(runs_module, "validation_score", validation_score)
    monkeypatch.setattr(runs_module, "train_on_examples", counting_train)
    table = run_compare(options, preset=preset)

    assert sorted(scored) == sorted(scores)
    assert table["settings"]["chosen_settings"] == {
        "mio": {"learning_rate": 1e-4},
        "dpo": {"learning_rate": 1e-5},
    }
    # 4 selection runs at seed 0, then seed 1 of each arm's choice; the chosen seed-0 runs are reused
    assert sorted(trained) == sorted(
        [
            ("mio", 1e-5, 0),
            ("mio", 1e-4, 0),
            ("dpo", 1e-5, 0),
            ("dpo", 1e-4, 0),
            ("mio", 1e-4, 1),
            ("dpo", 1e-5, 1),
        ]
    )
    runs = {(r["objective"], r["seed"]): r for r in table["runs"]}
    assert (
        runs[("mio", 0)]["settings"]["learning_rate"] == runs[("mio", 1)]["settings"]["learning_rate"] == 1e-4
    )
    results = sorted(p.parent.name for p in (output / "runs").glob("*/compare_result.json"))
    assert results == ["dpo-lr1e-05-seed0", "dpo-lr1e-05-seed1", "mio-lr0.0001-seed0", "mio-lr0.0001-seed1"]
    summary = json.loads((output / TABLE_JSON).read_text())["settings"]["selection"]
    assert summary == json.loads((output / "settings.json").read_text())
    assert [c["validation_accuracy"] for c in summary["mio"]["candidates"]] == [0.25, 0.5]
    assert "learning_rate 0.0001" in summary_table(table).splitlines()[2 + 1]  # mio's row names its setting

    # Again: nothing trains or is measured; the validation scores are read back from the run folders.
    monkeypatch.setattr(preset_module, "greedy_accuracy", lambda *a: pytest.fail("measured again"))
    trained.clear()
    again = run_compare(options, preset=preset)
    assert trained == [] and again["reused_runs"] == 4
    assert again["settings"]["chosen_settings"] == table["settings"]["chosen_settings"]


def test_pick_keeps_the_first_of_equal_scores_and_tags_name_the_setting():
    from miopt.experiments.compare.selection import candidate_tag, pick

    first, second = (("learning_rate", 1e-5),), (("learning_rate", 3e-5), ("beta", 0.3))
    assert pick([(first, 0.5), (second, 0.5)]) == first
    assert pick([(first, 0.4), (second, 0.5)]) == second
    assert candidate_tag(second) == "lr3e-05-beta0.3" and candidate_tag(()) == "base"
    with pytest.raises(ValueError):
        pick([])


def test_an_override_of_the_grid_option_turns_its_choice_off():
    chosen = preset_from_options(CompareOptions(output_dir="x", preset="smollm2-arith"))
    assert [dict(c)["learning_rate"] for c in chosen.settings_grid] == [1e-5, 3e-5]
    fixed = preset_from_options(CompareOptions(output_dir="x", preset="smollm2-arith", learning_rate=2e-5))
    assert fixed.settings_grid == () and fixed.preference_options()["learning_rate"] == 2e-5

"""Nothing lost, nothing silently wrong (docs/reliability.md): one output folder per run, the
non-finite guard, checkpoints and reference caches that survive damage, a torn metrics line."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from miopt.cli import main
from tests.helpers import checkpoint_names, read_metrics, train_args, uninterrupted_run

LOG4 = math.log(4.0)


# Six steps, a checkpoint every two (kept: all), DPO.
RUN = (
    "--max-steps",
    "6",
    "--save-steps",
    "2",
    "--save-total-limit",
    "0",
    "--objective",
    "dpo",
    "--seed",
    "3",
)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run (checkpoints at steps 2 and 4), shared by the resume tests."""
    full = uninterrupted_run(tmp_path_factory.mktemp("reliability"), RUN)
    assert checkpoint_names(full.out) == ["checkpoint-0000002", "checkpoint-0000004"]
    return full


def _killed_copy(full_run, name: str, step: int):
    """What a run killed after its step-``step`` checkpoint leaves: run.json, checkpoints, metrics."""
    target = full_run.root / name
    target.mkdir()
    shutil.copy(full_run.out / "run.json", target / "run.json")
    for folder in checkpoint_names(full_run.out):
        if int(folder.split("-")[1]) <= step:
            shutil.copytree(full_run.out / folder, target / folder)
    rows = [row for row in read_metrics(full_run.out) if row["step"] <= step]
    (target / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def _resume(full_run, folder, *extra):
    return main(
        train_args(
            full_run.model,
            full_run.data,
            folder,
            *RUN,
            "--cache-dir",
            str(full_run.cache),
            "--resume",
            *extra,
        )
    )


def _assert_same_result(expected, actual):
    assert [row["step"] for row in read_metrics(actual)] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(read_metrics(expected), read_metrics(actual)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), a["step"]
    want, got = load_file(expected / "model.safetensors"), load_file(actual / "model.safetensors")
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)


# --- 1. an output folder belongs to one run ------------------------------------------------------


def test_a_different_run_into_a_used_folder_is_refused_and_overwrite_gives_a_clean_run(full_run, capsys):
    used = shutil.copytree(full_run.out, full_run.root / "reused")
    other = ("--max-steps", "2", "--save-steps", "1", "--objective", "mio", "--seed", "7")
    assert main(train_args(full_run.model, full_run.data, used, *other)) == 2
    err = capsys.readouterr().err
    assert "already holds another run" in err and "--overwrite" in err and "Traceback" not in err
    assert json.loads((used / "run.json").read_text())["objective"] == "dpo"  # untouched
    assert checkpoint_names(used) == ["checkpoint-0000002", "checkpoint-0000004"]

    (used / "notes.txt").write_text("mine")  # not a run file: --overwrite keeps it
    assert main(train_args(full_run.model, full_run.data, used, *other, "--overwrite")) == 0
    assert (used / "notes.txt").read_text() == "mine"
    summary = json.loads((used / "summary.json").read_text())
    assert summary["objective"] == "mio" and summary["steps"] == 2 and summary["resumed_from_step"] == 0
    assert checkpoint_names(used) == ["checkpoint-0000001"]  # its own, not outranked by the old run's
    assert [row["step"] for row in read_metrics(used)] == [1, 2]
    assert read_metrics(used)[0]["loss"] == pytest.approx(LOG4, abs=1e-5)  # a fresh start: policy = reference


def test_resume_with_a_changed_defining_option_is_refused_naming_it(full_run, capsys):
    folder = _killed_copy(full_run, "changed", 4)
    args = train_args(full_run.model, full_run.data, folder, *RUN, "--objective", "mio", "--resume")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--objective 'dpo' -> 'mio'" in err and "options differ" in err
    assert not (folder / "summary.json").exists()


def test_a_second_process_is_kept_out_by_the_lock(full_run, capsys):
    from miopt.run.run_folder import RunFolder
    from miopt.training.preference import TrainOptions

    folder = full_run.root / "locked"
    holder = RunFolder(TrainOptions(output_dir=str(folder), data=str(full_run.data)))
    holder.start()  # the first process, still running
    try:
        assert main(train_args(full_run.model, full_run.data, folder, "--max-steps", "1", "--resume")) == 2
        assert "in use by another miopt process" in capsys.readouterr().err
    finally:
        holder.close()
    assert not (folder / "metrics.jsonl").exists()


def test_resume_without_a_checkpoint_starts_from_scratch_and_removes_stale_temporaries(full_run, capsys):
    folder = full_run.root / "requeued"
    (folder / ".checkpoint-0000009.abc.tmp").mkdir(parents=True)
    (folder / ".final-model.xyz.tmp").mkdir()
    assert main(train_args(full_run.model, full_run.data, folder, "--max-steps", "2", "--resume")) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    assert [row["step"] for row in read_metrics(folder)] == [1, 2]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --- 2. the non-finite guard -----------------------------------------------------------------------


def test_a_nan_loss_stops_the_run_before_the_step_keeping_the_last_good_checkpoint(
    full_run, monkeypatch, capsys
):
    import miopt.training.preference as train_module

    original = train_module.make_step_function
    calls = {"n": 0}

    def poisoned(*a, **k):
        step = original(*a, **k)

        def wrapped(model, indices):
            calls["n"] += 1
            loss, metrics = step(model, indices)
            return (loss * float("nan") if calls["n"] == 4 else loss), metrics  # step 4 of 1 micro-step each

        return wrapped

    monkeypatch.setattr(train_module, "make_step_function", poisoned)
    out = full_run.root / "nan"
    extra = ("--max-steps", "6", "--save-steps", "1", "--save-total-limit", "2")
    assert main(train_args(full_run.model, full_run.data, out, *extra)) == 2
    err = capsys.readouterr().err
    assert "step 4: non-finite loss" in err and "checkpoint-0000003" in err and "Traceback" not in err
    assert checkpoint_names(out) == ["checkpoint-0000002", "checkpoint-0000003"]
    weights = load_file(out / "checkpoint-0000003" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3]


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(3.15e38))  # near float32's largest, 3.4e38


def test_weights_that_overflow_are_never_checkpointed(tmp_path):
    """Finite losses and gradients, but an AdamW update (about lr = 1e37 a step) that overflows the
    weight to inf at step 3: no checkpoint of it, the step-2 one is kept (not pruned), the run stops."""
    from miopt.run.loop import LoopOptions, NonFiniteError, run_loop

    options = LoopOptions(output_dir=str(tmp_path), max_steps=8, batch_size=1, learning_rate=1e37,
                          lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0, save_steps=1,
                          save_total_limit=1, progress=False)  # fmt: skip
    with pytest.raises(NonFiniteError, match="weights are no longer finite"):
        run_loop(options, model=_Scalar(), num_examples=4, step_fn=lambda model, idx: (-model.weight, {}))
    assert checkpoint_names(tmp_path) == ["checkpoint-0000002"]


# --- 3. checkpoints that survive damage --------------------------------------------------------------


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one_and_ends_identical(full_run, capsys):
    folder = _killed_copy(full_run, "truncated", 4)
    weights = folder / "checkpoint-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert _resume(full_run, folder) == 0
    err = capsys.readouterr().err
    assert "skipping damaged" in err and "checkpoint-0000004" in err and "model.safetensors" in err
    assert json.loads((folder / "summary.json").read_text())["resumed_from_step"] == 2
    _assert_same_result(full_run.out, folder)


def test_checkpoint_manifest_and_rng_state_are_verified(full_run, tmp_path):
    from miopt.run.checkpoint import CheckpointError, checkpoint_problem, resume_checkpoint

    source = full_run.out / "checkpoint-0000004"
    listed = json.loads((source / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"} <= set(listed)
    assert checkpoint_problem(source) is None

    flipped = shutil.copytree(source, tmp_path / "checkpoint-0000004")
    data = bytearray((flipped / "optimizer.bin").read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes
    (flipped / "optimizer.bin").write_bytes(bytes(data))
    assert checkpoint_problem(flipped) == "optimizer.bin does not match its checksum"
    with pytest.raises(CheckpointError, match="damaged: optimizer.bin"):
        resume_checkpoint(tmp_path, str(flipped))

    legacy = shutil.copytree(source, tmp_path / "legacy")  # no manifest: the RNG state is still checked
    (legacy / "manifest.json").unlink()
    (legacy / "random_states_0.pkl").write_bytes(b"\x80\x04garbage")
    assert "random_states_0.pkl is unreadable" in checkpoint_problem(legacy)


# --- 4. caches that survive damage ---------------------------------------------------------------------


def test_a_corrupted_reference_cache_entry_is_named_discarded_and_recomputed(full_run, tmp_path, capsys):
    from miopt.logprobs.reference import decode_entry

    cache = tmp_path / "cache"
    run = ("--max-steps", "1", "--objective", "mio", "--cache-dir", str(cache))
    assert main(train_args(full_run.model, full_run.data, tmp_path / "a", *run)) == 0
    (entry,) = (cache / "reference").glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-4:] = torch.tensor([float("nan")]).numpy().tobytes()  # one value of the last tensor
    entry.write_bytes(bytes(data))
    assert decode_entry(bytes(data))[0] is None
    capsys.readouterr()

    assert main(train_args(full_run.model, full_run.data, tmp_path / "b", *run)) == 0
    err = capsys.readouterr().err
    assert f"reference cache {entry}" in err and "discarded, recomputing" in err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["reference_cached"] is False
    assert read_metrics(tmp_path / "b")[0]["loss"] == pytest.approx(LOG4, abs=1e-5)  # exact reference again
    logps, problem = decode_entry(entry.read_bytes())
    assert logps is not None and problem == ""


def test_reference_cache_entries_are_checked_for_shape_and_finite_values():
    from miopt.logprobs.reference import ReferenceLogps, decode_entry, encode_entry

    good = ReferenceLogps(torch.tensor([-1.0, -2.0]), torch.tensor([[-3.0], [-4.0]]))
    assert decode_entry(encode_entry(good), (2, 1))[0] is not None
    assert "not the data's (3, 1)" in decode_entry(encode_entry(good), (3, 1))[1]
    bad = ReferenceLogps(torch.tensor([-1.0, float("nan")]), torch.tensor([[-3.0], [-4.0]]))
    assert "NaN" in decode_entry(encode_entry(bad))[1]  # a consistent checksum does not make NaN usable
    assert "unreadable" in decode_entry(b"\x00" * 5)[1]
    # LD-DPO's tail sums travel with the entry, under the same checks
    tails = torch.tensor([-0.5, 0.0]), torch.tensor([[-1.0], [-2.0]])
    logps, problem = decode_entry(encode_entry(ReferenceLogps(good.chosen, good.rejected, *tails)), (2, 1))
    assert problem == "" and torch.equal(logps.rejected_tail, tails[1])
    chosen, rejected = logps.select([1, 0], 1, ld_alpha=0.25)  # summed - (1 - alpha) * tail
    assert chosen.tolist() == [-2.0, -1.0 + 0.75 * 0.5] and rejected.tolist() == [[-4.0 + 1.5], [-3.0 + 0.75]]
    misshapen = ReferenceLogps(good.chosen, good.rejected, torch.zeros(3), tails[1])
    assert "tail sums do not have the shapes" in decode_entry(encode_entry(misshapen))[1]
    with pytest.raises(ValueError, match="no tail sums"):
        good.select([0], 1, ld_alpha=0.5)


# --- 5. a torn metrics line ------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_on_resume(full_run, capsys):
    folder = _killed_copy(full_run, "torn", 4)
    with (folder / "metrics.jsonl").open("a") as file:
        file.write('{"step": 5, "loss": 0.69')  # cut by a full disk
    assert _resume(full_run, folder) == 0
    assert "dropped a torn last line" in capsys.readouterr().err
    _assert_same_result(full_run.out, folder)


def test_online_refuses_a_used_folder_unless_overwrite(tmp_path):
    from miopt.errors import OptionError
    from miopt.online.options import OnlineOptions
    from miopt.online.output import ROUNDS_FILE, prepare_output

    folder = tmp_path / "online"
    folder.mkdir()
    (folder / ROUNDS_FILE).write_text('{"round": 0}\n')
    with pytest.raises(OptionError, match="--overwrite to replace it"):
        prepare_output(OnlineOptions(output_dir=str(folder)))
    assert prepare_output(OnlineOptions(output_dir=str(folder), overwrite=True)) == (None, [], -1)
    assert not (folder / ROUNDS_FILE).exists()


def test_sft_claims_its_folder_too(small_model_dir, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": " yes"}) + "\n" for i in range(8)))
    out = tmp_path / "sft"
    args = ["sft", "--model", str(small_model_dir), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "1", "--batch-size", "4", "--progress", "false"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "run.json").read_text())["learning_rate"] == 2e-5
    assert main([*args, "--learning-rate", "1e-3"]) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert main([*args, "--learning-rate", "1e-3", "--resume"]) == 2
    assert "--learning-rate 2e-05 -> 0.001" in capsys.readouterr().err


def test_resume_compares_data_by_contents_not_by_path(tmp_path):
    from miopt.errors import OptionError
    from miopt.run.run_folder import RunFolder
    from miopt.training.preference import TrainOptions

    first, moved = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    moved.write_bytes(first.read_bytes())
    out = tmp_path / "run"
    with RunFolder(TrainOptions(output_dir=str(out), data=str(first))) as folder:
        folder.start()
    with RunFolder(TrainOptions(output_dir=str(out), data=str(moved), resume="latest")) as folder:
        folder.check()  # the same data, moved: accepted
    moved.write_text('{"prompt": "p", "chosen": "a", "rejected": "c"}\n')
    with pytest.raises(OptionError, match="the data file's contents"):
        with RunFolder(TrainOptions(output_dir=str(out), data=str(moved), resume="latest")) as folder:
            folder.check()

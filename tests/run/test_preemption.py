"""SIGTERM and SIGINT stop a run after the optimizer step under way, with a checkpoint, exit 143 / 130,
and ``--resume latest`` then ends bit-identical to an uninterrupted run (docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miopt.cli import main
from miopt.run.checkpoint import checkpoint_problem
from miopt.run.preemption import Interrupted, StopSignals
from tests.helpers import checkpoint_names, read_metrics, train_args, uninterrupted_run

ROOT = Path(__file__).resolve().parents[2]
# Six optimizer steps of two micro-steps each, a checkpoint every two steps (all kept).
RUN = ("--max-steps", "6", "--save-steps", "2", "--save-total-limit", "0", "--objective", "dpo",
       "--seed", "3", "--gradient-accumulation-steps", "2")  # fmt: skip


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run every stopped-and-resumed run must equal."""
    return uninterrupted_run(tmp_path_factory.mktemp("preemption"), RUN)


def _train(full, out, *extra):
    return main(train_args(full.model, full.data, out, *RUN, "--cache-dir", str(full.cache), *extra))


def _signal_at_micro_step(monkeypatch, signum: int, micro_step: int) -> None:
    """The step function sends ``signum`` to this process during micro-step ``micro_step`` (from 1)."""
    import miopt.training.preference as train_module

    original, calls = train_module.make_step_function, {"n": 0}

    def signalling(*a, **k):
        step = original(*a, **k)

        def wrapped(model, indices):
            calls["n"] += 1
            if calls["n"] == micro_step:
                os.kill(os.getpid(), signum)
            return step(model, indices)

        return wrapped

    monkeypatch.setattr(train_module, "make_step_function", signalling)


def _assert_identical(expected: Path, actual: Path) -> None:
    """Every metrics row and every weight equal, bit for bit."""
    assert read_metrics(actual) == [
        {**row, "pairs_per_second": got["pairs_per_second"]}
        for row, got in zip(read_metrics(expected), read_metrics(actual))
    ]
    want, got = load_file(expected / "model.safetensors"), load_file(actual / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())


def test_signals_are_deferred_then_ignored_then_abort_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT and stop.count == 1
        with StopSignals() as inner:  # nested: the same, counting on
            assert inner is stop
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.count == 2 and stop.received == signal.SIGINT
        with pytest.raises(Interrupted) as aborted:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs before this returns
    assert aborted.value.aborted and aborted.value.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_finishes_the_step_checkpoints_exits_143_and_resume_is_identical(full, monkeypatch, capsys):
    out = full.root / "sigterm"
    _signal_at_micro_step(monkeypatch, signal.SIGTERM, 5)  # first micro-step of step 3
    assert _train(full, out) == 143
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "stopped by SIGTERM" in line)
    assert f"stopped by SIGTERM after step 3; checkpoint {out / 'checkpoint-0000003'}" in line
    assert line.endswith("--resume latest") and "Traceback" not in err
    assert checkpoint_names(out) == ["checkpoint-0000002", "checkpoint-0000003"]
    assert checkpoint_problem(out / "checkpoint-0000003") is None
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3]  # step 3 ran to its end
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handlers are gone again

    monkeypatch.undo()
    assert _train(full, out, "--resume", "latest") == 0
    assert "checkpoint-0000003 (step 3)" in capsys.readouterr().err
    _assert_identical(full.out, out)


def test_sigint_on_a_save_step_exits_130_with_that_checkpoint_written_once(full, monkeypatch, capsys):
    out = full.root / "sigint"
    _signal_at_micro_step(monkeypatch, signal.SIGINT, 8)  # last micro-step of step 4, a save step
    assert _train(full, out) == 130
    err = capsys.readouterr().err
    assert f"stopped by SIGINT after step 4; checkpoint {out / 'checkpoint-0000004'}" in err
    assert checkpoint_names(out) == ["checkpoint-0000002", "checkpoint-0000004"]
    monkeypatch.undo()
    assert _train(full, out, "--resume") == 0
    _assert_identical(full.out, out)


def test_a_third_signal_aborts_the_save_and_leaves_no_temporary(full, monkeypatch, capfd):
    import miopt.run.checkpoint as checkpoint_module

    out = full.root / "aborted"
    _signal_at_micro_step(monkeypatch, signal.SIGTERM, 5)
    original = checkpoint_module.write_manifest

    def signalled_twice(folder):
        if folder.name.startswith(".checkpoint-0000003"):
            os.kill(os.getpid(), signal.SIGTERM)  # the second: ignored
            os.kill(os.getpid(), signal.SIGTERM)  # the third: aborts
        return original(folder)

    monkeypatch.setattr(checkpoint_module, "write_manifest", signalled_twice)
    assert _train(full, out) == 143
    err = capfd.readouterr().err  # the handler's notes go straight to file descriptor 2
    assert "ignored while the run stops cleanly" in err and "aborted by a third SIGTERM" in err
    assert checkpoint_names(out) == ["checkpoint-0000002"]
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]
    assert checkpoint_problem(out / "checkpoint-0000002") is None


def test_a_signal_during_the_final_save_waits_for_it(full, monkeypatch, capsys):
    import miopt.training.preference as train_module

    out = full.root / "final"
    original = train_module.save_model

    def interrupted_save(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)

    monkeypatch.setattr(train_module, "save_model", interrupted_save)
    assert _train(full, out) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after the run finished" in err and "--resume" not in err.splitlines()[-1]
    assert (out / "summary.json").is_file()
    _assert_identical(full.out, out)


def test_sigterm_before_training_is_one_line_and_exit_143(full, monkeypatch, capsys):
    import miopt.training.preference as train_module

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)

    monkeypatch.setattr(train_module, "load_examples", killed)
    assert _train(full, full.root / "early") == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM outside the training steps" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_to_a_real_process_then_resume_equals_uninterrupted(full, tmp_path, capsys):
    """``miopt train`` in a subprocess, SIGTERM once it has logged a few steps: exit 143 and a checkpoint
    of the step it logged last; resumed to the end it equals a run never interrupted."""
    steps = ("--max-steps", "12", "--save-steps", "0", "--objective", "dpo", "--seed", "3")
    reference = tmp_path / "reference"
    common = ("--cache-dir", str(full.cache))
    assert main(train_args(full.model, full.data, reference, *steps, *common)) == 0
    out = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "miopt", *train_args(full.model, full.data, out, *steps, *common)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    stopped_at = read_metrics(out)[-1]["step"]
    assert 2 <= stopped_at < 12
    assert checkpoint_names(out) == [f"checkpoint-{stopped_at:07d}"]
    assert f"stopped by SIGTERM after step {stopped_at}" in err and "Traceback" not in err
    assert main(train_args(full.model, full.data, out, *steps, *common, "--resume", "latest")) == 0
    _assert_identical(reference, out)


WORKER = """
import os, signal, sys
import torch
from miopt.run.loop import LoopOptions, run_loop
from miopt.run.preemption import Preempted

class Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def forward(self):
        return ((self.weight - 1.0) ** 2).sum()

rank, calls = int(os.environ["RANK"]), {"n": 0}

def step(model, indices):
    calls["n"] += 1
    if rank == 1 and calls["n"] == 3:  # only the second process is signalled, during step 3
        os.kill(os.getpid(), signal.SIGTERM)
    return model() * len(indices), {}

options = LoopOptions(output_dir=sys.argv[1], max_steps=8, batch_size=1, learning_rate=0.1, progress=False)
try:
    run_loop(options, model=Quadratic(), num_examples=8, step_fn=step)
except Preempted as stop:
    print(f"rank {rank}: stopped after step {stop.step}, exit {stop.exit_status}", flush=True)
    sys.exit(stop.exit_status)
"""


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    from tests.run.test_distributed import ACCELERATE_CONFIGS, _free_port

    script, out = tmp_path / "worker.py", tmp_path / "run"
    script.write_text(WORKER)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()), str(script), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "rank 0: stopped after step 3, exit 143" in done.stdout, done.stderr[-3000:]
    assert "rank 1: stopped after step 3, exit 143" in done.stdout
    assert checkpoint_names(out) == ["checkpoint-0000003"]
    assert {p.name for p in (out / "checkpoint-0000003").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert checkpoint_problem(out / "checkpoint-0000003") is None

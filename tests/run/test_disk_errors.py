"""A full disk or a refused write (ENOSPC, EDQUOT, EROFS, EACCES, EFBIG) during a checkpoint, a metrics
row or an output file: one located line, exit 1, no temporary left, and the folder exactly as it was,
so ``--resume latest`` continues from the last good checkpoint (docs/reliability.md)."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miopt.cli import main
from miopt.errors import WriteError
from miopt.run.atomic_io import atomic_write_text, format_bytes
from miopt.run.checkpoint import checkpoint_bytes
from tests.helpers import checkpoint_names, read_metrics, train_args, uninterrupted_run
from tests.run.test_preemption import _assert_identical
from tests.run.test_resume_and_run_folder import RUN

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted run: six steps, checkpoints at steps 2 and 4."""
    return uninterrupted_run(tmp_path_factory.mktemp("disk"), RUN)


def _train(full, out, *extra):
    return main(train_args(full.model, full.data, out, *RUN, "--cache-dir", str(full.cache), *extra))


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` but a save's temporary, with its SHA-256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.endswith(".tmp") for part in path.relative_to(folder).parts)
    }


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


class _Disk:
    """``shutil.disk_usage`` of a disk with plenty of room until :meth:`fill` is called."""

    def __init__(self, monkeypatch) -> None:
        self.free, real = 10**12, shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=self.free))

    def fill(self, left: int = 0) -> None:
        self.free = left


@pytest.mark.parametrize("failure", ["ENOSPC", "torch"])
def test_a_full_disk_during_a_checkpoint_keeps_the_folder_as_it_was(full, monkeypatch, capsys, failure):
    """The step-4 checkpoint's optimizer.bin hits a full disk: as an OSError, or as torch's writer
    reports it (a RuntimeError without errno, recognised by the free space left)."""
    out = full.root / f"full-disk-{failure}"
    disk, real_save, before = _Disk(monkeypatch), torch.save, {}

    def save(obj, f, *args, **kwargs):
        if ".checkpoint-0000004." in str(f) and str(f).endswith("optimizer.bin"):
            before.update(_snapshot(out))
            Path(f).write_bytes(b"\0" * 4096)  # what fitted before the disk was full
            disk.fill()
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3862")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert _train(full, out) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert f"cannot write {out / 'checkpoint-0000004'} (optimizer.bin): No space left on device" in line
    assert f"the newest checkpoint, {out / 'checkpoint-0000002'}, and everything written before" in line
    assert _snapshot(out) == before and not _leftovers(out)
    assert checkpoint_names(out) == ["checkpoint-0000002"]

    monkeypatch.undo()  # space freed: the run continues from step 2 and ends as if never stopped
    assert _train(full, out, "--resume", "latest") == 0
    _assert_identical(full.out, out)


def test_a_refused_metrics_row_is_cut_off_and_the_run_resumes(full, monkeypatch, capsys):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the metrics file's descriptor")
    out = full.root / "quota"
    real_write, before = os.write, {}

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}") if fd > 2 else ""
        if target.endswith("metrics.jsonl") and b'"step": 5,' in bytes(data):
            before.update(_snapshot(out))
            real_write(fd, bytes(data)[:12])  # a torn start of the row, then the quota is reached
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    assert _train(full, out) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"cannot write {out / 'metrics.jsonl'}: {os.strerror(errno.EDQUOT)}" in err
    assert "keeps its rows before step 5" in err and "checkpoint-0000004" in err and "Traceback" not in err
    assert _snapshot(out) == before and not _leftovers(out)
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4]  # no torn line
    assert _train(full, out, "--resume") == 0
    _assert_identical(full.out, out)


def test_too_little_space_for_a_checkpoint_is_refused_before_training_with_the_size(
    full, monkeypatch, capsys
):
    from transformers import AutoModelForCausalLM

    needed = checkpoint_bytes(AutoModelForCausalLM.from_pretrained(full.model))
    actual = sum(p.stat().st_size for p in (full.out / "checkpoint-0000002").iterdir())
    assert actual <= needed <= actual + (2 << 20)  # the estimate is an upper bound, close to it
    _Disk(monkeypatch).fill(1000)
    out = full.root / "small-disk"
    assert _train(full, out) == 1
    err = capsys.readouterr().err
    assert (
        f"not enough space for a checkpoint (weights and optimizer) in {out}: it needs about "
        f"{format_bytes(needed)}, 1.0 KB free" in err
    )
    assert not (out / "metrics.jsonl").exists() and not checkpoint_names(out) and not _leftovers(out)


def test_an_output_file_that_cannot_be_written_is_named_and_the_old_one_kept(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def read_only(fd):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "fsync", read_only)
    with pytest.raises(WriteError, match=f"cannot write {path}: Read-only file system; the previous"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_real_file_size_limit_fails_the_first_checkpoint_cleanly(full, tmp_path):
    """No root needed for a real refused write: RLIMIT_FSIZE (with SIGXFSZ ignored) makes the kernel
    refuse writes past 200 KB, between model.safetensors (147 KB) and optimizer.bin (306 KB)."""
    out = tmp_path / "limited"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = train_args(full.model, full.data, out, *RUN, "--cache-dir", str(full.cache))
    done = subprocess.run(
        [sys.executable, "-m", "miopt", *args],
        cwd=ROOT,
        env=env,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"cannot write {out / 'checkpoint-0000002'} (optimizer.bin): " in done.stderr
    assert "no checkpoint was written yet" in done.stderr
    assert not checkpoint_names(out) and not _leftovers(out)
    assert [row["step"] for row in read_metrics(out)] == [1, 2]

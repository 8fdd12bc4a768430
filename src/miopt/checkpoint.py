"""Atomic files and checkpoints: nothing already written is lost when a run is killed.

Every file is written to a temporary name in its final folder and then renamed over the
target (``os.replace`` is atomic on POSIX). A checkpoint folder is written in full under a
temporary name, its files fsynced, a manifest of their sizes and SHA-256 checksums written
last, and only then renamed, so ``latest_checkpoint`` only ever sees whole ones; on resume the
manifest is verified and a damaged checkpoint is skipped for the newest intact one
(docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from miopt.errors import MioptError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RNG_STATE_PREFIX = "random_states_"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_directory(final: str | Path) -> Path:
    """A fresh temporary sibling folder of ``final``; pass it to :func:`commit_directory` when full."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))


def commit_directory(temporary: Path, final: str | Path) -> None:
    """Replace ``final`` by ``temporary`` (an existing ``final`` is removed only after the rename)."""
    final = Path(final)
    stale = None
    if final.exists():
        stale = final.with_name(f".{final.name}.old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(temporary, final)
    _fsync_path(final.parent)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def move_files_into(source: Path, destination: Path) -> None:
    """Move every file of ``source`` into ``destination`` one atomic rename at a time."""
    destination.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        target = destination / item.name
        if item.is_dir():
            commit_directory(item, target)
        else:
            os.replace(item, target)
    shutil.rmtree(source, ignore_errors=True)


@contextlib.contextmanager
def cache_lock(final: str | Path) -> Iterator[None]:
    """An exclusive lock for building the cache entry ``final``: a second process that wants the
    same entry waits, then finds it built, instead of training it again beside the first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the atomic rename still keeps the entry whole
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    found = [p for p in found if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


class CheckpointError(MioptError):
    """A checkpoint that cannot be used; the message names the folder and what is wrong."""


def _fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; a folder that refuses is skipped."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        handle = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(folder: Path) -> None:
    """fsync every file under ``folder``, then write ``manifest.json`` (size and SHA-256 of each)
    last, so a manifest only ever describes data already on disk."""
    files = {}
    for path in _data_files(folder):
        _fsync_path(path)
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        _fsync_path(sub)
    atomic_write_json(folder / MANIFEST_FILE, {"files": files})
    _fsync_path(folder)


def checkpoint_problem(folder: Path, process_index: int | None = None) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from, or None when it is intact: its manifest
    (every file present with its size and checksum) and the RNG state of ``process_index`` (or of
    every process) that Accelerate would otherwise skip with an INFO line."""
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file():
        try:
            listed = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{MANIFEST_FILE} is damaged"
        for name, entry in listed.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != entry.get("bytes"):
                return f"{name} has {size} bytes, the manifest says {entry.get('bytes')}"
            if file_sha256(path) != entry.get("sha256"):
                return f"{name} does not match its checksum"
    rng_files = sorted(folder.glob(f"{RNG_STATE_PREFIX}*.pkl"))
    if process_index is not None:
        rng_files = [folder / f"{RNG_STATE_PREFIX}{process_index}.pkl"]
    if not rng_files:
        return "no RNG state (random_states_*.pkl)"
    for path in rng_files:
        if not path.is_file():
            return f"{path.name} is missing"
        try:
            import torch

            state = torch.load(path, weights_only=False)
            if not isinstance(state, dict) or "torch_manual_seed" not in state:
                return f"{path.name} holds no RNG state"
        except Exception as error:  # noqa: BLE001 - any unreadable pickle is damage
            return f"{path.name} is unreadable ({type(error).__name__})"
    return None


def resume_checkpoint(output_dir: Path, requested: str) -> Path | None:
    """The checkpoint to resume from: ``requested`` (a folder; it must be intact), or for 'latest'
    the newest intact one in ``output_dir``, saying which damaged ones were skipped and why.
    None when ``output_dir`` holds no checkpoint at all; an error when none of them is intact."""
    if requested != "latest":
        folder = Path(requested)
        if not (folder / STATE_FILE).is_file():
            raise CheckpointError(f"--resume: {folder} is not a complete checkpoint")
        problem = checkpoint_problem(folder)
        if problem:
            raise CheckpointError(f"--resume: checkpoint {folder} is damaged: {problem}")
        return folder
    found = list_checkpoints(output_dir)
    skipped = []
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        skipped.append(f"{folder.name} ({problem})")
        print(f"--resume: skipping damaged {folder}: {problem}", file=sys.stderr, flush=True)
    if found:
        raise CheckpointError(
            f"--resume: no intact checkpoint in {output_dir}: {'; '.join(skipped)}; "
            "start again with --overwrite"
        )
    return None


def remove_stale_temporaries(output_dir: Path, prefix: str = ".") -> list[Path]:
    """Remove what a killed save left behind in ``output_dir``: hidden ``*.tmp`` files and folders
    (``.checkpoint-*.tmp``, ``.final-model.*.tmp``, ...) and ``*.old`` folders whose names start
    with ``prefix``; call only while no other process writes there (the run folder's lock)."""
    removed: list[Path] = []
    if not Path(output_dir).is_dir():
        return removed
    for path in Path(output_dir).iterdir():
        if path.name.startswith(prefix) and path.name.startswith(".") and path.suffix in (".tmp", ".old"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class _SharedTensorNote(logging.Filter):
    """Drops Accelerate's warning that a tensor sharing storage with another (tied input and output
    embeddings) was left out of the safetensors file: a checkpoint is only ever loaded back into the
    same architecture, whose tie restores it (resume is bit-exact, tests/test_train.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """Model, optimizer, scheduler, RNG and registered states, under a temporary name: files
    fsynced, the manifest written last, then renamed; older checkpoints pruned only after that."""
    final = checkpoint_dir(output_dir, step)
    temporary = atomic_directory(final) if accelerator.is_main_process else None
    temporary = _broadcast_path(accelerator, temporary)
    accelerate_logger, note = logging.getLogger("accelerate.utils.other"), _SharedTensorNote()
    accelerate_logger.addFilter(note)
    try:
        accelerator.save_state(str(temporary))
    finally:
        accelerate_logger.removeFilter(note)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(temporary / STATE_FILE, {"step": step})
        write_manifest(temporary)
        commit_directory(temporary, final)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _broadcast_path(accelerator, path: Path | None) -> Path:
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    holder = [str(path) if path is not None else None]
    broadcast_object_list(holder)
    return Path(holder[0])

"""Atomic files and checkpoints: nothing already written is lost when a run is killed.

Every file is written to a temporary name in its final folder and then renamed over the
target (``os.replace`` is atomic on POSIX). A checkpoint folder is written in full under a
temporary name, its files fsynced, a manifest of their sizes and SHA-256 checksums written
last, and only then renamed, so ``latest_checkpoint`` only ever sees whole ones; on resume the
manifest is verified and a damaged checkpoint is skipped for the newest intact one
(docs/reliability.md).

A write that fails for the file system's sake (full disk, quota, read-only or forbidden folder) is
reported once, by :func:`writing`, as a :class:`~miopt.errors.WriteError` naming the file and what
was kept, with its temporaries removed; :func:`check_free_space` refuses a checkpoint that cannot fit
before any of it is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miopt.errors import MioptError, WriteError
from miopt.run.atomic_io import (
    _fsync_path,
    atomic_directory,
    atomic_write_json,
    check_free_space,
    commit_directory,
    file_sha256,
    writing,
)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RNG_STATE_PREFIX = "random_states_"
# Overhead of a checkpoint beyond weights and optimizer state: RNG states, scheduler, manifest.
CHECKPOINT_OVERHEAD = 1 << 20


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
    same architecture, whose tie restores it (resume is bit-exact, tests/training/test_preference.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def checkpoint_bytes(model, *, optimizer: bool = True) -> int:
    """About how large a checkpoint of ``model`` (before ``accelerator.prepare``) is: weights and
    buffers, AdamW's two moments of every trainable parameter (in its dtype) and the small files; with
    ``optimizer`` False, the weights alone (the final model)."""
    weights = moments = 0
    for parameter in model.parameters():
        size = int(getattr(parameter, "ds_numel", parameter.numel())) * parameter.element_size()
        weights += size
        if parameter.requires_grad:
            moments += 2 * size
    weights += sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    return weights + moments + CHECKPOINT_OVERHEAD if optimizer else weights


def checkpoint_space(output_dir: str | Path, estimate: int | None) -> int | None:
    """Bytes the next checkpoint needs: the size of the newest one when there is one, else ``estimate``."""
    newest = latest_checkpoint(output_dir)
    if newest is None:
        return estimate
    with contextlib.suppress(OSError):
        return sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    return estimate


def kept_note(output_dir: str | Path) -> str:
    """What a failed write left for the user: the newest checkpoint and the files written before."""
    newest = latest_checkpoint(output_dir)
    where = (
        f"the newest checkpoint, {newest}, and everything written before are unchanged"
        if newest
        else "no checkpoint was written yet; everything written before is unchanged"
    )
    return f"{where}; continue with --resume latest once {output_dir} can be written again"


def save_checkpoint(
    accelerator, output_dir: Path, step: int, keep: int, expected_bytes: int | None = None
) -> Path:
    """Model, optimizer, scheduler, RNG and registered states, under a temporary name: files
    fsynced, the manifest written last, then renamed; older checkpoints pruned only after that.

    Refused before anything is written when the file system has less free space than the newest
    checkpoint's size (``expected_bytes`` for the first); a write that fails removes the temporary
    folder and raises WriteError on every process, leaving older checkpoints as they were."""
    output_dir = Path(output_dir)
    final = checkpoint_dir(output_dir, step)
    main = accelerator.is_main_process
    needed = checkpoint_space(output_dir, expected_bytes) if main else None
    kept = f"nothing of it was written; {kept_note(output_dir)}" if main else ""

    def prepare() -> Path | None:
        if not main:
            return None
        if needed:
            check_free_space(output_dir, needed, f"checkpoint {final.name}", kept=kept)
        with writing(final, kept=kept):
            return atomic_directory(final)

    temporary = _broadcast_path(accelerator, on_every_rank(accelerator, prepare))
    failed_kept = f"its partial files were removed; {kept_note(output_dir)}" if main else ""

    def save_state() -> None:
        accelerate_logger, note = logging.getLogger("accelerate.utils.other"), _SharedTensorNote()
        accelerate_logger.addFilter(note)
        try:
            with writing(final, kept=failed_kept, needed=needed, remove=temporary if main else None):
                accelerator.save_state(str(temporary))
        finally:
            accelerate_logger.removeFilter(note)

    def commit() -> None:
        if main:
            with writing(final, kept=failed_kept, needed=needed, remove=temporary):
                atomic_write_json(temporary / STATE_FILE, {"step": step})
                write_manifest(temporary)
                commit_directory(temporary, final)
            prune_checkpoints(output_dir, keep)

    try:
        on_every_rank(accelerator, save_state)
        on_every_rank(accelerator, commit)
    except BaseException:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def on_every_rank(accelerator, work: Callable[[], Any]) -> Any:
    """``work()`` on every process; when it fails on one it fails on all (there with a MioptError
    naming that process), so no process waits forever for a partner that gave up."""
    if accelerator.num_processes == 1:
        return work()
    from accelerate.utils import gather_object

    try:
        result, failure = work(), None
    except Exception as error:  # noqa: BLE001 - re-raised below, after every process has reported
        result, failure = None, error
    report = None if failure is None else (isinstance(failure, WriteError), str(failure))
    reports = gather_object([report])
    if failure is not None:
        raise failure
    for rank, other in enumerate(reports):
        if other is not None:
            write, text = other
            raise (WriteError if write else MioptError)(f"process {rank}: {text}")
    return result


def _broadcast_path(accelerator, path: Path | None) -> Path:
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    holder = [str(path) if path is not None else None]
    broadcast_object_list(holder)
    return Path(holder[0])

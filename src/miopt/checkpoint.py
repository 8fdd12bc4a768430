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
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from miopt.errors import MioptError, WriteError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RNG_STATE_PREFIX = "random_states_"
# Overhead of a checkpoint beyond weights and optimizer state: RNG states, scheduler, manifest.
CHECKPOINT_OVERHEAD = 1 << 20
# errno values that mean "this file system will not take the write", not a bug.
WRITE_ERRNOS = frozenset(
    code
    for code in (
        errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
        errno.EIO,
    )
    if code is not None
)  # fmt: skip
# How torch's zip writer and safetensors report a failed write (neither raises OSError).
_TORCH_WRITE_FAILURE = re.compile(
    r"inline_container\.cc|PytorchStreamWriter failed writing|file write failed"
)
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_SPACE_PROBLEMS = frozenset(
    os.strerror(code) for code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
)


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def free_bytes(folder: str | Path) -> int | None:
    """Free space on the file system of ``folder`` (of its nearest existing parent); None if unknown."""
    for part in (Path(folder), *Path(folder).parents):
        if part.exists():
            try:
                return shutil.disk_usage(part).free
            except OSError:
                return None
    return None


def write_problem(
    error: BaseException, folder: str | Path | None = None, needed: int | None = None
) -> str | None:
    """What a failed write says about the file system (``No space left on device``), or None when
    ``error`` is not a write failure. torch's writer loses the errno: a full disk is recognised by
    the free space left in ``folder`` (less than ``needed``, or none)."""
    seen: BaseException | None = error
    for _ in range(4):  # the error and what it was raised from
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return os.strerror(seen.errno)
        code = _OS_ERROR_CODE.search(str(seen))
        if code and int(code.group(1)) in WRITE_ERRNOS:
            return os.strerror(int(code.group(1)))
        if _TORCH_WRITE_FAILURE.search(str(seen)):
            free = free_bytes(folder) if folder is not None else None
            if free is not None and free < max(needed or 0, 1 << 16):
                return os.strerror(errno.ENOSPC)
            return f"the write failed ({str(seen).splitlines()[0].strip()})"
        seen = seen.__cause__ or seen.__context__
    return None


def _newest_file(folder: Path) -> Path | None:
    """The file written last under ``folder``: the one a writer that names no file failed on."""
    try:
        files = [p for p in folder.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None


@contextlib.contextmanager
def writing(
    target: str | Path,
    *,
    kept: str | Callable[[], str],
    needed: int | None = None,
    remove: Path | None = None,
) -> Iterator[None]:
    """The one translation of write failures: an error of the file system in the block becomes a
    WriteError ``cannot write TARGET (FILE): PROBLEM (needed/free); KEPT``. ``remove`` (a temporary
    file or folder) is deleted on any failure, also on Ctrl-C; ``kept`` may be computed late."""
    try:
        yield
    except BaseException as error:
        failed = getattr(error, "filename", None)
        if failed is None and remove is not None and remove.is_dir():
            failed = _newest_file(remove)
        folder = remove.parent if remove is not None else Path(target).parent
        problem = None if isinstance(error, MioptError) else write_problem(error, folder, needed)
        free = free_bytes(folder)
        if remove is not None:
            if remove.is_dir():
                shutil.rmtree(remove, ignore_errors=True)
            else:
                remove.unlink(missing_ok=True)
        if problem is None:
            raise
        where = str(target)
        if failed is not None and Path(failed).name not in where:
            where += f" ({Path(failed).name})"
        sizes = []  # only where space is the problem (not for a read-only or forbidden folder)
        if problem in _SPACE_PROBLEMS and needed:
            sizes.append(f"needs about {format_bytes(needed)}")
        if problem in _SPACE_PROBLEMS and free is not None:
            sizes.append(f"{format_bytes(free)} free")
        size_note = f" ({', '.join(sizes)})" if sizes else ""
        note = kept() if callable(kept) else kept
        raise WriteError(f"cannot write {where}: {problem}{size_note}; {note}") from error


def check_free_space(folder: str | Path, needed: int, what: str, *, kept: str) -> None:
    """Refuse (WriteError) to start writing ``what`` of about ``needed`` bytes into ``folder`` when its
    file system has less free, before a byte of it is written."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise WriteError(
            f"not enough space for {what} in {folder}: it needs about {format_bytes(needed)}, "
            f"{format_bytes(free)} free; {kept}"
        )


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` into ``path`` whole or not at all: a temporary file in the same folder, fsynced, renamed."""
    path = Path(path)
    with writing(path, kept=f"the previous {path.name}, if any, is unchanged"):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with writing(path, kept=f"the previous {path.name}, if any, is unchanged", remove=Path(temporary)):
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)


def append_bytes(path: str | Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created if missing); on failure the file is cut back to its length
    before, so a full disk never leaves a torn line."""
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(handle).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view) :]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(handle, size)
            raise
    finally:
        os.close(handle)


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
    """Flush ``path`` (a file, or a folder's entries) to disk; a folder that refuses is skipped, a file
    that cannot be flushed (a full disk found late, an I/O error) is an error."""
    folder = path.is_dir()
    flags = os.O_RDONLY | (os.O_DIRECTORY if folder and hasattr(os, "O_DIRECTORY") else 0)
    try:
        handle = os.open(path, flags)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(handle)
    except OSError:
        if not folder:
            raise
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

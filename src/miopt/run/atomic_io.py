"""Atomic files and folders, and the one place a failed write becomes a located error.

Every file is written to a temporary name in its final folder, fsynced and renamed over the target
(``os.replace`` is atomic on POSIX); a folder is filled under a temporary name and renamed whole. A
write that fails for the file system's sake (full disk, quota, read-only or forbidden folder) is
reported once, by :func:`writing`, as a :class:`~miopt.errors.WriteError` naming the file and what
was kept, with its temporaries removed; :func:`check_free_space` refuses a write that cannot fit
before any of it is written. Checkpoints are built on these in :mod:`miopt.run.checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from miopt.errors import MioptError, WriteError

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


def _default_permissions() -> int:
    """What an ordinary ``open`` would give a new file (``mkstemp`` makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """The one atomic writer: ``write(file)`` fills a temporary file in ``path``'s folder, which is
    fsynced, given ordinary permissions and renamed onto ``path``; a reader sees the old file or the
    new one, never a part. A failed write is one located :class:`~miopt.errors.WriteError`, the
    temporary removed."""
    path = Path(path)
    with writing(path, kept=f"the previous {path.name}, if any, is unchanged"):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with writing(path, kept=f"the previous {path.name}, if any, is unchanged", remove=Path(temporary)):
            with os.fdopen(handle, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, _default_permissions())
            os.replace(temporary, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` into ``path`` whole or not at all (:func:`atomic_write_with`)."""
    atomic_write_with(path, lambda file: file.write(data))


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
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object a line, written whole (:func:`atomic_write_with`)."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


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

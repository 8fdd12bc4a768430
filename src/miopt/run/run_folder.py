"""An output folder belongs to one run (docs/reliability.md).

A run records its defining options (everything but what is safe to change on resume, plus a
fingerprint of the data's bytes) in ``run.json``. A new run into a folder that holds another
run's files is refused unless ``--overwrite`` (which removes them first); ``--resume`` is refused
when a defining option changed, naming each (a raised ``--max-steps`` under a constant learning
rate extends the run); a lock file (``.miopt.lock``, ``flock``) keeps a
second process out while one runs. Used by ``miopt train`` and ``miopt sft``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from miopt.errors import OptionError
from miopt.run.atomic_io import atomic_write_json
from miopt.run.checkpoint import CHECKPOINT_PREFIX, remove_stale_temporaries
from miopt.run.ranks import is_main_process

RUN_FILE = "run.json"
LOCK_FILE = ".miopt.lock"
# Options a resumed run may change: where and how often it logs and saves, how it shows progress,
# and memory knobs that leave the optimisation the same. Every other option defines the run.
SAFE_TO_CHANGE = frozenset(
    {
        "output_dir", "overwrite", "resume", "config", "logging_steps", "save_steps", "save_total_limit",
        "progress", "report_to", "cache_dir", "chosen_decline_warning", "skip_invalid",
        "gradient_checkpointing", "logprob_chunk",
    }
)  # fmt: skip
# Files that mark a folder as holding a run (miopt's outputs, or a model saved there).
_RUN_MARKERS = ("run.json", "metrics.jsonl", "summary.json", "model.safetensors", "adapter_model.safetensors")
# What a run writes (miopt's files, save_pretrained's model and tokenizer files, online rounds):
# all --overwrite removes; anything else in the folder is kept.
RUN_OUTPUTS = (
    "run.json", "metrics.jsonl", "summary.json", "curves.png", "tensorboard", f"{CHECKPOINT_PREFIX}*",
    "*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "config.json",
    "generation_config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "online.json", "rounds.jsonl", "round-*", "wandb", ".*.tmp", ".*.old",
)  # fmt: skip
# Options named first when describing a run.
_HEADLINE = ("objective", "model", "data", "seed", "learning_rate", "max_steps", "epochs")


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> None:
    """``path`` can be a folder: it is one, or it (and the part of it that exists) is not a file."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = "is a file" if part == path else f"is inside {part}, which is a file"
                raise OptionError(f"{flag} {path} {what}, not a folder")
            return


def source_fingerprint(source: str | None) -> str | None:
    """SHA-256 of a data file's bytes (of every file, by relative path, for a folder); the name
    itself for anything else (a hub id, 'arithmetic')."""
    if source is None:
        return None
    path = Path(source)
    if not path.exists():
        return f"name:{source}"
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:  # a folder's files by relative path; a single file by its bytes alone
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def remove_run_files(path: Path) -> None:
    """``--overwrite``: remove what a previous run wrote into ``path`` (:data:`RUN_OUTPUTS`), keeping
    anything else (and saying how much)."""
    removed, kept = 0, []
    for item in sorted(Path(path).iterdir()):
        if item.name == LOCK_FILE:
            continue
        if not any(fnmatch.fnmatchcase(item.name, pattern) for pattern in RUN_OUTPUTS):
            kept.append(item.name)
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
        removed += 1
    note = (
        f"; kept {len(kept)} other entries ({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''})"
        if kept
        else ""
    )
    print(f"--overwrite: removed {removed} entries of the previous run from {path}{note}", file=sys.stderr)


def run_identity(options: Any) -> dict[str, Any]:
    """The defining options of a run (JSON values), plus ``data_sha256`` of ``options.data``."""
    values = {
        field.name: getattr(options, field.name)
        for field in dataclasses.fields(options)
        if field.name not in SAFE_TO_CHANGE
    }
    values["data_sha256"] = source_fingerprint(getattr(options, "data", None))
    return json.loads(json.dumps(values, default=str))


def _describe(identity: dict[str, Any]) -> str:
    shown = [f"{key} {identity[key]}" for key in _HEADLINE if identity.get(key) is not None]
    return ", ".join(shown) or "unknown options"


def extends_constant_schedule(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """A raised ``--max-steps`` under a learning rate that does not depend on it (``--lr-scheduler
    constant``, ``--warmup-ratio 0``): the data order does not depend on it either, so the longer run's
    first steps are the stored run's and ``--resume`` may extend it."""
    before, after = stored.get("max_steps"), current.get("max_steps")
    return (
        current.get("lr_scheduler") == "constant"
        and current.get("warmup_ratio") == 0
        and isinstance(before, int)
        and isinstance(after, int)
        and 0 < before < after
    )


def _changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Changed defining options; an option only one side knows (a miopt version that added or
    dropped it) is not a change, nor is a moved data file with the same contents, nor a raised
    ``--max-steps`` under a constant schedule (:func:`extends_constant_schedule`)."""
    keys = sorted(set(stored) & set(current))
    if stored.get("data_sha256") == current.get("data_sha256") and not str(
        current.get("data_sha256")
    ).startswith("name:"):
        keys = [key for key in keys if key != "data"]
    if extends_constant_schedule(stored, current):
        keys = [key for key in keys if key != "max_steps"]
    return [
        f"--{key.replace('_', '-')} {stored.get(key)!r} -> {current.get(key)!r}"
        if key != "data_sha256"
        else "the data file's contents"
        for key in keys
        if stored.get(key) != current.get(key)
    ]


class RunFolder:
    """The output folder of one run, held under its lock from :meth:`check` (or :meth:`start`) until
    :meth:`close` (or process exit). Only the main process of a distributed run claims it."""

    def __init__(self, options: Any, *, main_process: bool | None = None) -> None:
        if main_process is None:  # rank 0 of a torchrun / accelerate launch job, or a single process
            main_process = is_main_process()
        self.path = Path(options.output_dir)
        self.resume, self.overwrite = bool(getattr(options, "resume", None)), bool(options.overwrite)
        self.identity = run_identity(options) if main_process else {}
        self.main_process = main_process
        self._lock_handle = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> RunFolder:
        """Before any work: refuse a folder that is a file, in use, or holds another run."""
        if not self.main_process:
            return self
        check_output_dir(self.path)
        if self.resume and self.overwrite:
            raise OptionError("--resume and --overwrite exclude each other (continue the run, or replace it)")
        if self.path.is_dir():
            self._lock()
            self._verify()
        return self

    def start(self) -> None:
        """Right before training: lock, check again, remove stale temporaries and (with --overwrite)
        the other run's files, then record this run's options in ``run.json``."""
        if not self.main_process:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        stored = self._verify()
        remove_stale_temporaries(self.path)
        if self.overwrite and self._holds_run():
            remove_run_files(self.path)
        if stored != self.identity:
            atomic_write_json(self.path / RUN_FILE, self.identity)

    def close(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the file releases the flock
            self._lock_handle = None

    def _holds_run(self) -> bool:
        if not self.path.is_dir():
            return False
        return any((self.path / name).exists() for name in _RUN_MARKERS) or any(
            p.name.startswith(CHECKPOINT_PREFIX) for p in self.path.iterdir()
        )

    def _stored(self) -> dict[str, Any] | None:
        try:
            stored = json.loads((self.path / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return stored if isinstance(stored, dict) else None

    def _verify(self) -> dict[str, Any] | None:
        """The stored identity when the folder may be used as asked; otherwise OptionError."""
        if not self._holds_run() or self.overwrite:
            return None
        stored = self._stored()
        if not self.resume:
            what = f"another run ({_describe(stored)})" if stored else "another run's files"
            raise OptionError(
                f"{self.path} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
                "or choose another --output-dir"
            )
        if stored is None:
            print(
                f"note: {self.path} has no readable {RUN_FILE} (written by an older miopt?); "
                "resuming without checking that the options are the same",
                file=sys.stderr,
            )
            return None
        changes = _changes(stored, self.identity)
        if changes:
            hint = (
                "; --max-steps may only grow, under --lr-scheduler constant with --warmup-ratio 0"
                if any(change.startswith("--max-steps ") for change in changes)
                else ""
            )
            raise OptionError(
                f"--resume: options differ from the run in {self.path}: {'; '.join(changes)} "
                f"(pass --overwrite to start a new run there, or choose another --output-dir{hint})"
            )
        return stored

    def _lock(self) -> None:
        if self._lock_handle is None:
            self._lock_handle = lock_output_dir(self.path)


def lock_output_dir(path: Path):
    """Hold ``path/.miopt.lock`` (``flock``, released when the returned file is closed or the
    process ends); OptionError naming the holder's pid when another process holds it. None where
    ``fcntl`` is missing (not POSIX): no lock there."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(Path(path) / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise OptionError(
            f"{path} is in use by another miopt process (pid {holder}); wait for it to finish "
            "or choose another --output-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle

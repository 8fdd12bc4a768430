"""Atomic writes: a temporary file in the destination folder, then ``os.replace``, so a reader
never sees a half-written file and an interrupted run leaves the old file (or none)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from miopt.checkpoint import atomic_write_text


def write_text_atomic(path: str | Path, text: str) -> Path:
    atomic_write_text(path, text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

"""Atomic files and the cache lock."""

from __future__ import annotations

import threading
import time

from miopt.run.atomic_io import atomic_write_text, cache_lock, commit_directory
from miopt.run.checkpoint import list_checkpoints


def test_cache_lock_serialises_builders(tmp_path):
    final = tmp_path / "entry"
    events: list[str] = []

    def builder(name: str) -> None:
        with cache_lock(final):
            events.append(f"{name} in")
            time.sleep(0.2)
            events.append(f"{name} out")

    threads = [threading.Thread(target=builder, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert events == ["a in", "a out", "b in", "b out"]


def test_atomic_write_leaves_no_temporary_and_replaces(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_only_complete_checkpoints_are_listed(tmp_path):
    whole = tmp_path / ".checkpoint-0000002.tmp"
    whole.mkdir()
    (whole / "trainer_state.json").write_text('{"step": 2}')
    commit_directory(whole, tmp_path / "checkpoint-0000002")
    (tmp_path / "checkpoint-0000004").mkdir()  # killed before its state file was written
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000002"]

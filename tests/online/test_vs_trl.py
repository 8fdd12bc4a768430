"""The online benchmark at toy size: both sides (miopt online and TRL's GRPOTrainer) run from the
same start with the same prompts and budget, and the table, curves and plot are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_toy_benchmark_runs_both_sides_and_writes_its_table(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "online_vs_trl.py"), "--toy", "--out", str(out)]
    result = subprocess.run(
        [*command, "--methods", "mio", "grpo"], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    assert [row["method"] for row in table["rows"]] == ["mio", "grpo"]
    for curve in table["curves"]:
        # round 0 (the start) and one point per round; the same samples drawn on both sides
        assert [p["samples"] for p in curve["points"]] == [0, 16, 32]
        assert all(0.0 <= p["heldout_accuracy"] <= 1.0 for p in curve["points"])
    starts = {curve["points"][0]["heldout_accuracy"] for curve in table["curves"]}
    assert len(starts) == 1  # the same start, evaluated by the same harness on both sides
    lines = (out / "table.md").read_text().splitlines()
    assert any(line.startswith("| mio |") for line in lines) and any(
        line.startswith("| grpo |") for line in lines
    )
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

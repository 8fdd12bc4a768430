"""One helper the GPU check's scripts share: run a command with its output appended to a log file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def run_logged(command: list[str], log: Path, timeout: float, **kwargs) -> tuple[int | None, float]:
    """Run ``command`` with stdout and stderr appended to ``log``; kill its whole process group after
    ``timeout`` seconds. Returns (exit status or None on timeout, wall seconds)."""
    start = time.perf_counter()
    with log.open("a") as stream:
        stream.write(f"\n$ {' '.join(command)}\n")
        stream.flush()
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    return code, time.perf_counter() - start

"""The metrics sink: the one place where a logged row of the loop goes (``metrics.jsonl`` on the
main process, the ``--report-to`` trackers (:mod:`miopt.run.trackers`), and the job's ``on_log`` callback).

On resume the file keeps the rows of steps up to the checkpoint; a torn last line (a write cut by
a power loss) is dropped with a message instead of stopping the run. A row that cannot be written
(a full disk) is cut off again and the run stops with a WriteError naming the file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from miopt.errors import MioptError
from miopt.run.atomic_io import append_bytes, atomic_write_text, writing
from miopt.run.checkpoint import kept_note, on_every_rank
from miopt.run.trackers import finish_trackers, log_metrics, start_trackers

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, float]]:
    """The rows of ``path`` (of steps <= ``up_to_step``); a torn last line is dropped, said on stderr,
    a damaged line before it is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as error:
            if any(rest.strip() for rest in lines[number:]):
                raise MioptError(f"{path}:{number}: damaged metrics row ({error}); cannot resume") from error
            print(f"note: {path}:{number}: dropped a torn last line", file=sys.stderr, flush=True)
            continue
        rows.append(row)
    if up_to_step is not None:
        rows = [row for row in rows if row.get("step", 0) <= up_to_step]
    return rows


class MetricsSink:
    """Receives each logged row (``write``); ``start`` prepares the file for a fresh or resumed run.
    The trackers hang off here, so every row reaches all of them the same way."""

    def __init__(
        self,
        output_dir: Path,
        accelerator,
        options,
        *,
        on_log: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.output_dir, self.accelerator, self.options = Path(output_dir), accelerator, options
        self.main_process, self.on_log = accelerator.is_main_process, on_log
        self.trackers: list[str] = []

    def start(self, resumed_step: int | None) -> list[dict[str, float]]:
        """Fresh run (``resumed_step`` None): an empty file. Resumed: the rows up to that step, which
        the run will not write again (the file is rewritten atomically without the others). Then the
        trackers start."""
        rows = self._prepare_file(resumed_step) if self.main_process else []
        self.trackers = start_trackers(self.accelerator, self.options, self.output_dir)
        return rows

    def _prepare_file(self, resumed_step: int | None) -> list[dict[str, float]]:
        if resumed_step is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            return []
        rows = read_metrics(self.path, resumed_step)
        if self.path.is_file():
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def write(self, record: dict[str, float]) -> None:
        # every process learns of a failed write, so none waits at the next step for the main one
        on_every_rank(self.accelerator, lambda: self._append(record))
        if self.main_process:
            log_metrics(self.accelerator, record)
        if self.on_log is not None:
            self.on_log(record)

    def _append(self, record: dict[str, float]) -> None:
        if not self.main_process:
            return

        def kept() -> str:
            return f"the file keeps its rows before step {record.get('step')}; {kept_note(self.output_dir)}"

        with writing(self.path, kept=kept):
            append_bytes(self.path, (json.dumps(record) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self.trackers:
            finish_trackers(self.accelerator)

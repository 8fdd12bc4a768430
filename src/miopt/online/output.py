"""The run folder of ``miopt online``: round checkpoints, the per-round log, resume, pruning.

``DIR/online.json`` holds the start model and the options; ``DIR/round-NNN/`` each round's policy
with ``round.json`` (its log row, written last: a round is complete when it exists),
``samples.jsonl`` and ``pairs.jsonl``; ``DIR/rounds.jsonl`` one row per complete round.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from miopt.errors import OptionError
from miopt.evaluation.tasks import EvalRecord
from miopt.online.options import RESUME_FIXED, OnlineOptions
from miopt.online.pairs import Pair
from miopt.run.atomic_io import atomic_write_text
from miopt.run.metrics_sink import read_metrics
from miopt.run.run_folder import remove_run_files

ROUNDS_FILE = "rounds.jsonl"
RUN_FILE = "online.json"
ROUND_FILE = "round.json"
SAMPLES_FILE = "samples.jsonl"
PAIRS_FILE = "pairs.jsonl"
ROUND_PREFIX = "round-"


def round_dir(output_dir: Path, index: int) -> Path:
    return output_dir / f"{ROUND_PREFIX}{index:03d}"


def complete_rounds(output_dir: Path) -> list[int]:
    """Indices of the committed rounds (their ``round.json`` exists), ascending."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        suffix = path.name[len(ROUND_PREFIX) :]
        if path.is_dir() and path.name.startswith(ROUND_PREFIX) and suffix.isdigit():
            if (path / ROUND_FILE).is_file():
                found.append(int(suffix))
    return sorted(found)


def read_rows(output_dir: Path) -> list[dict[str, Any]]:
    """The per-round log (a torn last line dropped, as the loop's metrics are read)."""
    return read_metrics(output_dir / ROUNDS_FILE)


def write_rows(output_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(output_dir / ROUNDS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def _remove_stale(output_dir: Path) -> None:
    """Temporary folders of a round that was interrupted before its commit."""
    for path in output_dir.glob(f".{ROUND_PREFIX}*"):
        if path.is_dir() and (path.name.endswith(".tmp") or path.name.endswith(".old")):
            shutil.rmtree(path, ignore_errors=True)


def _stored_value(stored: dict[str, Any], key: str) -> Any:
    """An option of a stored run; one the run predates reads as its default."""
    if key in stored:
        return stored[key]
    field = {f.name: f for f in dataclasses.fields(OnlineOptions)}[key]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def prepare_output(options: OnlineOptions) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """(stored run settings or None, log rows kept, last complete round or -1) for a fresh or resumed run."""
    output_dir = Path(options.output_dir)
    done = complete_rounds(output_dir)
    if output_dir.is_dir():
        _remove_stale(output_dir)
    if options.resume and options.overwrite:
        raise OptionError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    if not options.resume:
        if (done or (output_dir / ROUNDS_FILE).exists()) and options.overwrite:
            remove_run_files(output_dir)
        elif done or (output_dir / ROUNDS_FILE).exists():
            raise OptionError(
                f"{output_dir} already holds an online run; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --output-dir"
            )
        return None, [], -1
    if not (output_dir / RUN_FILE).is_file():
        raise OptionError(f"--resume: {output_dir} holds no online run ({RUN_FILE} missing)")
    stored = json.loads((output_dir / RUN_FILE).read_text())
    differing = [
        key for key in RESUME_FIXED if _stored_value(stored["options"], key) != getattr(options, key)
    ]
    if differing:
        changes = ", ".join(
            f"--{key.replace('_', '-')} {_stored_value(stored['options'], key)!r} -> {getattr(options, key)!r}"
            for key in differing
        )
        raise OptionError(f"--resume: options differ from the run in {output_dir}: {changes}")
    last = done[-1] if done else -1
    rows = [row for row in read_rows(output_dir) if row.get("round", -1) <= last]
    logged = {row["round"] for row in rows}
    for index in done:  # a round committed just before the log line was written
        if index not in logged:
            rows.append(json.loads((round_dir(output_dir, index) / ROUND_FILE).read_text()))
    rows.sort(key=lambda row: row["round"])
    return stored, rows, last


def prune(output_dir: Path, keep: int, reference: Path | None) -> None:
    """Keep the newest ``keep`` trained rounds (and round 0, and the reference folder)."""
    if keep <= 0:
        return
    trained = [index for index in complete_rounds(output_dir) if index > 0]
    for index in trained[:-keep]:
        path = round_dir(output_dir, index)
        if reference is None or path.resolve() != reference.resolve():
            shutil.rmtree(path, ignore_errors=True)


def write_round_files(
    folder: Path,
    records: Sequence[EvalRecord],
    samples: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]] | None,
    scores: Sequence[Sequence[float]] | None,
    pairs: Sequence[Pair],
) -> None:
    """``samples.jsonl`` (each prompt's samples with their rewards and/or scores and whether it gave a
    positive) and ``pairs.jsonl`` (the training examples), atomically."""
    chosen_of = {pair.source: pair for pair in pairs}
    lines = []
    for index, (record, texts) in enumerate(zip(records, samples)):
        pair = chosen_of.get(record.source)
        line: dict[str, Any] = {
            "source": record.source,
            "prompt": record.prompt,
            "gold": record.gold,
            "samples": list(texts),
        }
        if rewards is not None:
            line["rewards"] = rewards[index]
        if scores is not None:
            line["scores"] = scores[index]
        line["positive"] = None if pair is None else ("reference" if pair.injected else "sample")
        lines.append(line)
    atomic_write_text(folder / SAMPLES_FILE, "".join(json.dumps(line) + "\n" for line in lines))
    atomic_write_text(
        folder / PAIRS_FILE, "".join(json.dumps(dataclasses.asdict(pair)) + "\n" for pair in pairs)
    )


def describe_row(row: dict[str, Any]) -> str:
    """One line per round for the terminal."""
    parts = []
    if "pass@1" in row:
        parts.append(
            f"pass@1 {row['pass@1']:.3f}, pass@{row['samples']} {row['pass@K']:.3f}, "
            f"no correct {row['no_correct_fraction']:.1%}, reward {row['reward_mean']:.3f}"
        )
    if "rm_score/mean" in row:
        parts.append(f"RM score {row['rm_score/mean']:.3f} +- {row['rm_score/std']:.3f}")
    text = f"round {row['round']}: " + "; ".join(parts)
    text += f"; {row['pairs']} pairs ({row['injected']} injected), {row['steps']} steps"
    if "logps/chosen" in row:
        text += f"; logps chosen {row['logps/chosen']:.2f}, rejected {row['logps/rejected']:.2f}"
    if "heldout_accuracy" in row:
        text += f"; held-out pass@1 {row['heldout_accuracy']:.3f}"
    return text + f" ({row['seconds']:.0f} s)"

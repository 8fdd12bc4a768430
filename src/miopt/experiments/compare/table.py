"""``miopt compare``'s table: columns, aggregation over seeds, table.md and strict JSON."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from miopt.evaluation.metrics import wilson_interval
from miopt.run.atomic_io import atomic_write_text

SFT_CONTROL = "sft"
RUNS_DIR = "runs"
RESULT_FILE = "compare_result.json"
START_FILE = "start_result.json"
TABLE_MD = "table.md"
TABLE_JSON = "table.json"
# Per-objective columns of table.md / table.json: (key, header, format, meaning).
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    (
        "sft_accuracy",
        "held-out acc. SFT start",
        "percent",
        "held-out task accuracy of the SFT start (greedy)",
    ),
    ("final_accuracy", "held-out acc. final", "percent", "held-out task accuracy after training (greedy)"),
    (
        "pair_accuracy",
        "pair acc. (held-out pairs)",
        "percent",
        "fraction of held-out pairs with T_w > T_l (all rejected responses of a prompt averaged)",
    ),
    (
        "train_pair_accuracy",
        "pair acc. (train, last window)",
        "percent",
        "rewards/accuracies over the last logging window of training",
    ),
    (
        "chosen_change",
        "chosen Δ (train, end)",
        "nats",
        "log pi(y_w) - log pi_ref(y_w), batch mean over the last logging window",
    ),
    (
        "rejected_change",
        "rejected Δ (train, end)",
        "nats",
        "log pi(y_l) - log pi_ref(y_l), batch mean over the last logging window",
    ),
    (
        "chosen_change_min",
        "min chosen Δ",
        "nats",
        "lowest logged chosen change (logging windows; 0 at step 0 included)",
    ),
    ("chosen_change_min_step", "at step", "step", "the step of that minimum"),
    (
        "heldout_chosen_change",
        "chosen Δ (held-out pairs)",
        "nats",
        "final log pi(y_w) - log pi_ref(y_w), mean over held-out pairs",
    ),
    (
        "heldout_rejected_change",
        "rejected Δ (held-out pairs)",
        "nats",
        "final log pi(y_l) - log pi_ref(y_l), mean over held-out pairs",
    ),
    ("seconds", "s / run", "seconds", "wall time of the run (training and evaluation)"),
)
# Present where the preset samples (``Prepared.sample``): pass@k of Chen et al. (2021), eq. 1.
SAMPLING_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("pass_at_1", "pass@1", "percent", "pass@1 from k samples at temperature 1 (held-out problems)"),
    ("pass_at_k", "pass@k", "percent", "pass@k: a problem counts if any of its k samples is correct"),
)
CURVE_KEYS = ("logps/chosen_change", "logps/rejected_change", "rewards/accuracies", "rewards/margins", "loss")


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std}


def columns_for(results: Sequence[dict[str, Any]]) -> tuple[tuple[str, str, str, str], ...]:
    """:data:`COLUMNS`, and :data:`SAMPLING_COLUMNS` where every run measured them."""
    sampled = bool(results) and all("pass_at_1" in result for result in results)
    return COLUMNS + (SAMPLING_COLUMNS if sampled else ())


def aggregate(
    results: Sequence[dict[str, Any]],
    objectives: Sequence[str],
    sft_accuracy: float,
    heldout_problems: int | None = None,
) -> list[dict]:
    """One row per objective: mean and std over seeds of every column; with ``heldout_problems``, the
    Wilson 95% interval of the held-out accuracy over the problems of all seeds pooled."""
    rows = []
    for objective in objectives:
        runs = [r for r in results if r["objective"] == objective]
        row: dict[str, Any] = {"objective": objective, "seeds": [r["seed"] for r in runs]}
        for key, *_ in columns_for(results):
            values = [sft_accuracy] * len(runs) if key == "sft_accuracy" else [r[key] for r in runs]
            row[key] = mean_std(values)
        if heldout_problems and runs:
            total = heldout_problems * len(runs)
            row["final_accuracy_ci95"] = list(
                wilson_interval(round(row["final_accuracy"]["mean"] * total), total)
            )
        rows.append(row)
    return rows


def _cell(stat: dict[str, float], kind: str, n: int) -> str:
    mean, std = stat["mean"], stat["std"]
    if kind == "percent":
        text, spread = f"{100 * mean:.1f}%", f"{100 * std:.1f}"
    elif kind == "nats":
        text, spread = f"{mean:+.2f}", f"{std:.2f}"
    elif kind == "step":
        text, spread = f"{mean:.0f}", f"{std:.0f}"
    else:
        text, spread = f"{mean:.0f}", f"{std:.0f}"
    return f"{text} ± {spread}" if n > 1 else text


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = [column for column in COLUMNS + SAMPLING_COLUMNS if rows and column[0] in rows[0]]
    header = ["objective", "seeds", *[column[1] for column in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        n = len(row["seeds"])
        cells = [row["objective"], str(n)] + [_cell(row[key], kind, n) for key, _, kind, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _interval(bounds: Sequence[float] | None) -> str:
    return f"[{100 * bounds[0]:.1f}%, {100 * bounds[1]:.1f}%]" if bounds else ""


def summary_table(table: dict[str, Any]) -> str:
    """The headline: held-out accuracy with its 95% interval, pass@1 / pass@k where measured, and the
    log-prob changes, for the start and each objective (mean over seeds)."""
    start, rows = table.get("start") or {}, table["rows"]
    n = table["info"].get("heldout_problems")
    seeds = len(table["settings"]["seeds"])
    sampled = "pass_at_1" in start
    chosen = table["settings"].get("chosen_settings") or {}
    k = start.get("pass_k", "k")
    head = f"{'':9}{'accuracy':>9}  {'95% interval':<16}"
    head += f"{'pass@1':>8}{f'pass@{k}':>8}" if sampled else ""
    head += f"{'chosen':>8}{'rejected':>9}"
    start_interval = wilson_interval(round(start["accuracy"] * n), n) if n and start else None
    lines = [head, f"{'start':9}{_percent(start.get('accuracy')):>9}  {_interval(start_interval):<16}"]
    if sampled:
        lines[-1] += f"{_percent(start['pass_at_1']):>8}{_percent(start['pass_at_k']):>8}"
    for row in rows:
        line = f"{row['objective']:9}{_percent(row['final_accuracy']['mean']):>9}  "
        line += f"{_interval(row.get('final_accuracy_ci95')):<16}"
        if sampled and "pass_at_1" in row:
            line += f"{_percent(row['pass_at_1']['mean']):>8}{_percent(row['pass_at_k']['mean']):>8}"
        line += f"{row['chosen_change']['mean']:>+8.2f}{row['rejected_change']['mean']:>+9.2f}"
        if chosen.get(row["objective"]):
            line += "  " + ", ".join(f"{k} {v:g}" for k, v in chosen[row["objective"]].items())
        lines.append(line)
    caption = (
        f"held-out accuracy ({n} problems, greedy; 95% Wilson interval, {seeds} seed(s) pooled)"
        + (f"; pass@1 and pass@{k} from {k} samples at temperature 1" if sampled else "")
        + "; chosen / rejected: log-prob change from the start (train, last logging window, nats)"
        + ("; last: the setting chosen on the validation split" if chosen else "")
    )
    return caption + "\n" + "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def write_markdown(path: Path, table: dict[str, Any]) -> None:
    settings, info = table["settings"], table["info"]
    shared = ", ".join(f"{k} {v}" for k, v in settings["preference"].items())
    lines = [
        f"# miopt compare: preset {settings['preset']}",
        "",
        f"Objectives {', '.join(settings['objectives'])}; seeds {settings['seeds']} (a seed changes the "
        "preference stage's data order only; SFT start, pairs and evaluation are shared). "
        f"{info['train_pairs']} training pairs ({info['pairs']}); {info['heldout_problems']} held-out "
        f"problems, {info['heldout_pairs']} held-out pairs. Shared hyperparameters: {shared}"
        + (_selection_text(settings) if settings.get("selection") else " (the same for every objective)")
        + ". Values: mean ± sample std over seeds; Δ = log pi - log pi_ref (summed over the response, nats).",
        "",
        "```",
        summary_table(table),
        "```",
        "",
        format_table(table["rows"]),
        "",
        "Columns: "
        + "; ".join(f"*{header}*: {meaning}" for _, header, _, meaning in COLUMNS + SAMPLING_COLUMNS)
        + ".",
        "",
        f"Machine: {table['machine']['processor']}, {table['machine']['cpu_count']} CPUs, torch "
        f"{table['machine']['torch']} ({table['machine']['torch_threads']} threads), transformers "
        f"{table['machine']['transformers']}. Time: the runs {table['runs_seconds']:.0f} s together "
        f"(s / run above); this invocation {table['total_seconds']:.0f} s, of which preparation "
        f"{table['prepare_seconds']:.0f} s"
        + (f", {table['reused_runs']} finished runs reused" if table["reused_runs"] else "")
        + ".",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _selection_text(settings: dict[str, Any]) -> str:
    parts = []
    for objective, record in settings["selection"].items():
        scores = ", ".join(
            "/".join(f"{v:g}" for v in c["settings"].values()) + f": {100 * c['validation_accuracy']:.1f}%"
            for c in record["candidates"]
        )
        parts.append(f"{objective} {record['chosen_tag']} ({scores})")
    return (
        "; per objective, the setting with the best validation accuracy (seed 0, greedy, validation "
        "split) among the candidates: " + "; ".join(parts)
    )


def finite_json(value):
    """NaN/inf as None, so table.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value

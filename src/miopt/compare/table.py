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

from miopt.checkpoint import atomic_write_text

SFT_CONTROL = "sft"
RUNS_DIR = "runs"
RESULT_FILE = "compare_result.json"
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
CURVE_KEYS = ("logps/chosen_change", "logps/rejected_change", "rewards/accuracies", "rewards/margins", "loss")


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std}


def aggregate(
    results: Sequence[dict[str, Any]], objectives: Sequence[str], sft_accuracy: float
) -> list[dict]:
    rows = []
    for objective in objectives:
        runs = [r for r in results if r["objective"] == objective]
        row: dict[str, Any] = {"objective": objective, "seeds": [r["seed"] for r in runs]}
        for key, *_ in COLUMNS:
            values = [sft_accuracy] * len(runs) if key == "sft_accuracy" else [r[key] for r in runs]
            row[key] = mean_std(values)
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
    header = ["objective", "seeds", *[column[1] for column in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        n = len(row["seeds"])
        cells = [row["objective"], str(n)] + [_cell(row[key], kind, n) for key, _, kind, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        f"problems, {info['heldout_pairs']} held-out pairs. Same hyperparameters for every objective: "
        f"{shared}. Values: mean ± sample std over seeds; Δ = log pi - log pi_ref (summed over the "
        "response, nats).",
        "",
        format_table(table["rows"]),
        "",
        "Columns: " + "; ".join(f"*{header}*: {meaning}" for _, header, _, meaning in COLUMNS) + ".",
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


def finite_json(value):
    """NaN/inf as None, so table.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value

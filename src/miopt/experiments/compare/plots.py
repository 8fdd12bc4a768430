"""``miopt compare``'s plots: one PNG per quantity, seed mean with a ±1 std band."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from miopt.experiments.compare.table import mean_std
from miopt.run.plots import save_figure

PLOTS = {
    "chosen": "chosen_logps.png",
    "rejected": "rejected_logps.png",
    "margin": "margin.png",
    "accuracy": "accuracy.png",
}


def _colours(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _curves(results, objective: str, quantity: str) -> tuple[list[int], list[list[float]]]:
    """Steps and one series per seed of ``quantity`` for ``objective`` (step 0 = 0 for the changes)."""
    runs = [r for r in results if r["objective"] == objective]
    steps = runs[0]["curves"]["step"]
    series = []
    for run in runs:
        curves = run["curves"]
        if quantity == "margin":
            values = [c - r for c, r in zip(curves["logps/chosen_change"], curves["logps/rejected_change"])]
        else:
            key = {
                "chosen": "logps/chosen_change",
                "rejected": "logps/rejected_change",
                "accuracy": "rewards/accuracies",
            }[quantity]
            values = list(curves[key])
        series.append(values[: len(steps)])
    if quantity != "accuracy":
        return [0, *steps], [[0.0, *values] for values in series]
    return list(steps), series


def _band(axis, steps, series, colour, label) -> None:

    values = np.array(series, dtype=float)
    mean = values.mean(0)
    axis.plot(steps, mean, color=colour, lw=2, label=label)
    if len(series) > 1:
        std = values.std(0, ddof=1)
        axis.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2, lw=0)


def plot_quantity(results, objectives: Sequence[str], quantity: str, path: Path, subtitle: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    titles = {
        "chosen": ("chosen log-prob change  log pi(y_w) - log pi_ref(y_w)  [nats]", "chosen response"),
        "rejected": ("rejected log-prob change  log pi(y_l) - log pi_ref(y_l)  [nats]", "rejected response"),
        "margin": ("(chosen change) - (rejected change)  [nats]", "log-ratio margin (T_w - T_l) / beta"),
    }
    colours = _colours(objectives)
    if quantity == "accuracy":
        figure = Figure(figsize=(12, 4.6), layout="constrained")
        FigureCanvasAgg(figure)
        axis, bars = figure.subplots(1, 2)
    else:
        figure = Figure(figsize=(7, 4.6), layout="constrained")
        FigureCanvasAgg(figure)
        axis, bars = figure.subplots(1, 1), None
    for objective in objectives:
        steps, series = _curves(results, objective, quantity)
        _band(axis, steps, series, colours[objective], f"{objective} ({len(series)} seeds)")
    axis.set_xlabel("optimizer step")
    axis.grid(alpha=0.3)
    if quantity == "accuracy":
        axis.set_title("pair accuracy (T_w > T_l), training batches")
        axis.set_ylabel("pair accuracy")
        axis.set_ylim(-0.02, 1.02)
    else:
        axis.axhline(0.0, color="grey", ls=":", lw=1)
        axis.set_ylabel(titles[quantity][0])
        axis.set_title(titles[quantity][1])
    axis.legend(loc="best", fontsize=8)
    if bars is not None:
        start = results[0]["sft_accuracy"]
        for index, objective in enumerate(objectives):
            values = [r["final_accuracy"] for r in results if r["objective"] == objective]
            stat = mean_std(values)
            bars.bar(index, stat["mean"], yerr=stat["std"] if len(values) > 1 else None,
                     color=colours[objective], alpha=0.8, capsize=4)  # fmt: skip
            bars.scatter([index] * len(values), values, color="black", s=10, zorder=3)
        bars.axhline(start, color="grey", ls="--", lw=1.5, label=f"SFT start {start:.1%}")
        bars.set_xticks(range(len(objectives)), list(objectives))
        bars.yaxis.set_major_formatter(PercentFormatter(1.0))
        bars.set_ylabel("held-out accuracy (greedy)")
        bars.set_title("held-out task accuracy after training (mean ± std; dots: seeds)")
        bars.legend(loc="best", fontsize=8)
        bars.grid(alpha=0.3, axis="y")
    figure.suptitle(f"{subtitle}; seed mean, band ±1 std", fontsize=10)
    save_figure(figure, path)

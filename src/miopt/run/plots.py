"""PNG plots of training curves (matplotlib figures drawn off-screen, without pyplot; written atomically)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from miopt.run.atomic_io import atomic_write_bytes

CURVE_PANELS = (
    ("log-probabilities (summed)", ("logps/chosen", "logps/rejected")),
    ("rewards (critic T)", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("pair accuracy", ("rewards/accuracies",)),
    ("loss and MI bound", ("loss", "mi_bound")),
)


def save_figure(figure, path: str | Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_training_curves(history: Sequence[dict[str, float]], path: str | Path, title: str = "") -> bool:
    """One panel per group of metrics against ``step``; returns False when there is nothing to plot
    or matplotlib is not installed."""
    rows = [row for row in history if "step" in row]
    if not rows:
        return False
    try:  # a Figure of its own, not pyplot: the caller's matplotlib backend is left as it is
        from matplotlib.figure import Figure
    except ImportError:  # a minimal install (e.g. a bare GPU machine, docs/gpu.md): no curves.png
        return False

    panels = [(name, [k for k in keys if k in rows[0]]) for name, keys in CURVE_PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    figure = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels), squeeze=False)
    steps = [row["step"] for row in rows]
    for axis, (name, keys) in zip(axes[0], panels):
        for key in keys:
            axis.plot(steps, [row.get(key, float("nan")) for row in rows], label=key)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    save_figure(figure, path)
    return True

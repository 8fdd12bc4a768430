"""Experiment trackers (``--report-to``): TensorBoard, Weights & Biases and trackio through
Accelerate's tracker integration.

``--report-to`` takes any of :data:`TRACKERS` (several at once, or ``none``). Each run logs the run's
options as its config (``init_trackers``) and, at every logging step, the metrics row that
``metrics.jsonl`` receives under the same names (``accelerator.log``). Where the files go:

* ``tensorboard``: ``OUTPUT_DIR/tensorboard/miopt/`` (event files);
* ``wandb``: a run named after ``OUTPUT_DIR`` in project ``miopt``, files under ``OUTPUT_DIR/wandb``;
  ``WANDB_MODE=offline`` keeps it local (``wandb sync`` uploads it later);
* ``trackio``: a run named after ``OUTPUT_DIR`` in project ``miopt``, in trackio's local database
  (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``; ``trackio show`` opens it).

A tracker whose package is missing is an error at option validation, naming the install.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from miopt.errors import OptionError

PROJECT = "miopt"
NONE = "none"
# tracker -> (module it needs, install hint)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install 'miopt[tensorboard]' (or: pip install tensorboard)"),
    "wandb": ("wandb", "pip install 'miopt[wandb]' (or: pip install wandb)"),
    "trackio": ("trackio", "pip install 'miopt[trackio]' (or: pip install trackio)"),
}


def tracker_names(report_to: str | Sequence[str] | None) -> list[str]:
    """The trackers named by ``--report-to`` (a list, or one string; commas also separate), in order,
    without duplicates; ``none`` alone means none. Unknown names are an error."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name or name == NONE or name in names:
                continue
            if name not in TRACKERS:
                raise OptionError(
                    f"--report-to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or {NONE}"
                )
            names.append(name)
    return names


def check_trackers(report_to: str | Sequence[str] | None) -> list[str]:
    """The trackers of ``--report-to``, failing with the install command when a package is missing."""
    names = tracker_names(report_to)
    for name in names:
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise OptionError(f"--report-to {name} needs the {module} package: {install}")
    return names


def run_name(output_dir: str | Path) -> str:
    """The tracker run's name: the output folder's (without the temporary-folder dot and suffix)."""
    name = Path(output_dir).resolve().name
    return name.removeprefix(".").removesuffix(".tmp") or PROJECT


def _config_value(value: Any) -> Any:
    """Option values as trackers accept them (TensorBoard's hparams take scalars and strings only)."""
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def start_trackers(accelerator, options, output_dir: Path) -> list[str]:
    """Start the ``--report-to`` trackers on ``accelerator`` with the options as the config; returns
    their names (empty: nothing to log)."""
    names = check_trackers(getattr(options, "report_to", None))
    if not names:
        return []
    from accelerate.tracking import filter_trackers

    output_dir = Path(output_dir)
    accelerator.project_configuration.set_directories(str(output_dir))
    accelerator.project_configuration.logging_dir = str(output_dir / "tensorboard")
    accelerator.log_with = filter_trackers(names, accelerator.logging_dir)
    name = run_name(output_dir)
    config = {key: _config_value(value) for key, value in dataclasses.asdict(options).items()}
    accelerator.init_trackers(
        PROJECT,
        config=config,
        init_kwargs={"wandb": {"name": name, "dir": str(output_dir)}, "trackio": {"name": name}},
    )
    return names


def log_metrics(accelerator, record: dict[str, float]) -> None:
    """One metrics row (as in ``metrics.jsonl``) to every started tracker, at its ``step``."""
    if accelerator.trackers:
        accelerator.log(
            {key: value for key, value in record.items() if key != "step"}, step=int(record["step"])
        )


def finish_trackers(accelerator) -> None:
    """Flush and close the trackers (the process group stays up, unlike ``end_training``)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []

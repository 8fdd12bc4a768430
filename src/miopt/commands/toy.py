"""``miopt toy``: the discrete toy of docs/theory.md sections 2-3, in seconds on a CPU.

Runs :mod:`miopt.experiments.toy` for each objective (offline pair; on-policy without and with injection), writes
``toy_offline.png``, ``toy_onpolicy.png`` and ``toy.json`` to ``--output-dir`` (each written to a
temporary file and then renamed, so a reader never sees a half-written file) and prints a short
table of the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miopt.config import add_options, option, resolve
from miopt.errors import OptionError
from miopt.run.atomic_io import atomic_write_text
from miopt.run.plots import save_figure

HELP = (
    "Discrete toy: a softmax policy trained with each objective (offline pair and on-policy); plots and JSON."
)

OFFLINE_PNG = "toy_offline.png"
ONPOLICY_PNG = "toy_onpolicy.png"
RESULTS_JSON = "toy.json"


@dataclass
class ToyOptions:
    output_dir: str | None = option(
        None, "Directory for toy_offline.png, toy_onpolicy.png and toy.json (required)."
    )
    objectives: list[str] = option(["dpo", "mio"], "Objectives to train, by registry name.")
    steps: int = option(300, "SGD steps per run.")
    seed: int = option(0, "Seed of the on-policy sampling (the offline run has no randomness).")
    beta: float = option(0.1, "beta of the critic T = beta (log pi - log pi_ref).")
    lr: float = option(3.0, "SGD learning rate.")
    samples: int = option(8, "Responses sampled per prompt per on-policy step.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ToyOptions)


def _validate(options: ToyOptions) -> None:
    import miopt.objectives as objectives

    if not options.output_dir:
        raise OptionError("--output-dir is required")
    for name in options.objectives:  # registry names and NAME:WEIGHT,... combinations
        try:
            unpaired = objectives.is_unpaired(name)
        except ValueError as error:
            raise OptionError(str(error)) from None
        if unpaired:
            raise OptionError(f"{name} trains on unpaired data; the toy has preference pairs only")
    if not options.objectives:
        raise OptionError("--objectives needs at least one name")
    if options.steps < 1:
        raise OptionError(f"--steps must be at least 1, got {options.steps}")
    if options.samples < 1:
        raise OptionError(f"--samples must be at least 1, got {options.samples}")
    if not options.beta > 0:
        raise OptionError(f"--beta must be positive, got {options.beta}")
    if not options.lr > 0:
        raise OptionError(f"--lr must be positive, got {options.lr}")


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def plot_offline(results: Any, path: Path) -> None:
    """Chosen and rejected log-probabilities and the log-ratio margin over steps, one line per objective."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = results.settings
    colours = _colours([curve.objective for curve in results.offline])
    fig = Figure(figsize=(14, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (
        ("chosen_logps", "log pi(chosen)  [nats]", "chosen response"),
        ("rejected_logps", "log pi(rejected)  [nats]", "rejected response"),
        ("margins", "(log-ratio chosen) - (log-ratio rejected)  [nats]", "margin (T_w - T_l) / beta"),
    )
    for ax, (attribute, ylabel, title) in zip(axes, panels):
        for curve in results.offline:
            values = getattr(curve, attribute)
            label = curve.objective
            if curve.diverged_at is not None:  # drawn, it would only wreck the axis scale
                values, label = [], f"{label}: diverged at step {curve.diverged_at}, not drawn"
            ax.plot(range(len(values)), values, color=colours[curve.objective], lw=2, label=label)
        if attribute != "margins" and results.offline:
            start = getattr(results.offline[0], attribute)[0]
            ax.axhline(start, color="grey", ls=":", lw=1, label="start")
        ax.set_title(title)
        ax.set_xlabel("SGD step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    fig.suptitle(
        "Offline toy: one preference pair whose responses share a large feature "
        f"(beta={settings['beta']}, SGD lr={settings['lr']}, {settings['steps']} steps)"
    )
    save_figure(fig, path)


def plot_onpolicy(results: Any, path: Path) -> None:
    """log pi(correct) over steps on the easy and the hard prompt; dashed = no injection, solid = injection."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = results.settings
    colours = _colours(list(dict.fromkeys(curve.objective for curve in results.onpolicy)))
    prompts = settings["onpolicy_prompts"]
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(prompts))
    budget = settings["samples_per_prompt"] * settings["steps"]
    for ax, prompt in zip(axes, prompts):
        for index, curve in enumerate(results.onpolicy):
            values = curve.correct_logps[prompt]
            mode = "injection" if curve.inject else "no injection"
            label = f"{curve.objective}, {mode}: sampled {curve.correct_sampled[prompt]}x"
            if curve.diverged_at is not None:
                values, label = (
                    [],
                    f"{curve.objective}, {mode}: diverged at step {curve.diverged_at}, not drawn",
                )
            # Runs without injection often coincide (flat at the start): earlier ones drawn wider.
            width = 2.0 if curve.inject else max(1.5, 5.0 - 1.5 * (index // 2))
            ax.plot(
                range(len(values)),
                values,
                color=colours[curve.objective],
                ls="-" if curve.inject else "--",
                lw=width,
                label=label,
            )
            first = curve.first_sampled[prompt]
            if first is not None and first < len(values):
                ax.plot([first], [values[first]], marker="o", color=colours[curve.objective], ms=6)
        start = settings["onpolicy_start_probs"][prompt]
        if start < 1.0 / budget:
            ax.axhline(-math.log(budget), color="grey", ls=":", lw=1, label="log 1/(samples x steps)")
            ax.set_ylim(bottom=math.log(start) - 1.5)
        ax.set_title(f"{prompt} prompt: correct response starts at p = {start:g}")
        ax.set_xlabel("SGD step  (dot: first step the correct response was sampled)")
        ax.set_ylabel("log pi(correct)  [nats]")
        ax.grid(alpha=0.3)
        ax.legend(loc="center right", fontsize=8)
    fig.suptitle(
        "On-policy toy: positives = the policy's own correct samples (reward 1), negatives = its incorrect ones;\n"
        "injection adds the known-correct response as a positive when no sample is correct "
        f"({settings['samples_per_prompt']} samples/prompt/step, beta={settings['beta']}, "
        f"SGD lr={settings['lr']}, seed {settings['seed']})"
    )
    save_figure(fig, path)


def _format_table(results: Any) -> str:
    settings = results.settings
    lines = [
        f"offline: one preference pair, {settings['steps']} SGD steps, beta {settings['beta']}, lr {settings['lr']} "
        "(log-probabilities in nats)",
        f"  {'objective':<10} {'chosen start':>12} {'chosen end':>11} {'rejected start':>14} {'rejected end':>12}",
    ]
    for curve in results.offline:
        note = f"  diverged at step {curve.diverged_at}" if curve.diverged_at is not None else ""
        lines.append(
            f"  {curve.objective:<10} {curve.chosen_start:>12.2f} {curve.chosen_end:>11.2f} "
            f"{curve.rejected_start:>14.2f} {curve.rejected_end:>12.2f}{note}"
        )
    lines += [
        f"on-policy: {settings['samples_per_prompt']} samples per prompt per step, seed {settings['seed']}; "
        "log pi(correct) start -> end, times the correct response was sampled",
        f"  {'objective':<10} {'injection':<9} {'easy prompt':>22} {'hard prompt':>22} {'hard sampled':>12}",
    ]
    for curve in results.onpolicy:
        cells = []
        for prompt in ("easy", "hard"):
            logps = curve.correct_logps[prompt]
            cells.append(f"{logps[0]:.2f} -> {logps[-1]:.2f}")
        note = f"  diverged at step {curve.diverged_at}" if curve.diverged_at is not None else ""
        lines.append(
            f"  {curve.objective:<10} {'yes' if curve.inject else 'no':<9} {cells[0]:>22} {cells[1]:>22} "
            f"{curve.correct_sampled['hard']:>12}{note}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options = resolve(ToyOptions, args)
    _validate(options)
    from miopt.experiments import toy

    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = toy.run_all(
        options.objectives,
        steps=options.steps,
        beta=options.beta,
        lr=options.lr,
        samples=options.samples,
        seed=options.seed,
    )
    plot_offline(results, output_dir / OFFLINE_PNG)
    plot_onpolicy(results, output_dir / ONPOLICY_PNG)
    payload = json.dumps(results.to_dict(), indent=1)
    atomic_write_text(output_dir / RESULTS_JSON, payload + "\n")
    print(_format_table(results))
    print(f"wrote {output_dir / OFFLINE_PNG}, {output_dir / ONPOLICY_PNG}, {output_dir / RESULTS_JSON}")
    return 0

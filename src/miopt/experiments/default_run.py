"""The embedded default: ``miopt train`` with no arguments, offline, in a few minutes on 2 CPU cores.

1. Load the shipped start (``builtin:arith``: the built-in tiny Llama trained on the built-in
   arithmetic task, :mod:`miopt.model.loading`) and the task's splits (:mod:`miopt.tasks.default`).
2. On-policy pairs: on the preference prompts, the correct worked solution vs. the start's own wrong
   greedy answer (on-policy negatives; synthetic ones gave neither objective a gain in the sizing runs).
3. Train the arms of :data:`ARMS` from the same start on the same pairs, batch and schedule: MIO (the
   run's result, in the output folder), DPO and the continued-SFT control (``sft`` objective, on the
   chosen solutions), each with the settings chosen on the validation split (docs/experiments.md).
4. Print and save (``comparison.json``) held-out accuracy with 95% Wilson intervals of the start and
   of each arm, and each arm's chosen/rejected log-prob change; plot the chosen curves.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from miopt.config import Preset, resolve
from miopt.data.tokenize import tokenize_examples
from miopt.errors import OptionError
from miopt.evaluation import evaluate_arithmetic
from miopt.evaluation.generation import generate
from miopt.evaluation.metrics import wilson_interval
from miopt.model.loading import BUILTIN_ARITH, load_model, load_tokenizer
from miopt.run.atomic_io import atomic_write_json
from miopt.run.metrics_sink import METRICS_FILE, read_metrics
from miopt.run.plots import save_figure
from miopt.tasks import arithmetic
from miopt.tasks.default import DefaultTask, task_splits
from miopt.training.preference import TrainOptions, train_on_examples

__all__ = ["ARMS", "DEFAULT_PREFERENCE_OPTIONS", "DefaultTask", "on_policy_pairs", "run_default"]

START_MODEL = BUILTIN_ARITH
COMPARISON_FILE = "comparison.json"
PLOT_FILE = "chosen_logps.png"

# Preference-stage settings of the default run: above the built-in defaults, below YAML and flags
# (for every arm). ARM_SETTINGS then gives each arm what the validation sweep chose (docs/experiments.md,
# benchmarks/arith_sweep.py); a flag given on the command line wins over those too.
DEFAULT_PREFERENCE_OPTIONS = Preset(
    TrainOptions,
    objective="mio",
    beta=0.5,
    learning_rate=5e-5,
    batch_size=32,
    max_steps=100,
    warmup_ratio=0.1,
    lr_scheduler="constant",
    logging_steps=10,
    output_dir="runs/default",
    max_length=128,
)
# The arms, the run's result (MIO) first; each value: that arm's TrainOptions over the ones above,
# as chosen on the validation split with three settings per arm (benchmarks/arith_sweep.py,
# docs/experiments.md): MIO beta 0.5, lr 5e-5, 100 steps; DPO the same at 50 steps; SFT lr 2e-4.
ARMS: dict[str, dict[str, Any]] = {
    "mio": {"objective": "mio"},
    "dpo": {"objective": "dpo", "max_steps": 50},
    "sft": {"objective": "sft", "learning_rate": 2e-4},
}


def arm_dir(output_dir: Path, arm: str) -> Path:
    """The first arm (MIO) writes the output folder itself; the others a subfolder named after them."""
    return output_dir if arm == next(iter(ARMS)) else output_dir / arm


def claim_output_dir(output_dir: Path) -> None:
    """The default run owns its folder: a previous default run's outputs are removed (a rerun replaces
    them); a non-empty folder that no default run wrote is refused. The one place a rerun is handled."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise OptionError(f"--output-dir {output_dir} is a file")
    entries = list(output_dir.iterdir())
    if not entries:
        return
    summary = output_dir / "summary.json"
    written_by_default = (output_dir / COMPARISON_FILE).is_file() or (
        summary.is_file() and "builtin arithmetic" in str(json.loads(summary.read_text()).get("data", ""))
    )
    if not written_by_default:
        raise OptionError(
            f"--output-dir {output_dir} holds files no default run wrote; choose an empty or new folder"
        )
    print(f"note: replacing the previous default run in {output_dir}", file=sys.stderr)
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def on_policy_pairs(model, tokenizer, problems, task: DefaultTask, *, max_length: int, source: str):
    """Preference pairs from the problems the model gets wrong under greedy decoding: the correct
    worked solution (chosen) vs. the model's own wrong solution (rejected), tokenised."""

    outputs = generate(
        model, tokenizer, [p.prompt for p in problems], max_new_tokens=task.max_new_tokens, batch_size=256
    )
    wrong = [
        (p, o[0].strip()) for p, o in zip(problems, outputs) if not arithmetic.is_correct(o[0], p.answer)
    ]
    wrong = [(p, text) for p, text in wrong if text and text != p.solution]
    examples, _ = tokenize_examples(
        [p.prompt for p, _ in wrong],
        [(p.solution, text) for p, text in wrong],
        [f"{source}:{i}" for i in range(len(wrong))],
        tokenizer,
        max_length=max_length,
    )
    return examples


def arm_options(options: TrainOptions, explicit: set[str], arm: str, output_dir: Path) -> TrainOptions:
    """``options`` with the arm's settings under the user's flags, writing into the arm's folder."""
    settings = {key: value for key, value in ARMS[arm].items() if key not in explicit or key == "objective"}
    return dataclasses.replace(
        options, **settings, output_dir=str(arm_dir(output_dir, arm)), model=START_MODEL
    )


def _accuracy_row(accuracy: float, n: int) -> dict[str, Any]:

    return {"heldout_accuracy": accuracy, "interval_95": list(wilson_interval(round(accuracy * n), n))}


def _chosen_curve(folder: Path) -> tuple[list[int], list[float]]:
    rows = [row for row in read_metrics(folder / METRICS_FILE) if "logps/chosen_change" in row]
    return [0] + [row["step"] for row in rows], [0.0] + [row["logps/chosen_change"] for row in rows]


def plot_chosen(output_dir: Path, arms: dict[str, dict[str, Any]]) -> Path:
    """One axis: each arm's chosen log-prob change against steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    for arm, row in arms.items():
        steps, values = _chosen_curve(Path(row["output_dir"]))
        axis.plot(steps, values, lw=2, label=f"{arm} (held-out {row['heldout_accuracy']:.1%})")
    axis.axhline(0.0, color="grey", ls=":", lw=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("log pi(y_w) - log pi_ref(y_w)  [nats, batch mean]")
    axis.set_title("chosen log-prob change from the shipped start (same pairs, same batches)")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=9)
    path = output_dir / PLOT_FILE
    save_figure(figure, path)
    return path


def format_table(comparison: dict[str, Any]) -> str:
    """The printed table: start and arms, accuracy with its interval, chosen/rejected change."""
    lines = [
        f"held-out accuracy ({comparison['heldout_problems']} problems, greedy, 95% Wilson interval); "
        f"log-prob change from the start over the last logging window (nats); {comparison['pairs']} pairs",
        f"{'':6} {'accuracy':>8}  {'95% interval':<16} {'chosen':>7} {'rejected':>8}  output",
    ]
    for name in ("start", *ARMS):
        row = comparison[name]
        low, high = row["interval_95"]
        changes = (
            f"{row['chosen_change']:+7.2f} {row['rejected_change']:+8.2f}"
            if "chosen_change" in row
            else f"{'':7} {'':8}"
        )
        lines.append(
            f"{name:6} {row['heldout_accuracy']:8.1%}  [{low:.1%}, {high:.1%}]".ljust(34)
            + f"{changes}  {row['output_dir']}"
        )
    return "\n".join(lines)


def run_default(
    options: TrainOptions | None = None, explicit: set[str] | None = None, task: DefaultTask | None = None
) -> dict:
    """The whole default pipeline; returns comparison.json's content. ``options``: None for the preset
    over the built-in defaults; ``explicit`` names the options the user set (flags, YAML), which keep
    their value over :data:`DEFAULT_PREFERENCE_OPTIONS` and over each arm's settings (:data:`ARMS`)."""

    task = task or DefaultTask()
    options = options or resolve(TrainOptions, preset=DEFAULT_PREFERENCE_OPTIONS)
    explicit = explicit or set()
    options = dataclasses.replace(
        options, **{key: value for key, value in DEFAULT_PREFERENCE_OPTIONS.items() if key not in explicit}
    )
    output_dir = Path(options.output_dir)
    claim_output_dir(output_dir)
    started = time.perf_counter()
    splits = task_splits(task)
    tokenizer = load_tokenizer(START_MODEL)
    # The start's evaluation and its pairs' generation run where training will (a GPU when there is one).
    model = load_model(START_MODEL).to("cuda" if torch.cuda.is_available() else "cpu")
    steps = len(ARMS) + 2
    print(f"[1/{steps}] the shipped start ({START_MODEL}) on {len(splits.heldout)} held-out problems, "
          f"and its wrong answers to {len(splits.preference)} preference prompts", file=sys.stderr)  # fmt: skip
    start_accuracy = evaluate_arithmetic(model, tokenizer, splits.heldout)
    examples = on_policy_pairs(
        model, tokenizer, splits.preference, task, max_length=options.max_length, source="arithmetic-pairs"
    )
    if not examples:
        raise OptionError("the start answered every preference prompt correctly: no pairs to train on")
    print(f"      {len(examples)} pairs (correct solution vs. the start's own wrong answer)", file=sys.stderr)
    n = len(splits.heldout)
    comparison: dict[str, Any] = {
        "heldout_problems": n,
        "pairs": len(examples),
        "start": {**_accuracy_row(start_accuracy, n), "output_dir": START_MODEL},
    }
    summaries = {}
    for index, arm in enumerate(ARMS, 2):
        arm_opts = arm_options(options, explicit, arm, output_dir)
        print(f"[{index}/{steps}] {arm}: beta {arm_opts.beta}, lr {arm_opts.learning_rate}, "
              f"{arm_opts.max_steps} steps, batch {arm_opts.batch_size}", file=sys.stderr)  # fmt: skip
        policy = model if index == 2 else load_model(START_MODEL)
        summaries[arm] = train_on_examples(
            arm_opts,
            policy,
            tokenizer,
            examples,
            extra_summary={"data": "builtin arithmetic (on-policy negatives)", "arm": arm},
        )
        accuracy = evaluate_arithmetic(policy, tokenizer, splits.heldout)
        comparison[arm] = _arm_row(arm, arm_opts, accuracy, n, summaries[arm]["final"], output_dir)
        del policy
    print(f"[{steps}/{steps}] plot and table", file=sys.stderr)
    comparison["plot"] = str(plot_chosen(output_dir, {arm: comparison[arm] for arm in ARMS}))
    comparison["total_seconds"] = round(time.perf_counter() - started, 1)
    _write_outputs(output_dir, comparison, summaries, start_accuracy, len(examples))
    return comparison


# The settings of each arm that comparison.json records.
ARM_SETTINGS = (
    "objective",
    "beta",
    "learning_rate",
    "max_steps",
    "batch_size",
    "sft_weight",
    "lr_scheduler",
    "warmup_ratio",
)


def _arm_row(arm: str, arm_opts, accuracy: float, n: int, final: dict, output_dir: Path) -> dict[str, Any]:
    return {
        **_accuracy_row(accuracy, n),
        "chosen_change": final.get("logps/chosen_change", float("nan")),
        "rejected_change": final.get("logps/rejected_change", float("nan")),
        "output_dir": str(arm_dir(output_dir, arm)),
        "settings": {key: getattr(arm_opts, key) for key in ARM_SETTINGS},
    }


def _write_outputs(
    output_dir: Path, comparison: dict, summaries: dict, start_accuracy: float, pairs: int
) -> None:
    """comparison.json, the first arm's summary.json (it is the run in ``output_dir``), the table."""
    atomic_write_json(output_dir / COMPARISON_FILE, comparison)
    result = next(iter(ARMS))
    summary = {
        **summaries[result],
        "start_model": START_MODEL,
        "heldout_problems": comparison["heldout_problems"],
        "start_accuracy": start_accuracy,
        "final_accuracy": comparison[result]["heldout_accuracy"],
        "pairs": pairs,
        "comparison": str(output_dir / COMPARISON_FILE),
    }
    atomic_write_json(output_dir / "summary.json", summary)
    print("\n" + format_table(comparison))
    print(
        f"outputs: {output_dir}/ ({result} model, metrics.jsonl, curves.png, summary.json, "
        f"{COMPARISON_FILE}, {PLOT_FILE}); the other arms in "
        + ", ".join(f"{arm_dir(output_dir, arm)}/" for arm in list(ARMS)[1:])
        + f"; total {comparison['total_seconds']:.0f} s"
    )

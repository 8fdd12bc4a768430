"""``miopt compare``: several objectives from one SFT start on one preference set, over seeds.

For each seed ``s`` and each objective, the SFT start is loaded fresh and trained by
:func:`miopt.train.train_on_examples` with the same :class:`~miopt.train.TrainOptions` except
``objective``, ``seed`` and ``output_dir`` (``DIR/runs/<objective>-seed<s>/``); the final model is
evaluated with the evaluation harness. Then the runs are aggregated into ``table.md`` /
``table.json`` (mean and sample standard deviation over seeds) and one PNG per quantity.

What a seed changes: only the preference stage's ``--seed``, i.e. the data order (which pairs form
each batch, and in which order; :class:`miopt.loop.DataOrder`) and torch's RNG, which these models
do not use in training (no dropout). The SFT start, the pairs, the held-out set and greedy
evaluation are the same for every run, so two objectives with the same seed see exactly the same
batches in the same order.

Objective names: any registry name (:func:`miopt.objectives.available`), plus ``sft``, the
continued-SFT control: the chosen responses' token-level NLL (exactly :mod:`miopt.sft`'s loss,
``-sum log pi(y_w|x) / number of chosen tokens in the batch``) on the same batches, with the same
steps, learning rate and schedule; the rejected responses get no gradient and are only measured,
so the control logs the same diagnostics (critic values with the same ``beta``) as the objectives.

Presets (small frozen dataclasses; tests inject smaller ones):

* :class:`ArithPreset` (``--preset arith``): the embedded default's task, SFT start
  (:func:`miopt.default_run.warm_start`, same cache) and on-policy pairs (the SFT model's own wrong
  greedy answers, :func:`miopt.default_run.on_policy_pairs`), with
  :data:`miopt.default_run.DEFAULT_PREFERENCE_OPTIONS`; 3 seeds.
* :class:`Gsm8kPreset` (``--preset gsm8k``): pairs of ``miopt data gsm8k-pairs`` (real model
  samples, split by question), SFT start trained from scratch on GSM8K train with a locally
  trained BPE tokenizer (:mod:`miopt.gsm8k_model`); held-out accuracy on the held-out questions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from miopt.checkpoint import atomic_write_json, atomic_write_text
from miopt.config import option
from miopt.data.tokenize import TokenizedExample
from miopt.default_run import DEFAULT_PREFERENCE_OPTIONS, DefaultTask
from miopt.errors import OptionError
from miopt.gsm8k_model import Gsm8kSFTSettings

SFT_CONTROL = "sft"
DEFAULT_OBJECTIVES = ("dpo", "mio")
RUNS_DIR = "runs"
RESULT_FILE = "compare_result.json"
TABLE_MD = "table.md"
TABLE_JSON = "table.json"
PLOTS = {
    "chosen": "chosen_logps.png",
    "rejected": "rejected_logps.png",
    "margin": "margin.png",
    "accuracy": "accuracy.png",
}

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


# ---------------------------------------------------------------------------------------------
# Presets


@dataclass
class Prepared:
    """What every run of a comparison shares."""

    sft_dir: Path
    tokenizer: Any
    examples: list[TokenizedExample]
    heldout_pairs: list[TokenizedExample]
    evaluate: Callable[[Any], float]
    preference: dict[str, Any]  # TrainOptions fields shared by every run
    info: dict[str, Any]  # counts and descriptions, for table.json


def _apply(options: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    options = dict(options)
    options.update(dict(overrides))
    return options


@dataclass(frozen=True)
class ArithPreset:
    """``--preset arith``: the embedded default's task, SFT start (same cache) and on-policy pairs."""

    name: ClassVar[str] = "arith"
    task: DefaultTask = DefaultTask()
    seeds: int = 3
    logging_steps: int = 5
    eval_limit: int | None = None  # held-out problems evaluated (None: all of task.heldout_problems)
    overrides: tuple[tuple[str, Any], ...] = ()  # TrainOptions fields over the default run's

    def preference_options(self) -> dict[str, Any]:
        base = {k: v for k, v in DEFAULT_PREFERENCE_OPTIONS.items() if k not in ("objective", "output_dir")}
        return _apply({**base, "logging_steps": self.logging_steps}, self.overrides)

    def prepare(self, output_dir: Path, progress: bool) -> Prepared:
        from miopt.builtin import build_tokenizer
        from miopt.default_run import on_policy_pairs, warm_start
        from miopt.evaluation import evaluate_arithmetic
        from miopt.models import load_model
        from miopt.tasks import arithmetic

        task = self.task
        preference = self.preference_options()
        tokenizer = build_tokenizer()
        train_problems, heldout = arithmetic.generate_splits(
            task.sft_problems + task.preference_prompts, task.heldout_problems, seed=task.seed
        )
        heldout = heldout[: self.eval_limit] if self.eval_limit else heldout
        sft_dir = warm_start(task, tokenizer, train_problems[: task.sft_problems], progress)
        model = load_model(str(sft_dir))
        print("[compare] SFT start: held-out accuracy and on-policy negatives", file=sys.stderr)
        # The same pairs (hence the same reference cache entry) as the default run.
        pairs = functools.partial(
            on_policy_pairs, model, tokenizer, task=task, max_length=preference["max_length"]
        )
        examples = pairs(train_problems[task.sft_problems :], source="arithmetic-pairs")
        heldout_pairs = pairs(heldout, source="arithmetic-heldout-pairs")

        def evaluate(policy) -> float:
            return evaluate_arithmetic(policy, tokenizer, heldout)

        return Prepared(
            sft_dir=sft_dir,
            tokenizer=tokenizer,
            examples=examples,
            heldout_pairs=heldout_pairs,
            evaluate=evaluate,
            preference=preference,
            info={
                "task": "built-in arithmetic (miopt.tasks.arithmetic); the embedded default's SFT start",
                "pairs": "correct worked solution vs. the SFT start's own wrong greedy answer",
                "train_pairs": len(examples),
                "heldout_problems": len(heldout),
                "heldout_pairs": len(heldout_pairs),
                "sft": dataclasses.asdict(task),
            },
        )


@dataclass(frozen=True)
class Gsm8kPreset:
    """``--preset gsm8k``: ``miopt data gsm8k-pairs`` pairs; SFT start trained here from scratch."""

    name: ClassVar[str] = "gsm8k"
    data_dir: str = "../shared/data/gsm8k"
    sft: Gsm8kSFTSettings = Gsm8kSFTSettings()
    heldout_fraction: float = 0.2
    split_seed: int = 0
    seeds: int = 3
    eval_limit: int | None = None  # held-out questions evaluated (None: all)
    max_new_tokens: int = 256
    eval_batch_size: int = 32
    overrides: tuple[tuple[str, Any], ...] = ()

    def preference_options(self) -> dict[str, Any]:
        # the settings of the sizing runs on real GSM8K pairs (beta 0.1, lr 1e-4, batch 8).
        base = {
            "beta": 0.1,
            "learning_rate": 1e-4,
            "batch_size": 8,
            "max_steps": 150,
            "warmup_ratio": 0.1,
            "lr_scheduler": "constant",
            "logging_steps": 5,
            "max_length": self.sft.max_length,
        }
        return _apply(base, self.overrides)

    def prepare(self, output_dir: Path, progress: bool) -> Prepared:
        from miopt.data import load_preference_records
        from miopt.data.tokenize import tokenize_preferences
        from miopt.evaluation import evaluate
        from miopt.evaluation.gsm8k_pairs import EVAL_FILE, HELDOUT_FILE, TRAIN_FILE, convert_gsm8k_pairs
        from miopt.evaluation.tasks import load_jsonl_records
        from miopt.gsm8k_model import warm_start
        from miopt.models import load_tokenizer

        data_dir = Path(self.data_dir)
        sft_settings = dataclasses.replace(self.sft, train_file=str(data_dir / "train.jsonl"))
        preference = self.preference_options()
        sft_dir = warm_start(sft_settings, progress)
        tokenizer = load_tokenizer(str(sft_dir))
        pairs_dir = output_dir / "gsm8k-pairs"
        counts = convert_gsm8k_pairs(
            data_dir / "example_model_solutions.jsonl",
            pairs_dir,
            heldout_fraction=self.heldout_fraction,
            seed=self.split_seed,
        )
        sets = []
        for name in (TRAIN_FILE, HELDOUT_FILE):
            records, _ = load_preference_records(pairs_dir / name, tokenizer)
            examples, report = tokenize_preferences(records, tokenizer, max_length=preference["max_length"])
            print(f"[compare] {name}: {report.describe()}", file=sys.stderr)
            sets.append(examples)
        records = load_jsonl_records(pairs_dir / EVAL_FILE, limit=self.eval_limit)

        def evaluate_model(policy) -> float:
            summary, _ = evaluate(
                policy,
                tokenizer,
                records,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.eval_batch_size,
            )
            return summary["accuracy"]

        return Prepared(
            sft_dir=sft_dir,
            tokenizer=tokenizer,
            examples=sets[0],
            heldout_pairs=sets[1],
            evaluate=evaluate_model,
            preference=preference,
            info={
                "task": "GSM8K (held-out questions of example_model_solutions.jsonl, greedy, number check)",
                "pairs": "miopt data gsm8k-pairs: ground truth / correct samples vs. incorrect samples",
                "train_pairs": len(sets[0]),
                "heldout_pairs": len(sets[1]),
                "heldout_problems": len(records),
                "pair_counts": counts,
                "sft": dataclasses.asdict(sft_settings),
            },
        )


PRESETS: dict[str, type] = {"arith": ArithPreset, "gsm8k": Gsm8kPreset}


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class CompareOptions:
    """Options of ``miopt compare``."""

    output_dir: str = option("", "Folder for table.md, table.json, the plots and runs/<objective>-seed<S>/.")
    preset: str = option(
        "arith", "Task, SFT start and pairs: 'arith' (built-in) or 'gsm8k'.", choices=sorted(PRESETS)
    )
    objectives: list[str] = option(
        list(DEFAULT_OBJECTIVES), "Objectives to train (registry names, or 'sft': the continued-SFT control)."
    )
    seeds: int | None = option(
        None, "Number of seeds 0..S-1 (a seed changes the data order only); None: the preset's (3)."
    )
    max_steps: int | None = option(None, "Override the preset's preference steps (all objectives).")
    learning_rate: float | None = option(None, "Override the preset's learning rate (all objectives).")
    beta: float | None = option(None, "Override the preset's beta (all objectives).")
    batch_size: int | None = option(None, "Override the preset's batch size (all objectives).")
    sft_steps: int | None = option(None, "Override the SFT start's steps (a different cached start).")
    eval_limit: int | None = option(None, "Evaluate at most this many held-out problems; None: all.")
    data_dir: str = option(
        "../shared/data/gsm8k", "GSM8K folder (train.jsonl, example_model_solutions.jsonl); gsm8k preset."
    )
    threads: int = option(0, "torch intra-op threads (0: torch's default).")
    rerun: bool = option(False, "Retrain runs that already have a result in the output folder.")
    progress: bool = option(True, "Show a progress bar per run.")


def check_compare_options(options: CompareOptions) -> None:
    from miopt import objectives

    if not options.output_dir:
        raise OptionError("give --output-dir")
    if not options.objectives:
        raise OptionError("--objectives needs at least one name")
    if len(set(options.objectives)) != len(options.objectives):
        raise OptionError(f"--objectives repeats a name: {' '.join(options.objectives)}")
    for name in options.objectives:  # registry names, TRL names and NAME:WEIGHT,... combinations
        try:
            objectives.parse_spec(name)
        except ValueError as error:
            raise OptionError(f"--objectives: {error}") from None
    if options.seeds is not None and options.seeds < 1:
        raise OptionError(f"--seeds must be at least 1, got {options.seeds}")
    for name in ("max_steps", "batch_size", "sft_steps", "eval_limit"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("learning_rate", "beta"):
        value = getattr(options, name)
        if value is not None and not value > 0:
            raise OptionError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if options.threads < 0:
        raise OptionError("--threads must be >= 0")


def preset_from_options(options: CompareOptions):
    """The named preset with the command line's overrides applied."""
    overrides = tuple(
        (name, getattr(options, name))
        for name in ("max_steps", "learning_rate", "beta", "batch_size")
        if getattr(options, name) is not None
    )
    if options.preset == "arith":
        preset = ArithPreset(overrides=overrides, eval_limit=options.eval_limit)
        if options.sft_steps:
            preset = dataclasses.replace(
                preset, task=dataclasses.replace(preset.task, sft_steps=options.sft_steps)
            )
        return preset
    sft = Gsm8kSFTSettings()
    if options.sft_steps:
        sft = dataclasses.replace(sft, sft_steps=options.sft_steps)
    return Gsm8kPreset(data_dir=options.data_dir, sft=sft, overrides=overrides, eval_limit=options.eval_limit)


# ---------------------------------------------------------------------------------------------
# One run


@torch.no_grad()
def pair_metrics(model, tokenizer, examples, reference, *, batch_size: int = 64) -> dict[str, float]:
    """Pair accuracy and chosen/rejected log-prob change against ``reference`` over ``examples``."""
    from miopt.reference import compute_reference_logps

    if not examples:
        nan = float("nan")
        return {"pair_accuracy": nan, "heldout_chosen_change": nan, "heldout_rejected_change": nan}
    policy = compute_reference_logps(
        model, examples, tokenizer.pad_token_id, batch_size=batch_size, progress=False
    )
    counts = torch.tensor([len(e.rejected_ids) for e in examples])
    mask = torch.arange(policy.rejected.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    chosen = policy.chosen - reference.chosen
    rejected = (policy.rejected - reference.rejected) * mask
    beaten = ((chosen.unsqueeze(1) > rejected) & mask).sum(1) / counts
    return {
        "pair_accuracy": float(beaten.mean()),
        "heldout_chosen_change": float(chosen.mean()),
        "heldout_rejected_change": float((rejected.sum(1) / counts).mean()),
    }


def _read_metrics(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_summary(history: Sequence[dict[str, float]]) -> dict[str, Any]:
    """End-of-training values and the lowest chosen change (the start, step 0 and change 0, included)."""
    last = history[-1]
    points = [(0, 0.0)] + [(int(row["step"]), row["logps/chosen_change"]) for row in history]
    low_step, low = min(points, key=lambda point: point[1])
    return {
        "train_pair_accuracy": last["rewards/accuracies"],
        "chosen_change": last["logps/chosen_change"],
        "rejected_change": last["logps/rejected_change"],
        "chosen_change_min": low,
        "chosen_change_min_step": low_step,
        "curves": {
            "step": [int(row["step"]) for row in history],
            **{key: [row.get(key, float("nan")) for row in history] for key in CURVE_KEYS},
        },
    }


def run_key(preset, objective: str, seed: int, preference: dict[str, Any], sft_dir: Path) -> str:
    text = json.dumps([repr(preset), objective, seed, sorted(preference.items()), str(sft_dir)], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_one(
    prepared: Prepared,
    heldout_reference,
    objective: str,
    seed: int,
    run_dir: Path,
    *,
    key: str,
    progress: bool,
) -> dict[str, Any]:
    """Train one objective with one seed from a freshly loaded SFT start; evaluate; write the result."""
    from miopt.models import load_model
    from miopt.train import TrainOptions, train_on_examples

    started = time.perf_counter()
    options = TrainOptions(
        **prepared.preference,
        objective=objective,
        seed=seed,
        output_dir=str(run_dir),
        model=str(prepared.sft_dir),
        progress=progress,
    )
    model = load_model(str(prepared.sft_dir))
    train_on_examples(
        options, model, prepared.tokenizer, prepared.examples, extra_summary={"compare_seed": seed}
    )
    history = _read_metrics(run_dir / "metrics.jsonl")
    final_accuracy = prepared.evaluate(model)
    result = {
        "objective": objective,
        "seed": seed,
        "key": key,
        "final_accuracy": final_accuracy,
        **pair_metrics(model, prepared.tokenizer, prepared.heldout_pairs, heldout_reference),
        **curve_summary(history),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(run_dir / RESULT_FILE, result)
    return result


# ---------------------------------------------------------------------------------------------
# Aggregation, table and plots


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
    import numpy as np

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

    from miopt.plots import save_figure

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


# ---------------------------------------------------------------------------------------------
# The comparison


def run_compare(options: CompareOptions, preset=None) -> dict[str, Any]:
    """Prepare the shared start, train every objective for every seed, aggregate and write.
    ``preset`` replaces the one named by ``options.preset`` (tests pass smaller ones)."""
    check_compare_options(options)
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        return _run_compare(options, preset if preset is not None else preset_from_options(options))
    finally:
        torch.set_num_threads(threads)


def _run_compare(options: CompareOptions, preset) -> dict[str, Any]:
    from miopt.models import load_model
    from miopt.reference import compute_reference_logps

    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared = preset.prepare(output_dir, options.progress)
    if not prepared.examples:
        raise OptionError("no preference pairs: the SFT start left nothing to contrast")
    sft_model = load_model(str(prepared.sft_dir))
    sft_accuracy = prepared.evaluate(sft_model)
    heldout_reference = (
        compute_reference_logps(
            sft_model, prepared.heldout_pairs, prepared.tokenizer.pad_token_id, batch_size=64, progress=False
        )
        if prepared.heldout_pairs
        else None
    )
    del sft_model
    prepare_seconds = time.perf_counter() - started
    print(
        f"[compare] SFT start {prepared.sft_dir}: held-out accuracy {sft_accuracy:.1%}; "
        f"{len(prepared.examples)} training pairs, {len(prepared.heldout_pairs)} held-out pairs "
        f"({prepare_seconds:.0f} s)",
        file=sys.stderr,
    )

    seeds = list(range(options.seeds or preset.seeds))
    plan = [(objective, seed) for seed in seeds for objective in options.objectives]
    results = []
    run_started = time.perf_counter()
    trained = 0
    for index, (objective, seed) in enumerate(plan, 1):
        run_dir = output_dir / RUNS_DIR / f"{objective}-seed{seed}"
        key = run_key(preset, objective, seed, prepared.preference, prepared.sft_dir)
        result_path = run_dir / RESULT_FILE
        if not options.rerun and result_path.is_file():
            previous = json.loads(result_path.read_text())
            if previous.get("key") == key:
                print(f"[compare] run {index}/{len(plan)}: {objective}, seed {seed}: done before, reused",
                      file=sys.stderr)  # fmt: skip
                results.append({**previous, "sft_accuracy": sft_accuracy})
                continue
        eta = ""
        if trained:
            left = len(plan) - index + 1
            eta = f"; about {(time.perf_counter() - run_started) / trained * left / 60:.0f} min left"
        print(f"[compare] run {index}/{len(plan)}: {objective}, seed {seed}{eta}", file=sys.stderr)
        result = run_one(
            prepared, heldout_reference, objective, seed, run_dir, key=key, progress=options.progress
        )
        trained += 1
        print(
            f"[compare] run {index}/{len(plan)}: {objective}, seed {seed}: held-out accuracy "
            f"{result['final_accuracy']:.1%} (SFT start {sft_accuracy:.1%}), chosen change "
            f"{result['chosen_change']:+.2f}, rejected change {result['rejected_change']:+.2f} nats "
            f"({result['seconds']:.0f} s)",
            file=sys.stderr,
        )
        results.append({**result, "sft_accuracy": sft_accuracy})

    rows = aggregate(results, options.objectives, sft_accuracy)
    table = {
        "settings": {
            "preset": preset.name,
            "preset_repr": repr(preset),
            "objectives": list(options.objectives),
            "seeds": seeds,
            "seed_changes": "the preference stage's data order only (same SFT start, pairs, evaluation)",
            "preference": prepared.preference,
            "sft_model": str(prepared.sft_dir),
        },
        "info": prepared.info,
        "columns": [
            {"key": key, "header": header, "format": kind, "meaning": meaning}
            for key, header, kind, meaning in COLUMNS
        ],
        "rows": rows,
        "runs": [{k: v for k, v in r.items() if k != "curves"} for r in results],
        "machine": machine_info(),
        "prepare_seconds": round(prepare_seconds, 1),
        "runs_seconds": round(sum(r["seconds"] for r in results), 1),
        "reused_runs": len(results) - trained,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    subtitle = (
        f"{preset.name}: {', '.join(options.objectives)}; beta {prepared.preference.get('beta')}, "
        f"lr {prepared.preference.get('learning_rate')}, {prepared.preference.get('max_steps')} steps"
    )
    for quantity, name in PLOTS.items():
        plot_quantity(results, options.objectives, quantity, output_dir / name, subtitle)
    atomic_write_json(output_dir / TABLE_JSON, _finite_json(table))
    write_markdown(output_dir / TABLE_MD, table)
    return table


def _finite_json(value):
    """NaN/inf as None, so table.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


__all__ = [
    "COLUMNS",
    "PLOTS",
    "SFT_CONTROL",
    "ArithPreset",
    "CompareOptions",
    "Gsm8kPreset",
    "Prepared",
    "run_compare",
]

"""``miopt compare``'s presets: what every run of a comparison shares (start, pairs, evaluation).

The presets' steps import their machinery when they run: ``miopt compare --help`` imports this module
to list the presets, and must not load the models' code (see miopt.commands).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from miopt.data.tokenize import TokenizedExample
from miopt.experiments.default_run import DEFAULT_PREFERENCE_OPTIONS
from miopt.experiments.gsm8k_model import Gsm8kSFTSettings
from miopt.tasks.default import DefaultTask


@dataclass
class Prepared:
    """What every run of a comparison shares."""

    sft_dir: Path | str  # the start every run loads (a folder, or a name such as builtin:arith)
    tokenizer: Any
    examples: list[TokenizedExample]
    heldout_pairs: list[TokenizedExample]
    evaluate: Callable[[Any], float]
    preference: dict[str, Any]  # TrainOptions fields shared by every run
    info: dict[str, Any]  # counts and descriptions, for table.json
    sample: Callable[[Any], dict[str, float]] | None = None  # pass@1 / pass@k of a model, if measured
    validate: Callable[[Any], float] | None = None  # validation-split accuracy (settings selection)


def _apply(options: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    options = dict(options)
    options.update(dict(overrides))
    return options


@dataclass(frozen=True)
class ArithPreset:
    """``--preset arith``: the default run's start (the shipped ``builtin:arith``), on-policy pairs on
    its preference prompts, held-out problems and preference settings."""

    name: ClassVar[str] = "arith"
    objectives: ClassVar[tuple[str, ...]] = ("dpo", "mio")
    task: DefaultTask = DefaultTask()
    start_model: str = "builtin:arith"
    seeds: int = 3
    logging_steps: int = 5
    eval_limit: int | None = None  # held-out problems evaluated (None: all of task.heldout_problems)
    overrides: tuple[tuple[str, Any], ...] = ()  # TrainOptions fields over the default run's

    def preference_options(self) -> dict[str, Any]:
        base = {k: v for k, v in DEFAULT_PREFERENCE_OPTIONS.items() if k not in ("objective", "output_dir")}
        return _apply({**base, "logging_steps": self.logging_steps}, self.overrides)

    def prepare(self, output_dir: Path, progress: bool) -> Prepared:
        from miopt.evaluation import evaluate_arithmetic
        from miopt.experiments.default_run import on_policy_pairs
        from miopt.model.loading import load_model, load_tokenizer
        from miopt.tasks.default import task_splits

        task = self.task
        preference = self.preference_options()
        tokenizer = load_tokenizer(self.start_model)
        splits = task_splits(task)
        heldout = splits.heldout[: self.eval_limit] if self.eval_limit else splits.heldout
        model = load_model(self.start_model)
        print("[compare] the start: on-policy negatives", file=sys.stderr)
        # The same pairs (hence the same reference cache entry) as the default run.
        pairs = functools.partial(
            on_policy_pairs, model, tokenizer, task=task, max_length=preference["max_length"]
        )
        examples = pairs(splits.preference, source="arithmetic-pairs")
        heldout_pairs = pairs(heldout, source="arithmetic-heldout-pairs")

        def evaluate(policy) -> float:
            return evaluate_arithmetic(policy, tokenizer, heldout)

        return Prepared(
            sft_dir=self.start_model,
            tokenizer=tokenizer,
            examples=examples,
            heldout_pairs=heldout_pairs,
            evaluate=evaluate,
            preference=preference,
            info={
                "task": "built-in arithmetic (miopt.tasks.arithmetic); the shipped start " + self.start_model,
                "pairs": "correct worked solution vs. the start's own wrong greedy answer",
                "train_pairs": len(examples),
                "heldout_problems": len(heldout),
                "heldout_pairs": len(heldout_pairs),
                "task_splits": dataclasses.asdict(task),
            },
        )


@dataclass(frozen=True)
class Gsm8kPreset:
    """``--preset gsm8k``: ``miopt data gsm8k-pairs`` pairs; SFT start trained here from scratch."""

    name: ClassVar[str] = "gsm8k"
    objectives: ClassVar[tuple[str, ...]] = ("dpo", "mio")
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
        from miopt.experiments.gsm8k_model import warm_start
        from miopt.model.loading import load_tokenizer

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

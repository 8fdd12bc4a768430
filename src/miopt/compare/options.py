"""``miopt compare``'s options and their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from miopt.compare.presets import PRESETS, ArithPreset, Gsm8kPreset
from miopt.config import option
from miopt.errors import OptionError
from miopt.gsm8k_model import Gsm8kSFTSettings

DEFAULT_OBJECTIVES = ("dpo", "mio")


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
    sft_steps: int | None = option(
        None, "Override the SFT start's steps (gsm8k preset; arith uses the shipped start)."
    )
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
    if options.sft_steps and options.preset == "arith":
        raise OptionError("--sft-steps applies to --preset gsm8k; --preset arith uses the shipped start")
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
        return ArithPreset(overrides=overrides, eval_limit=options.eval_limit)
    sft = Gsm8kSFTSettings()
    if options.sft_steps:
        sft = dataclasses.replace(sft, sft_steps=options.sft_steps)
    return Gsm8kPreset(data_dir=options.data_dir, sft=sft, overrides=overrides, eval_limit=options.eval_limit)

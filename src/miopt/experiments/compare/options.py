"""``miopt compare``'s options and their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from miopt.config import option
from miopt.errors import OptionError
from miopt.experiments.compare.presets import ArithPreset, Gsm8kPreset
from miopt.experiments.compare.smollm2 import PlateauSFT, SmolLM2ArithPreset
from miopt.experiments.gsm8k_model import Gsm8kSFTSettings

DEFAULT_OBJECTIVES = ("dpo", "mio")
PRESETS: dict[str, type] = {"arith": ArithPreset, "gsm8k": Gsm8kPreset, "smollm2-arith": SmolLM2ArithPreset}


@dataclass
class CompareOptions:
    """Options of ``miopt compare``."""

    output_dir: str = option("", "Folder for table.md, table.json, the plots and runs/<objective>-seed<S>/.")
    preset: str = option(
        "arith",
        "Task, SFT start and pairs: 'arith' (built-in model and task), 'gsm8k' (a small model trained "
        "here on GSM8K), or 'smollm2-arith' (the real SmolLM2-135M-Instruct, SFT to its plateau on a "
        "built-in arithmetic task, pairs from its own samples; README 'A real model').",
        choices=sorted(PRESETS),
    )
    model: str | None = option(
        None,
        "Start model of --preset smollm2-arith or arith (a folder, hub id such as "
        "HuggingFaceTB/SmolLM2-135M-Instruct, or .gguf file); default: the preset's (smollm2-arith: "
        "the file of 'miopt fetch smollm2', fetched when missing).",
    )
    objectives: list[str] | None = option(
        None,
        "Objectives to train (registry names, or 'sft': the continued-SFT control); None: the preset's "
        "(arith, gsm8k: dpo mio; smollm2-arith: mio dpo dpop cal_dpo sft).",
    )
    seeds: int | None = option(
        None, "Number of seeds 0..S-1 (a seed changes the data order only); None: the preset's (3)."
    )
    max_steps: int | None = option(None, "Override the preset's preference steps (all objectives).")
    learning_rate: float | None = option(None, "Override the preset's learning rate (all objectives).")
    beta: float | None = option(None, "Override the preset's beta (all objectives).")
    batch_size: int | None = option(None, "Override the preset's batch size (all objectives).")
    sft_steps: int | None = option(
        None,
        "Override the SFT start's steps (gsm8k); smollm2-arith: the most SFT steps of its plateau search; "
        "arith uses the shipped start.",
    )
    eval_limit: int | None = option(None, "Evaluate at most this many held-out problems; None: all.")
    data_dir: str = option(
        "../shared/data/gsm8k", "GSM8K folder (train.jsonl, example_model_solutions.jsonl); gsm8k preset."
    )
    threads: int = option(0, "torch intra-op threads (0: torch's default).")
    select_settings: bool = option(
        True,
        "Choose each objective's setting on the validation split among the preset's candidates "
        "(smollm2-arith: learning rate 1e-5 or 3e-5), seed 0, before the held-out evaluation; false: "
        "every objective uses the preset's shared setting. An --learning-rate or --beta override turns "
        "off the choice over that option.",
    )
    rerun: bool = option(False, "Retrain runs that already have a result in the output folder.")
    progress: bool = option(True, "Show a progress bar per run.")


def check_compare_options(options: CompareOptions) -> None:
    from miopt import objectives

    if not options.output_dir:
        raise OptionError("give --output-dir")
    if options.objectives is not None and not options.objectives:
        raise OptionError("--objectives needs at least one name")
    if options.objectives and len(set(options.objectives)) != len(options.objectives):
        raise OptionError(f"--objectives repeats a name: {' '.join(options.objectives)}")
    for name in options.objectives or ():  # registry names, TRL names and NAME:WEIGHT,... combinations
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
    if options.model and options.preset == "gsm8k":
        raise OptionError("--model applies to --preset smollm2-arith and arith; gsm8k trains its own start")
    if options.model:
        from miopt.model.loading import check_model_source

        check_model_source(options.model)


def preset_from_options(options: CompareOptions):
    """The named preset with the command line's overrides applied."""
    overrides = tuple(
        (name, getattr(options, name))
        for name in ("max_steps", "learning_rate", "beta", "batch_size")
        if getattr(options, name) is not None
    )
    if options.preset == "arith":
        start = {"start_model": options.model} if options.model else {}
        return ArithPreset(overrides=overrides, eval_limit=options.eval_limit, **start)
    if options.preset == "smollm2-arith":
        sft = PlateauSFT()
        if options.sft_steps:
            segments = max(1, -(-options.sft_steps // sft.segment_steps))
            sft = dataclasses.replace(
                sft, max_segments=segments, min_segments=min(sft.min_segments, segments)
            )
        limit = {"eval_limit": options.eval_limit} if options.eval_limit else {}
        overridden = {name for name, _ in overrides}
        grid = tuple(
            candidate
            for candidate in SmolLM2ArithPreset.settings_grid
            if not overridden & {name for name, _ in candidate}
        )
        return SmolLM2ArithPreset(
            start_model=options.model, sft=sft, overrides=overrides, settings_grid=grid, **limit
        )
    sft = Gsm8kSFTSettings()
    if options.sft_steps:
        sft = dataclasses.replace(sft, sft_steps=options.sft_steps)
    return Gsm8kPreset(data_dir=options.data_dir, sft=sft, overrides=overrides, eval_limit=options.eval_limit)

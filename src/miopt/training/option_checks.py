"""The checks of ``train``'s options (and ``sft``'s model options), run before any data or model is
loaded; each failure is one line naming the flag and what it accepts. :func:`check_train_options` is
the one call for a training command. The loop's
own options are checked in :func:`miopt.run.loop.check_loop_options`, NaN and infinity generically in
:func:`miopt.config.check_finite_floats`."""

from __future__ import annotations

from typing import Any

from miopt.errors import OptionError, require
from miopt.model.loading import check_4bit_available, check_model_source
from miopt.run.loop import check_loop_options
from miopt.training.objective_flags import objective_options

DTYPES = ("float32", "bfloat16", "float16")


def check_model_options(options: Any) -> None:
    """``ModelOptions``: dtype, truncation, LoRA and log-prob chunk."""
    o = options
    require(o.dtype is None or o.dtype in DTYPES, "--dtype", f"one of {', '.join(DTYPES)}", o.dtype)
    require(o.max_length >= 2, "--max-length", ">= 2", o.max_length)
    if o.max_prompt_length is not None:
        rule = f"in [1, --max-length - 1 = {o.max_length - 1}]"
        require(1 <= o.max_prompt_length < o.max_length, "--max-prompt-length", rule, o.max_prompt_length)
    require(o.lora_r >= 0, "--lora-r", ">= 0 (0: train all weights)", o.lora_r)
    require(o.lora_alpha > 0, "--lora-alpha", "> 0", o.lora_alpha)
    require(0 <= o.lora_dropout < 1, "--lora-dropout", "in [0, 1)", o.lora_dropout)
    require(o.logprob_chunk >= 0, "--logprob-chunk", ">= 0 (0: full logits)", o.logprob_chunk)


def check_model_sources(options: Any) -> None:
    """The model names exist (a GGUF file is one, with the ``gguf`` package installed); run after the
    value checks, so that a bad value is reported before a missing file."""
    check_model_source(options.model)
    check_model_source(getattr(options, "ref_model", None))


def check_preference_ranges(options: Any) -> None:
    """``TrainOptions``: beta, the NLL weight, the warning (the objective's own options are checked by
    the objectives registry, :mod:`miopt.training.objective_flags`)."""
    o = options
    require(o.beta > 0, "--beta", "> 0", o.beta)
    require(o.sft_weight >= 0, "--sft-weight", ">= 0", o.sft_weight)
    warning = o.chosen_decline_warning
    require(warning >= 0, "--chosen-decline-warning", ">= 0 (0 disables)", warning)


def check_train_options(options: Any) -> None:
    """Every check of ``miopt train``'s options (and of the runs of ``online`` and ``compare``), in one
    call before any data or model is loaded: the loop's, the model's, the objective's (by the
    registry), the preference ranges, the LoRA and 4-bit rules, then the model names."""
    check_loop_options(options)
    check_model_options(options)
    objective_options(options)
    check_preference_ranges(options)
    if options.merge_lora and not options.lora_r:
        raise OptionError("--merge-lora needs --lora-r > 0")
    if options.load_in_4bit:
        if not options.lora_r:
            raise OptionError(
                "--load-in-4bit needs --lora-r > 0 (a 4-bit base is frozen; only adapters train)"
            )
        if options.merge_lora:
            raise OptionError(
                "--merge-lora with --load-in-4bit would merge into quantised weights; save the adapter and "
                "merge it into the full-precision base afterwards (docs/distributed.md)"
            )
        check_4bit_available()
    check_model_sources(options)

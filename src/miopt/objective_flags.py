"""Objective options from ``miopt train``'s flags, validated by the registry before anything loads.

The dedicated flags (``--negatives``, ``--label-smoothing``, ``--simpo-gamma``) and the generic
``--objective-option KEY=VALUE`` are collected and checked by
:func:`miopt.objectives.resolve_options` against the options each objective declares, so a new
objective's options are validated without touching the commands.
"""

from __future__ import annotations

from typing import Any

from miopt import objectives
from miopt.errors import OptionError

# Objective options a flag can set: flag field -> the objective's keyword.
OBJECTIVE_FLAGS = {"negatives": "negatives", "label_smoothing": "label_smoothing", "simpo_gamma": "gamma"}


# Modifiers whose inputs the step function does not compute (documented in miopt.objectives.modifiers).
UNSUPPORTED_IN_TRAIN = {
    "use_weighting": "needs each token's sum over the vocabulary of squared probabilities, which the chunked "
    "log-prob head does not compute (available in the objectives API: miopt.objectives.with_wpo_weighting)",
    "ld_alpha": "needs per-token reference log-probs, which the reference cache (summed log-probs) does not "
    "hold (available in the objectives API: miopt.objectives.ld_logps)",
}


def given_objective_options(options) -> dict[str, Any]:
    """Objective options set by flags (--negatives, --label-smoothing, --simpo-gamma) and --objective-option."""
    given: dict[str, Any] = {}
    for flag, keyword in OBJECTIVE_FLAGS.items():
        value = getattr(options, flag)
        if value is not None:
            given[keyword] = value
    for item in options.objective_option or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--objective-option takes KEY=VALUE, got {item!r}")
        given[key.strip()] = value.strip()
    return given


def objective_options(options) -> dict[str, dict[str, Any]]:
    """The objective's options, validated against its registry declaration: ``{term: {option: value}}``."""
    try:
        resolved = objectives.resolve_options(options.objective, given_objective_options(options))
    except ValueError as error:  # unknown name, bad weight, option not taken or out of range
        message = str(error)
        for flag, keyword in OBJECTIVE_FLAGS.items():  # name the flag that set a rejected option
            words = message.split(" ")
            if getattr(options, flag) is not None and (
                words[0] == keyword or words[:2] == ["option", keyword]
            ):
                message = f"--{flag.replace('_', '-')}: {message}"
        raise OptionError(message) from None
    for term in resolved.values():
        if term.get("use_weighting") or term.get("ld_alpha", 1.0) != 1.0:
            key = "use_weighting" if term.get("use_weighting") else "ld_alpha"
            raise OptionError(f"{key} is not supported by miopt train: it {UNSUPPORTED_IN_TRAIN[key]}")
    return resolved

"""Objective options from ``miopt train``'s flags, validated by the registry before anything loads.

The dedicated flags (``--negatives``, ``--label-smoothing``, ``--simpo-gamma``, and TRL's
``--use-weighting``, ``--ld-alpha``, ``--f-divergence-type``, ``--f-alpha-divergence-coef``,
``--discopop-tau``) and the generic
``--objective-option KEY=VALUE`` are collected and checked by
:func:`miopt.objectives.resolve_options` against the options each objective declares, so a new
objective's options are validated without touching the commands.
"""

from __future__ import annotations

from typing import Any

from miopt import objectives
from miopt.errors import OptionError

# Objective options a flag can set: flag field -> the objective's keyword. TRL's DPOConfig names
# (use_weighting, ld_alpha, f_divergence_type, ...) are flags too, so a TRL user's YAML keys work.
OBJECTIVE_FLAGS = {
    "negatives": "negatives",
    "label_smoothing": "label_smoothing",
    "simpo_gamma": "gamma",
    "use_weighting": "use_weighting",
    "ld_alpha": "ld_alpha",
    "f_divergence_type": "f_divergence_type",
    "f_alpha_divergence_coef": "f_alpha_divergence_coef",
    "discopop_tau": "discopop_tau",
}


def given_objective_options(options) -> dict[str, Any]:
    """Objective options set by the dedicated flags (:data:`OBJECTIVE_FLAGS`) and --objective-option."""
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
    if getattr(options, "sft_weight", 0) and objectives.is_unpaired(options.objective):
        raise OptionError(
            "--sft-weight does not apply to unpaired objectives (kto): there is no chosen response"
        )
    return resolved


def ld_alpha_of(options) -> float | None:
    """The LD-DPO ``ld_alpha`` set for the objective (a log-prob transform the step function applies)."""
    values = {term["ld_alpha"] for term in objective_options(options).values() if "ld_alpha" in term}
    if len(values) > 1:
        raise OptionError("ld_alpha must be the same for every term of a combination")
    return values.pop() if values else None


def uses_weighting(options) -> bool:
    """Whether a term of the objective is WPO-weighted (``use_weighting``): the step function then
    computes each response's WPO input from the log-prob head's same pass."""
    return any(term.get("use_weighting") for term in objective_options(options).values())

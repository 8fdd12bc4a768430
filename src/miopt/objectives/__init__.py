"""Preference objectives as MI estimators: one signature, one registry.

Every objective is called as
``objective(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
beta=..., **options)`` with summed response log-probs (chosen ``[B]``, rejected ``[B]`` or
``[B, K]`` with ``rejected_mask``) and returns an :class:`ObjectiveOutput` whose ``losses`` is
``[B]``. Add an objective: write the function (a module of its family), add one
:class:`~miopt.objectives.registry.Entry` (with its options' valid values) to the registry, add
its tests. Specs such as ``"mio:1.0,sft:0.5"`` combine objectives with weights
(:func:`build`); :func:`resolve_options` validates options before anything is loaded.
"""

from __future__ import annotations

from torch import Tensor

from miopt.objectives.base import Objective, ObjectiveOutput, accepts
from miopt.objectives.baselines import BCO, hinge, ipo, robust, simpo
from miopt.objectives.decline import cal_dpo, dpop
from miopt.objectives.estimators import dv, js, nwj
from miopt.objectives.kto import KTOOutput, kto
from miopt.objectives.modifiers import (
    f_divergence_score,
    ld_combine,
    ld_logps,
    ld_tail_logps,
    with_f_divergence,
    with_wpo_weighting,
    wpo_token_terms,
)
from miopt.objectives.options import ObjectiveOptionError, OptionSpec
from miopt.objectives.registry import (
    NAMED_COMBINATIONS,
    TRL_ALIASES,
    Combination,
    UnknownObjectiveError,
    available,
    build,
    entry,
    get,
    is_unpaired,
    option_names,
    options_of,
    parse_spec,
    resolve_options,
)
from miopt.objectives.sft import continued_sft, with_sft_term
from miopt.objectives.trl_losses import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    discopop,
    exo_pair,
    sigmoid_norm,
    sppo_hard,
)


def is_reference_free(objective: Objective) -> bool:
    """Whether the objective ignores reference log-probs (no reference pass is needed)."""
    return bool(getattr(objective, "reference_free", False))


def compute(
    objective: Objective,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    rejected_mask: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **options,
) -> ObjectiveOutput:
    """Call ``objective`` passing batch-provided options (lengths, labels, ...) only where it accepts them."""
    batch_options = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    for key, value in batch_options.items():
        if value is not None and accepts(objective, key):
            options[key] = value
    return objective(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        rejected_mask=rejected_mask,
        **options,
    )


__all__ = [
    "BCO",
    "NAMED_COMBINATIONS",
    "TRL_ALIASES",
    "Combination",
    "KTOOutput",
    "Objective",
    "ObjectiveOptionError",
    "ObjectiveOutput",
    "OptionSpec",
    "UnknownObjectiveError",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "available",
    "build",
    "cal_dpo",
    "compute",
    "continued_sft",
    "discopop",
    "dpop",
    "dv",
    "entry",
    "exo_pair",
    "f_divergence_score",
    "get",
    "hinge",
    "ipo",
    "is_reference_free",
    "is_unpaired",
    "js",
    "kto",
    "ld_combine",
    "ld_logps",
    "ld_tail_logps",
    "nwj",
    "option_names",
    "options_of",
    "parse_spec",
    "resolve_options",
    "robust",
    "sigmoid_norm",
    "simpo",
    "sppo_hard",
    "with_f_divergence",
    "with_sft_term",
    "with_wpo_weighting",
    "wpo_token_terms",
]

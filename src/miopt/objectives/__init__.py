"""Preference objectives as MI estimators: one signature, one registry, one protocol.

Every loss function is called as
``loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
beta=..., **options)`` with summed response log-probs (chosen ``[B]``, rejected ``[B]`` or
``[B, K]`` with ``rejected_mask``) and returns an :class:`ObjectiveOutput` whose ``losses`` is
``[B]``. :func:`build` turns a spec (``"mio"``, ``"mio:1.0,sft:0.5"``, ``"rpo"``) and its options
into an :class:`Objective`, which is called the same way and says what it needs (batch inputs,
reference, unpaired rows, state). :func:`resolve_options` validates options before anything is
loaded. Add an objective: write the function (a module of its family), add one
:class:`~miopt.objectives.registry.Entry` (with its options' valid values) to the registry, add
its tests (CONTRIBUTING.md).
"""

from __future__ import annotations

from torch import Tensor

from miopt.objectives.base import ObjectiveOutput
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
from miopt.objectives.objective import BATCH_INPUTS, LossFunction, Objective, Stateful
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
from miopt.objectives.sft import continued_sft
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


def compute(
    objective: Objective | LossFunction,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    **batch,
) -> ObjectiveOutput:
    """``objective`` on a batch, a bare loss function taken as :meth:`Objective.of` (batch inputs it
    does not read are dropped)."""
    if not isinstance(objective, Objective):
        objective = Objective.of(objective)
    return objective(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, **batch
    )


__all__ = [
    "BCO",
    "NAMED_COMBINATIONS",
    "TRL_ALIASES",
    "Combination",
    "KTOOutput",
    "BATCH_INPUTS",
    "LossFunction",
    "Objective",
    "ObjectiveOptionError",
    "ObjectiveOutput",
    "OptionSpec",
    "Stateful",
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
    "with_wpo_weighting",
    "wpo_token_terms",
]

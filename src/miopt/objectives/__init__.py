"""Preference objectives as MI estimators: one signature, one registry.

Every objective is called as
``objective(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
beta=..., **options)`` with summed response log-probs (chosen ``[B]``, rejected ``[B]`` or
``[B, K]`` with ``rejected_mask``) and returns an :class:`ObjectiveOutput` whose ``losses`` is
``[B]``. Add an objective: write the function (estimators.py or baselines.py), add one line
to ``_REGISTRY``, add one test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor

from miopt.objectives.base import Objective, ObjectiveOutput, accepts
from miopt.objectives.baselines import BCO, hinge, ipo, robust, simpo
from miopt.objectives.estimators import dv, js, nwj
from miopt.objectives.sft import continued_sft, with_sft_term

# name -> the objective, or a class whose instance is the objective (stateful objectives).
_REGISTRY: dict[str, Callable[..., ObjectiveOutput] | type] = {
    "mio": js,  # the paper's MIO: JS estimator, marginal negatives
    "dpo": dv,  # DPO: DV estimator, marginal negatives
    "dv": dv,
    "js": js,
    "nwj": nwj,
    "ipo": ipo,
    "hinge": hinge,
    "robust": robust,
    "simpo": simpo,
    "bco": BCO,
    "sft": continued_sft,  # the continued-SFT control: NLL of the chosen responses only
}


class UnknownObjectiveError(ValueError):
    """Raised for a name that is not in the registry; the message lists the valid names."""


def available() -> list[str]:
    """Names accepted by :func:`get`."""
    return list(_REGISTRY)


def get(name: str, sft_weight: float = 0.0) -> Objective:
    """The objective registered as ``name``, optionally plus an SFT term of weight ``sft_weight``."""
    if name not in _REGISTRY:
        raise UnknownObjectiveError(f"unknown objective {name!r}; valid objectives: {', '.join(available())}")
    entry = _REGISTRY[name]
    objective = entry() if inspect.isclass(entry) else entry
    # Any non-zero weight goes through with_sft_term, which rejects negative weights.
    return with_sft_term(objective, sft_weight) if sft_weight != 0 else objective


def is_reference_free(objective: Objective) -> bool:
    """Whether the objective ignores reference log-probs (no reference pass is needed)."""
    return bool(getattr(objective, "reference_free", False))


def option_names(name: str) -> list[str]:
    """The keyword options the named objective accepts (besides the four log-prob tensors)."""
    entry = _REGISTRY[name]
    target = entry.__call__ if inspect.isclass(entry) else entry
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


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
    """Call ``objective`` passing batch-provided options (lengths) only where it accepts them."""
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
    "Objective",
    "ObjectiveOutput",
    "UnknownObjectiveError",
    "available",
    "compute",
    "continued_sft",
    "dv",
    "get",
    "hinge",
    "ipo",
    "is_reference_free",
    "js",
    "nwj",
    "option_names",
    "robust",
    "simpo",
    "with_sft_term",
]

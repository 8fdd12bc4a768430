"""Supervised (NLL) terms on the chosen response: the ``sft`` objective (continued SFT, the
control every preference experiment needs) and the optional term addable to any objective."""

from __future__ import annotations

import torch
from torch import Tensor

from miopt.objectives.base import Objective, ObjectiveOutput, accepts
from miopt.objectives.estimators import dv


def continued_sft(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    rejected_mask: Tensor | None = None,
    chosen_lengths: Tensor,
) -> ObjectiveOutput:
    """Continued SFT on the chosen responses, registered as ``sft``: per prompt the chosen
    response's mean token NLL, ``-log pi(y_w|x) / |y_w|`` (the term RPO adds to DPO, Pang et al.
    2024 eq. 3; :func:`with_sft_term` adds the same term to any objective).

    The rejected responses get no gradient. The diagnostics (critic values, pair accuracy,
    ``mi_bound``) are DPO's at the same ``beta``, so its columns read like every other objective's.
    """
    output = dv(
        policy_chosen_logps.detach(),
        policy_rejected_logps.detach(),
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        rejected_mask=rejected_mask,
    )
    lengths = chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    output.losses = -policy_chosen_logps / lengths
    # -dL/dT_w with T_w = beta (log pi - log pi_ref): 1 / (beta |y_w|) per prompt.
    output.chosen_grad_weight = (1.0 / (lengths * beta)).detach()
    output.rejected_grad_weight = torch.zeros_like(output.chosen_rewards)
    return output


def with_sft_term(objective: Objective, weight: float) -> Objective:
    """Wrap ``objective`` so its losses gain ``weight * (-log pi(y_w|x) / |y_w|)``.

    The chosen response's mean token NLL, as in RPO (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", eq. 3; TRL's ``rpo_alpha``). The wrapped objective needs
    ``chosen_lengths``; diagnostics are those of ``objective``.
    """
    if weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {weight}")
    passes_lengths = accepts(objective, "chosen_lengths")

    def wrapped(policy_chosen_logps: Tensor, *args, chosen_lengths: Tensor, **kwargs) -> ObjectiveOutput:
        if passes_lengths:
            kwargs["chosen_lengths"] = chosen_lengths
        output = objective(policy_chosen_logps, *args, **kwargs)
        nll = -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
        output.losses = output.losses + weight * nll
        return output

    wrapped.__name__ = f"{getattr(objective, '__name__', type(objective).__name__)}+sft"
    wrapped.__doc__ = f"{objective.__doc__}\n\nPlus {weight} x chosen NLL (with_sft_term)."
    wrapped.reference_free = getattr(objective, "reference_free", False)  # type: ignore[attr-defined]
    wrapped.inner = objective  # type: ignore[attr-defined]
    return wrapped

"""The supervised (NLL) term on the chosen response: the ``sft`` objective, both the control every
preference experiment needs (continued SFT) and, weighted, the term any objective can gain
(``--sft-weight w`` is the combination ``NAME:1,sft:w``; ``rpo`` is ``dpo:1,sft:1``)."""

from __future__ import annotations

import torch
from torch import Tensor

from miopt.objectives.base import ObjectiveOutput
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
    2024 eq. 3; ``--sft-weight`` adds this term to any objective).

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

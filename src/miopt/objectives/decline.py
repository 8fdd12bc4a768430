"""Published fixes for the decline of the chosen likelihood under DPO (theory.md section 2), the
methods MIO is compared with. RPO (DPO plus the chosen NLL, Pang et al. 2024) is the registry's
named combination ``rpo`` = ``dpo:1.0,sft:1.0`` (see ``miopt.objectives.registry``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from miopt.objectives.base import (
    ObjectiveOutput,
    critic_values,
    dv_bound,
    evaluate,
    masked_mean,
    pairwise_mean,
)


def dpop(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    dpop_lambda: float = 50.0,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", eq. 3):

    ``loss = -log sigmoid(beta * (h_w - h_l - lambda * max(0, log pi_ref(y_w|x) / pi(y_w|x))))``,

    ``h = log pi / pi_ref``. The penalty switches on as soon as the chosen log-ratio falls below zero,
    i.e. whenever the chosen likelihood drops under the reference's. In critic units
    ``beta * max(0, -h_w) = max(0, -T_w)``, so the margin is ``T_w - T_l - lambda * relu(-T_w)``.
    ``lambda = 50`` is the paper's value. With K negatives the loss is averaged over the pairs.
    No TRL counterpart (DPOTrainer has no dpop loss type).
    """
    if dpop_lambda < 0:
        raise ValueError(f"dpop_lambda must be >= 0, got {dpop_lambda}")
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        penalised = t_w - dpop_lambda * torch.relu(-t_w)
        losses = pairwise_mean(lambda margin: -F.logsigmoid(margin), penalised, t_neg, neg_mask)
        return losses, dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


def cal_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """Cal-DPO (Xiao et al. 2024, "Cal-DPO: Calibrated Direct Preference Optimization for Language
    Model Alignment", eq. 10):

    ``loss = -log sigmoid(h_w - h_l) + (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2``,

    ``h = log pi / pi_ref = T / beta`` (the contrastive term on the unscaled log-ratios). The squared
    terms calibrate each implicit reward to the scale of a +-1/2 reward, so the chosen log-ratio is
    pulled up to ``1/(2 beta)`` on its own instead of only relative to the rejected one. With K
    negatives the contrastive and rejected terms are averaged over them. No TRL counterpart.
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )
    target = 0.5 / beta

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        h_w, h_neg = t_w / beta, t_neg / beta
        contrastive = pairwise_mean(lambda margin: -F.logsigmoid(margin), h_w, h_neg, neg_mask)
        calibration = (h_w - target) ** 2 + masked_mean((h_neg + target) ** 2, neg_mask)
        return contrastive + calibration, dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)

"""Variational MI estimators as preference objectives: DV (= DPO), JS (= MIO), NWJ.

Each estimator lower-bounds a divergence between the positive distribution ``P`` (chosen
responses) and a negative distribution ``Q``. ``negatives="marginal"`` (default, the paper's
choice) takes ``Q`` uniform over ``{y_w, y_1..y_K}``; ``negatives="rejected"`` takes ``Q``
uniform over ``{y_1..y_K}`` only. Source: Lv et al. 2025, "The Hidden Link Between RLHF and
Contrastive Learning" (arXiv 2506.22578); docs/theory.md sections 2-4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from miopt.objectives.base import (
    ObjectiveOutput,
    check_negatives,
    critic_values,
    evaluate,
    masked_mean,
    with_positive,
)

# exp(T - 1) overflows float32 past T ~ 89; NWJ is clamped below that (value and gradient stay finite).
NWJ_MAX_CRITIC = 80.0


def dv(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    negatives: str = "marginal",
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """Donsker-Varadhan bound ``KL(P||Q) >= E_P[T] - log E_Q[exp T]``; with one pair, DPO.

    marginal:  ``loss = -T_w + logsumexp(T_w, T_1..T_K)``, which for K=1 is
    ``-log sigmoid(T_w - T_l)`` (DPO, Rafailov et al. 2023, eq. 7); ``mi_bound = log(K+1) - loss``.
    With K>1 it is the InfoNCE / listwise (Plackett-Luce top-1) form (van den Oord et al. 2018).
    rejected:  ``loss = -T_w + log mean_k exp T_k``, unbounded below (theory.md section 3).

    TRL counterpart: ``loss_type="sigmoid"`` with ``label_smoothing=0`` coincides exactly for
    one pair (same critic, no length normalisation, no offset).
    """
    check_negatives(negatives)
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        if negatives == "marginal":
            values, full_mask = with_positive(t_w, t_neg, neg_mask)
        else:
            values, full_mask = t_neg, neg_mask
        # Critics relative to T_w before the logsumexp: -T_w + logsumexp(T) computed as
        # logsumexp(T - T_w) depends on the margins only, so large critics do not cancel
        # catastrophically (float32 at |T| ~ 1e4 would otherwise be off by ~1e-3, even negative).
        relative = values - t_w.unsqueeze(-1)
        log_sum = torch.logsumexp(relative.masked_fill(~full_mask, float("-inf")), dim=-1)
        log_count = torch.log(full_mask.sum(-1).to(t_w.dtype))
        bound = log_count - log_sum  # T_w - log mean_Q exp T
        # marginal: -T_w + logsumexp over the K_b + 1 real entries = log(K_b + 1) - bound.
        losses = log_sum if negatives == "marginal" else -bound
        return losses, bound

    return evaluate(body, chosen, rejected, mask)


def js(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    negatives: str = "marginal",
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """Jensen-Shannon bound ``E_P[-softplus(-T)] - E_Q[softplus(T)]``; with one pair, MIO.

    marginal:  ``loss = softplus(-T_w) + mean_{w,1..K} softplus(T)``; for K=1,
    ``-log sigmoid(T_w) - 1/2 log sigmoid(-T_w) - 1/2 log sigmoid(-T_l)``, ``log 4`` at zero.
    rejected:  ``loss = softplus(-T_w) + mean_k softplus(T_k)`` (TRL's ``bco_pair`` without offset).
    ``mi_bound = -loss``, an estimate of ``2 JSD(P, Q) - log 4`` (Hjelm et al. 2019, eq. 4;
    Nowozin et al. 2016). Chosen and rejected gradients are decoupled (theory.md section 3).

    TRL counterpart: ``loss_type="nca_pair"`` coincides term for term for one pair
    (NCA, Chen et al. 2024, "Noise Contrastive Alignment", pairwise form).
    """
    check_negatives(negatives)
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        if negatives == "marginal":
            values, full_mask = with_positive(t_w, t_neg, neg_mask)
        else:
            values, full_mask = t_neg, neg_mask
        losses = F.softplus(-t_w) + masked_mean(F.softplus(values), full_mask)
        return losses, -losses

    return evaluate(body, chosen, rejected, mask)


def nwj(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    negatives: str = "marginal",
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """NWJ / f-divergence dual of KL: ``KL(P||Q) >= E_P[T] - E_Q[exp(T - 1)]``.

    ``loss = -T_w + mean_{Q} exp(T - 1)`` (Nguyen, Wainwright and Jordan 2010; the f-GAN KL form,
    Nowozin et al. 2016, table 2), ``mi_bound = -loss``. The optimum is ``T = 1 + log dP/dQ``.
    Unbounded above in ``T``: critics are clamped at ``NWJ_MAX_CRITIC`` inside the exponential to stay
    finite. No TRL counterpart.
    """
    check_negatives(negatives)
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        if negatives == "marginal":
            values, full_mask = with_positive(t_w, t_neg, neg_mask)
        else:
            values, full_mask = t_neg, neg_mask
        penalty = masked_mean(torch.exp(values.clamp(max=NWJ_MAX_CRITIC) - 1.0), full_mask)
        losses = -t_w + penalty
        return losses, -losses

    return evaluate(body, chosen, rejected, mask)


LOG4 = math.log(4.0)

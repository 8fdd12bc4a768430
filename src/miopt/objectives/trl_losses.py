"""TRL's remaining DPO loss types (TRL 1.16 ``DPOTrainer``), in the objectives' common signature.

Each function names its paper and equation and the TRL ``loss_type`` it reproduces; TRL's
``label_smoothing`` and ``discopop_tau`` are keyword options here. With K rejected responses per
prompt a pairwise loss is averaged over the real negatives (TRL has K = 1 only). ``mi_bound`` is the
DV estimate of the same critic values (``base.dv_bound``), as for the other baselines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from miopt.objectives.base import (
    ObjectiveOutput,
    as_listwise,
    critic_values,
    dv_bound,
    evaluate,
    evaluate_pairwise,
    masked_mean,
    pairwise_mean,
)

# exp() of more than this overflows float32; DiscoPOP's exponential term is clamped below it.
MAX_EXPONENT = 80.0


def exo_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """EXO, pairwise: ``KL(q || p)`` with ``q = softmax(T_w, T_l)`` and the target ``p = [1 - eps, eps]``,
    ``loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)``, ``q_w = sigmoid(T_w - T_l)``
    (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16).

    TRL counterpart ``loss_type="exo_pair"`` with ``label_smoothing=eps``: the same formula; TRL takes
    ``log(1 - eps)`` and ``log eps`` in float32 (relative differences ~1e-8), miopt in double.
    TRL's default ``label_smoothing=0`` gives ``log 0`` there; miopt requires ``0 < eps < 1``
    (default 1e-3, the value TRL's documentation recommends).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing of exo_pair must be in (0, 1), got {label_smoothing}")
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )
    log_keep, log_flip = math.log1p(-label_smoothing), math.log(label_smoothing)

    def loss_of_margin(margin: Tensor) -> Tensor:
        q_w, q_l = torch.sigmoid(margin), torch.sigmoid(-margin)
        return q_w * (F.logsigmoid(margin) - log_keep) + q_l * (F.logsigmoid(-margin) - log_flip)

    return evaluate_pairwise(loss_of_margin, chosen, rejected, mask)


def sppo_hard(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """SPPO with hard win probabilities: ``(h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2``,
    ``h = log pi/pi_ref = T/beta`` (Wu et al. 2024, "Self-Play Preference Optimization", eq. 4.7 with
    P = 1 for the winner and 0 for the loser). With K negatives the rejected term is their mean.

    TRL counterpart ``loss_type="sppo_hard"``: coincides exactly.
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )
    target = 0.5 / beta

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        losses = (t_w / beta - target) ** 2 + masked_mean((t_neg / beta + target) ** 2, neg_mask)
        return losses, dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


def apo_zero(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """APO-zero: ``(1 - sigmoid(T_w)) + sigmoid(T_l)``: raises the chosen likelihood and lowers the
    rejected one, each on its own (D'Oosterlinck et al. 2024, "Anchored Preference Optimization",
    eq. 7). With K negatives the rejected term is their mean.

    TRL counterpart ``loss_type="apo_zero"``: coincides exactly.
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        losses = torch.sigmoid(-t_w) + masked_mean(torch.sigmoid(t_neg), neg_mask)
        return losses, dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


def apo_down(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """APO-down: ``sigmoid(T_w) + (1 - sigmoid(T_w - T_l))``: lowers the chosen likelihood and the
    rejected one more (D'Oosterlinck et al. 2024, eq. 8). With K negatives the second term is
    averaged over them.

    TRL counterpart ``loss_type="apo_down"``: coincides exactly.
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        losses = torch.sigmoid(t_w) + pairwise_mean(lambda m: torch.sigmoid(-m), t_w, t_neg, neg_mask)
        return losses, dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


def discopop(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """DiscoPOP (log-ratio modulated loss): with ``m = T_w - T_l`` and ``s = sigmoid(m / tau)``,
    ``loss = -log sigmoid(m) (1 - s) + exp(-m) s`` (Chris Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", eq. 5; tau = 0.05 recommended).

    ``exp(-m) s`` is computed as ``exp(-m + log sigmoid(m / tau))`` (finite for any m when tau <= 1)
    with the exponent clamped at 80 for tau > 1. TRL counterpart ``loss_type="discopop"`` with
    ``discopop_tau=tau``: coincides exactly wherever TRL's value is finite.
    """
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be positive, got {discopop_tau}")
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    def loss_of_margin(margin: Tensor) -> Tensor:
        logistic = -F.logsigmoid(margin) * torch.sigmoid(-margin / discopop_tau)
        exponential = torch.exp((-margin + F.logsigmoid(margin / discopop_tau)).clamp(max=MAX_EXPONENT))
        return logistic + exponential

    return evaluate_pairwise(loss_of_margin, chosen, rejected, mask)


def sigmoid_norm(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """Length-normalised DPO: ``-log sigmoid(T_w / |y_w| - T_l / |y_l|)``, each critic divided by its
    response's token count (the DPO sigmoid loss on per-token log-ratios; the length-normalised DPO of
    Tulu 3, Lambert et al. 2024, section 5, which Meng et al. 2024 compare SimPO with).

    TRL counterpart ``loss_type="sigmoid_norm"``: coincides exactly (TRL divides by the
    completion-mask token counts, miopt by the response token counts: the same numbers).
    ``rewards/*`` stay the summed critics ``T``.
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )
    chosen_counts = chosen_lengths.to(chosen.dtype).clamp(min=1)
    rejected_counts, _ = as_listwise(rejected_lengths.to(rejected.dtype), mask)
    rejected_counts = rejected_counts.clamp(min=1)

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        # Clones: under inference_mode the counts are inference tensors, which autograd cannot save.
        margins = (t_w / chosen_counts.clone()).unsqueeze(-1) - t_neg / rejected_counts.clone()
        return masked_mean(-F.logsigmoid(margins), neg_mask), dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


def _sorted_pair_losses(first: Tensor, second: Tensor, mask: Tensor, loss_of_delta) -> Tensor:
    """AOT's coupling: sort ``first`` and ``second`` over the real pairs of the whole batch, apply
    ``loss_of_delta(sorted first - sorted second)`` rank by rank, give the loss of rank ``r`` to the
    pair holding rank ``r`` of ``first``, and average per prompt ``[B]``."""
    values_first, values_second = first[mask], second[mask]
    sorted_first, order = torch.sort(values_first)
    sorted_second, _ = torch.sort(values_second)
    rank_losses = loss_of_delta(sorted_first - sorted_second)
    pair_losses = torch.zeros_like(values_first).index_put((order,), rank_losses)
    per_slot = torch.zeros_like(first).masked_scatter(mask, pair_losses)
    return masked_mean(per_slot, mask)


def _logistic(beta: float, eps: float):
    def loss_of_delta(delta: Tensor) -> Tensor:
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps

    return loss_of_delta


def aot(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """AOT, paired: alignment via optimal transport. The policy margins ``log pi(y_w) - log pi(y_l)``
    and the reference margins are each sorted over the batch and compared rank by rank:
    ``loss_r = -(1 - eps) log sigmoid(beta d_r) - eps log sigmoid(-beta d_r)``,
    ``d_r = sort(policy margins)_r - sort(reference margins)_r`` (Melnyk et al. 2024, "Distributional
    Preference Alignment of LLMs via Optimal Transport", eq. 11, the logistic relaxation).

    Batch-coupled: a prompt's loss depends on the others in its batch (the rank-r loss is credited to
    the pair at rank r of the policy margins). With K negatives every (chosen, rejected_k) pair is one
    entry of the sort. TRL counterpart ``loss_type="aot"``: the same batch mean for K = 1.
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )
    ref_rejected, _ = as_listwise(ref_rejected_logps.to(rejected.dtype), mask)
    ref_margins = ref_chosen_logps.to(chosen.dtype).unsqueeze(-1) - ref_rejected

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        # Policy margin = (T_w - T_l) / beta + reference margin.
        policy_margins = (t_w.unsqueeze(-1) - t_neg) / beta + ref_margins
        losses = _sorted_pair_losses(policy_margins, ref_margins, neg_mask, _logistic(beta, label_smoothing))
        return losses, dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


def aot_unpaired(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """AOT, unpaired: the chosen log-ratios ``T_w / beta`` and the rejected log-ratios ``T_l / beta``
    are each sorted over the batch and compared rank by rank with the same logistic loss as
    :func:`aot` (Melnyk et al. 2024, eq. 10-11: first-order stochastic dominance of the chosen
    reward distribution over the rejected one).

    Batch-coupled like :func:`aot`; with K negatives the chosen log-ratio enters once per real pair.
    TRL counterpart ``loss_type="aot_unpaired"``: the same batch mean for K = 1.
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        chosen_ratios = (t_w / beta).unsqueeze(-1).expand_as(t_neg)
        losses = _sorted_pair_losses(chosen_ratios, t_neg / beta, neg_mask, _logistic(beta, label_smoothing))
        return losses, dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


aot.batch_coupled = True  # type: ignore[attr-defined]
aot_unpaired.batch_coupled = True  # type: ignore[attr-defined]

"""Baseline preference losses users expect, in the objectives' common signature.

With K rejected responses per prompt, each pairwise loss is averaged over the real
negatives. ``mi_bound`` reports the DV estimate of the same critic values (see
``base.dv_bound``) so it can be compared across objectives.
"""

from __future__ import annotations

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


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """IPO: ``((T_w - T_l) / beta - 1 / (2 beta))^2`` (Azar et al. 2023, "A General Theoretical
    Paradigm to Understand Learning from Human Preferences", eq. 17, ``tau = beta``).

    TRL counterpart ``loss_type="ipo"``: same formula on log-ratios, but TRL divides each side's
    log-ratio by its completion length first; miopt uses summed log-probs as the paper writes it.
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    return evaluate_pairwise(lambda margin: (margin / beta - 1.0 / (2.0 * beta)) ** 2, chosen, rejected, mask)


def hinge(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """SLiC hinge: ``max(0, 1 - (T_w - T_l))`` (Zhao et al. 2023, "SLiC-HF", eq. 1 with the
    reference-normalised margin, ``delta = 1 / beta`` in log-ratio units).

    TRL counterpart ``loss_type="hinge"``: coincides exactly (``relu(1 - beta * delta_logratio)``).
    """
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )

    return evaluate_pairwise(lambda margin: torch.relu(1.0 - margin), chosen, rejected, mask)


def robust(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """Robust DPO under label noise ``eps``:
    ``[-(1 - eps) log sigmoid(m) + eps log sigmoid(-m)] / (1 - 2 eps)``, ``m = T_w - T_l``
    (Chowdhury et al. 2024, "Provably Robust DPO", eq. 8). ``eps = 0`` is DPO.

    TRL counterpart ``loss_type="robust"`` with ``label_smoothing=eps``: coincides exactly.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected, mask = critic_values(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, rejected_mask
    )
    eps = label_smoothing

    def loss_of_margin(margin: Tensor) -> Tensor:
        return (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)

    return evaluate_pairwise(loss_of_margin, chosen, rejected, mask)


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    rejected_mask: Tensor | None = None,
) -> ObjectiveOutput:
    """SimPO, reference-free and length-normalised with a target margin ``gamma``:
    ``-log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)``
    (Meng et al. 2024, "SimPO", eq. 6). Rewards are ``beta * mean token log-prob``; the reference
    log-probs are ignored. Needs the response token counts (``chosen_lengths``, ``rejected_lengths``).

    TRL counterpart: ``CPOTrainer(loss_type="simpo")`` with ``simpo_gamma = gamma / beta``; DPOTrainer
    has none.
    """
    policy_rejected, mask = as_listwise(policy_rejected_logps, rejected_mask)
    rejected_counts, _ = as_listwise(rejected_lengths.to(policy_rejected.dtype), mask)
    chosen = beta * policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    rejected = beta * policy_rejected / rejected_counts.clamp(min=1)

    def body(r_w: Tensor, r_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        losses = pairwise_mean(lambda margin: -F.logsigmoid(margin - gamma), r_w, r_neg, neg_mask)
        return losses, dv_bound(r_w, r_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


class BCO:
    """BCO with a running reward offset: ``-log sigmoid(T_w - delta) - log sigmoid(-(T_l - delta))``,
    ``delta`` the running mean of all rewards seen so far (Jung et al. 2024, "Binary Classifier
    Optimization", eq. 8-9). With K negatives the rejected term is averaged over them.

    One instance per training run (``miopt.objectives.build("bco")`` makes a new one); the offset is
    updated after each call from the detached rewards and saved with ``state_dict()``.
    TRL counterpart ``loss_type="bco_pair"``: TRL 1.x dropped the offset (``delta = 0``), which
    is ``js`` with ``negatives="rejected"`` here; older TRL kept the running mean as miopt does.
    """

    def __init__(self) -> None:
        self.reward_sum = 0.0
        self.reward_count = 0

    @property
    def offset(self) -> float:
        return self.reward_sum / self.reward_count if self.reward_count else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"reward_sum": self.reward_sum, "reward_count": self.reward_count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.reward_sum = float(state["reward_sum"])
        self.reward_count = int(state["reward_count"])

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        *,
        beta: float = 0.1,
        rejected_mask: Tensor | None = None,
    ) -> ObjectiveOutput:
        chosen, rejected, mask = critic_values(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta,
            rejected_mask,
        )
        delta = self.offset

        def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
            losses = -F.logsigmoid(t_w - delta) + masked_mean(-F.logsigmoid(-(t_neg - delta)), neg_mask)
            return losses, dv_bound(t_w, t_neg, neg_mask)

        output = evaluate(body, chosen, rejected, mask)
        self.reward_sum += float(chosen.detach().sum() + rejected.detach()[mask].sum())
        self.reward_count += int(chosen.numel() + mask.sum())
        return output

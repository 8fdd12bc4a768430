"""KTO on unpaired data (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization"), in the objectives' common signature.

An unpaired batch is laid out like a paired one with one "rejected" slot per row: row ``i`` holds
the completion ``y_i`` of prompt ``x_i`` (the "chosen" slot, with its ``label``: desirable or not)
and a *mismatched* completion ``y'_i`` of another example for the same prompt ``x_i`` (the
"rejected" slot). The mismatched pairs estimate the reference point (eq. 6 of the paper):

    z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])

(TRL's KTOTrainer: the batch mean of the mismatched pairs' log-ratios, clamped at 0, no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from miopt.objectives.base import ObjectiveOutput, critic_values, evaluate


@dataclass
class KTOOutput(ObjectiveOutput):
    """KTO's result: ``chosen_rewards`` are the completions' critics ``T``, ``labels`` says which are
    desirable, ``kl`` is the reference point ``z0`` (in log-ratio units, as TRL logs ``kl``)."""

    labels: Tensor = field(default=None)  # type: ignore[assignment]
    kl: Tensor = field(default=None)  # type: ignore[assignment]

    def metrics(self) -> dict[str, Tensor]:
        """TRL's KTO names: ``rewards/chosen`` over desirable rows, ``rewards/rejected`` over undesirable
        rows (0 when a batch has none), ``kl``; ``rewards/accuracies`` = rows on their label's side of
        the reference point (``T > beta z0`` for desirable, ``<`` for undesirable)."""
        desirable = self.labels.to(self.chosen_rewards.dtype)
        undesirable = 1.0 - desirable
        rewards = self.chosen_rewards

        def side_mean(values: Tensor, weights: Tensor) -> Tensor:
            return (values * weights).sum() / weights.sum().clamp(min=1)

        above = (rewards > self.reference_point).to(rewards.dtype)
        correct = above * desirable + (1.0 - above) * undesirable
        chosen, rejected = side_mean(rewards, desirable), side_mean(rewards, undesirable)
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": correct.mean(),
            "kl": self.kl,
            "grad_weight/chosen": side_mean(self.chosen_grad_weight, desirable),
            "grad_weight/rejected": -side_mean(self.chosen_grad_weight, undesirable),
        }

    @property
    def reference_point(self) -> Tensor:
        return self.mi_bound  # beta * z0 per row (KTO has no MI bound; the slot carries the reference point)


def kto(
    policy_logps: Tensor,
    policy_mismatched_logps: Tensor,
    ref_logps: Tensor,
    ref_mismatched_logps: Tensor,
    *,
    beta: float = 0.1,
    labels: Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    rejected_mask: Tensor | None = None,
) -> KTOOutput:
    """KTO (Ethayarajh et al. 2024, eq. 7-8) with ``T = beta (log pi(y|x) - log pi_ref(y|x))``:

    desirable ``y``:   ``lambda_D (1 - sigmoid(T - beta z0))``
    undesirable ``y``: ``lambda_U (1 - sigmoid(beta z0 - T))``

    ``z0`` from the mismatched completions (module docstring), detached. ``labels`` ``[B]`` bool
    (True = desirable); the "rejected" slot ``[B]`` or ``[B, 1]`` holds the mismatched completions.
    TRL counterpart: ``KTOTrainer(loss_type="kto")`` with ``desirable_weight``/``undesirable_weight``:
    the same per-row losses; TRL averages over the batch after concatenating desirable rows first.
    """
    completion, mismatched, mask = critic_values(
        policy_logps, policy_mismatched_logps, ref_logps, ref_mismatched_logps, beta, rejected_mask
    )
    if mismatched.shape[1] != 1 or not bool(mask.all()):
        raise ValueError("kto takes one mismatched completion per row (the 'rejected' slot)")
    labels = labels.to(device=completion.device, dtype=torch.bool)
    if labels.shape != completion.shape:
        raise ValueError(f"labels must have shape {tuple(completion.shape)}, got {tuple(labels.shape)}")
    # z0 in log-ratio units: mean of the mismatched log-ratios, clamped at 0, no gradient.
    kl = (mismatched.detach()[:, 0] / beta).mean().clamp(min=0)
    shift = beta * kl
    weights = torch.where(
        labels,
        torch.tensor(desirable_weight, dtype=completion.dtype, device=completion.device),
        torch.tensor(undesirable_weight, dtype=completion.dtype, device=completion.device),
    )
    sign = torch.where(labels, -1.0, 1.0).to(completion.dtype)

    def body(t: Tensor, t_mismatched: Tensor, _: Tensor) -> tuple[Tensor, Tensor]:
        # 1 - sigmoid(T - shift) = sigmoid(-(T - shift)); 1 - sigmoid(shift - T) = sigmoid(T - shift).
        losses = weights * torch.sigmoid(sign * (t - shift))
        # The mismatched critics enter only through z0, which has no gradient (kept in the graph at 0).
        return losses + 0.0 * t_mismatched[:, 0], shift.expand_as(t)

    output = evaluate(body, completion, mismatched, mask)
    return KTOOutput(**vars(output), labels=labels, kl=kl)

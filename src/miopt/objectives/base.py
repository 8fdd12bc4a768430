"""Shared machinery of every objective: critic values, masking, the result type.

Notation (docs/theory.md section 1): the critic, or implicit reward, of a response is
``T(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`` with summed response log-probs.
Positives are chosen responses ``[B]``; negatives are rejected responses ``[B, K]`` with a
boolean mask ``[B, K]`` (True = a real negative) for prompts that have fewer than ``K``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

# A loss body maps (chosen rewards [B], rejected rewards [B, K], mask [B, K]) to
# (per-prompt losses [B], per-prompt bound estimate [B]).
LossBody = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

NEGATIVE_DISTRIBUTIONS = ("marginal", "rejected")


@dataclass
class ObjectiveOutput:
    """What an objective returns for a batch of B prompts.

    ``losses`` carries the autograd graph; everything else is detached diagnostics.
    ``chosen_grad_weight`` is ``-dL/dT_w`` (how hard the chosen reward is pushed up) and
    ``rejected_grad_weight`` is ``sum_k dL/dT_k`` (how hard the rejected rewards are pushed down).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    rejected_mask: Tensor
    mi_bound: Tensor
    chosen_grad_weight: Tensor
    rejected_grad_weight: Tensor
    # A combination's per-term losses ``[B]`` (detached, unweighted), logged as ``loss/<name>``.
    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def mean_rejected_rewards(self) -> Tensor:
        """Per-prompt mean reward over the real negatives, ``[B]``."""
        return masked_mean(self.rejected_rewards, self.rejected_mask)

    @property
    def margins(self) -> Tensor:
        return self.chosen_rewards - self.mean_rejected_rewards

    @property
    def accuracies(self) -> Tensor:
        """Per prompt, the fraction of real negatives whose reward is below the chosen reward."""
        beaten = (self.chosen_rewards.unsqueeze(-1) > self.rejected_rewards).to(self.chosen_rewards.dtype)
        return masked_mean(beaten, self.rejected_mask)

    def metrics(self) -> dict[str, Tensor]:
        """Batch means under the names TRL and its dashboards use."""
        return {
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.mean_rejected_rewards.mean(),
            "rewards/margins": self.margins.mean(),
            "rewards/accuracies": self.accuracies.mean(),
            "mi_bound": self.mi_bound.mean(),
            "grad_weight/chosen": self.chosen_grad_weight.mean(),
            "grad_weight/rejected": self.rejected_grad_weight.mean(),
            **{f"loss/{name}": losses.mean() for name, losses in self.terms.items()},
        }


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the last dimension counting only ``mask`` entries."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def as_listwise(rejected: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Bring rejected values to ``[B, K]`` and return them with a boolean mask.

    Masked entries are replaced by zeros so that whatever they held (padding, NaN) can
    reach neither the value nor the gradient of any loss.
    """
    if rejected.dim() == 1:
        rejected = rejected.unsqueeze(-1)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(-1)
    if rejected.dim() != 2:
        raise ValueError(f"rejected log-probs must have shape [B] or [B, K], got {tuple(rejected.shape)}")
    if mask is None:
        mask = torch.ones_like(rejected, dtype=torch.bool)
    mask = mask.to(device=rejected.device, dtype=torch.bool)
    if mask.shape != rejected.shape:
        raise ValueError(f"rejected_mask has shape {tuple(mask.shape)}, expected {tuple(rejected.shape)}")
    if not bool(mask.any(-1).all()):
        raise ValueError("every prompt needs at least one unmasked rejected response")
    return torch.where(mask, rejected, torch.zeros_like(rejected)), mask


def critic_values(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    rejected_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``T = beta * (log pi - log pi_ref)`` for chosen ``[B]`` and rejected ``[B, K]`` (theory.md, section 1)."""
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("this objective needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    policy_rejected, mask = as_listwise(policy_rejected_logps, rejected_mask)
    ref_rejected, _ = as_listwise(ref_rejected_logps.to(policy_rejected.dtype), mask)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps.to(policy_chosen_logps.dtype))
    rejected = beta * (policy_rejected - ref_rejected)
    return chosen, rejected, mask


def check_negatives(negatives: str) -> None:
    if negatives not in NEGATIVE_DISTRIBUTIONS:
        raise ValueError(f"negatives must be one of {NEGATIVE_DISTRIBUTIONS}, got {negatives!r}")


def with_positive(chosen: Tensor, rejected: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The marginal negative set ``{y_w, y_1..y_K}`` of theory.md section 2: ``[B, K+1]`` and its mask."""
    values = torch.cat([chosen.unsqueeze(-1), rejected], dim=-1)
    full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=-1)
    return values, full_mask


def masked_logmeanexp(values: Tensor, mask: Tensor) -> Tensor:
    """``log mean exp`` over the last dimension, counting only ``mask`` entries."""
    filled = values.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(filled, dim=-1) - torch.log(mask.sum(-1).to(values.dtype))


def pairwise_mean(
    loss_of_margin: Callable[[Tensor], Tensor], chosen: Tensor, rejected: Tensor, mask: Tensor
) -> Tensor:
    """Listwise extension of a pairwise loss: mean of ``loss(T_w - T_k)`` over real negatives."""
    return masked_mean(loss_of_margin(chosen.unsqueeze(-1) - rejected), mask)


def dv_bound(chosen: Tensor, rejected: Tensor, mask: Tensor) -> Tensor:
    """DV estimate with marginal negatives, ``T_w - log mean_{w,1..K} exp T`` (theory.md section 2).

    Reported as ``mi_bound`` by objectives that are not themselves MI estimators, so the column
    means the same thing across them.
    """
    values, full_mask = with_positive(chosen, rejected, mask)
    # Relative to T_w first, so that large critics do not cancel (see estimators.dv).
    return (-masked_logmeanexp(values - chosen.unsqueeze(-1), full_mask)).detach()


def evaluate(body: LossBody, chosen: Tensor, rejected: Tensor, mask: Tensor) -> ObjectiveOutput:
    """Run a loss body and collect the diagnostics every objective reports.

    The gradient weights are the body's own derivatives with respect to the rewards, taken by
    autograd on detached copies, so they are exact for every objective without a hand-written
    formula per objective (theory.md section 4 gives them for DV and JS; tests compare).
    """
    losses, bound = body(chosen, rejected, mask)
    # Also under no_grad / inference_mode (evaluation loops): inference tensors cannot enter an
    # autograd graph, so the leaves (and the mask the body saves for backward) are normal clones.
    with torch.inference_mode(False), torch.enable_grad():
        chosen_leaf = chosen.detach().clone().requires_grad_(True)
        rejected_leaf = rejected.detach().clone().requires_grad_(True)
        leaf_losses, _ = body(chosen_leaf, rejected_leaf, mask.clone())
        d_chosen, d_rejected = torch.autograd.grad(leaf_losses.sum(), (chosen_leaf, rejected_leaf))
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=chosen.detach(),
        rejected_rewards=rejected.detach(),
        rejected_mask=mask,
        mi_bound=bound.detach(),
        chosen_grad_weight=-d_chosen,
        rejected_grad_weight=(d_rejected * mask).sum(-1),
    )


def evaluate_pairwise(
    loss_of_margin: Callable[[Tensor], Tensor], chosen: Tensor, rejected: Tensor, mask: Tensor
) -> ObjectiveOutput:
    """:func:`evaluate` for a pairwise loss of the margin ``T_w - T_k`` (mean over the real negatives),
    reporting the DV bound as ``mi_bound``."""

    def body(t_w: Tensor, t_neg: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        return pairwise_mean(loss_of_margin, t_w, t_neg, neg_mask), dv_bound(t_w, t_neg, neg_mask)

    return evaluate(body, chosen, rejected, mask)


LOG2 = math.log(2.0)

"""The Bradley-Terry loss of reward-model training: pure tensor maths, no models, no I/O.

A reward model ``r(x, y)`` gives one scalar per response. Under the Bradley-Terry model
(Bradley & Terry 1952) the chosen response ``y_w`` is preferred to ``y_l`` with probability
``sigmoid(r(x, y_w) - r(x, y_l))``; the loss is its negative log-likelihood
``-log sigmoid(r_w - r_l)`` (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", eq. 1). With ``K`` rejected responses per prompt each forms one
comparison with the chosen response and a prompt's loss is the mean over its real comparisons
(InstructGPT's ``1 / C(K, 2)`` normalisation, restricted to the pairs that involve the chosen one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass
class BradleyTerryOutput:
    """Per-prompt losses ``[B]`` (with the autograd graph) and detached diagnostics."""

    losses: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    rejected_mask: Tensor

    def _masked_mean(self, values: Tensor) -> Tensor:
        mask = self.rejected_mask.to(values.dtype)
        return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)

    @property
    def accuracies(self) -> Tensor:
        """Per prompt, the fraction of its rejected responses scored below the chosen one."""
        beaten = (self.chosen_scores.unsqueeze(-1) > self.rejected_scores).to(self.chosen_scores.dtype)
        return self._masked_mean(beaten)

    def metrics(self) -> dict[str, Tensor]:
        """Batch means under TRL's names (``rewards/*`` are the reward model's scores here)."""
        chosen = self.chosen_scores.detach()
        rejected = self._masked_mean(self.rejected_scores.detach())
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": self.accuracies.detach().mean(),
        }


def bradley_terry(
    chosen_scores: Tensor, rejected_scores: Tensor, rejected_mask: Tensor
) -> BradleyTerryOutput:
    """``-log sigmoid(r_w - r_k)`` averaged over each prompt's real rejected responses.

    ``chosen_scores`` ``[B]``, ``rejected_scores`` ``[B, K]``, ``rejected_mask`` ``[B, K]`` (True =
    a real rejected response). ``-log sigmoid(z)`` is computed as ``softplus(-z)`` (stable for any z).
    """
    if rejected_scores.shape != rejected_mask.shape or rejected_scores.shape[:1] != chosen_scores.shape:
        raise ValueError(
            f"shapes: chosen {tuple(chosen_scores.shape)}, rejected {tuple(rejected_scores.shape)}, "
            f"mask {tuple(rejected_mask.shape)}"
        )
    margins = chosen_scores.unsqueeze(-1) - rejected_scores
    per_pair = F.softplus(-margins)
    mask = rejected_mask.to(per_pair.dtype)
    losses = (per_pair * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    return BradleyTerryOutput(losses, chosen_scores.detach(), rejected_scores.detach(), rejected_mask)


def pair_accuracy(chosen_scores: Tensor, rejected_scores: Tensor, rejected_mask: Tensor) -> Tensor:
    """The fraction of all real (chosen, rejected) comparisons the scores order correctly (pooled)."""
    beaten = (chosen_scores.unsqueeze(-1) > rejected_scores) & rejected_mask
    return beaten.sum() / rejected_mask.sum().clamp_min(1)


__all__ = ["BradleyTerryOutput", "bradley_terry", "pair_accuracy"]

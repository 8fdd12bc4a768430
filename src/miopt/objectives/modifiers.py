"""TRL's DPO modifiers, applied around any objective that declares them (registry entries):

* ``f_divergence_type``: the log-ratio ``h = log pi/pi_ref`` is replaced by ``f'(pi/pi_ref)`` before
  the loss (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
  Diverse Divergence Constraints", table 1): ``reverse_kl`` ``h``; ``forward_kl`` ``1 - exp(-h)``;
  ``js_divergence`` ``log 2 + log sigmoid(h)``; ``alpha_divergence`` ``(exp((a - 1) h) - 1)/(a - 1)``.
  Realised by handing the objective ``f'`` as the policy "log-prob" and zero as the reference, so
  ``T = beta f'(pi/pi_ref)``: ``rewards/*`` then report these transformed critics.
* ``use_weighting`` (WPO, Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
  Optimization", eq. 2): each pair's loss times ``w(y_w) w(y_l)``, ``w(y) = exp(mean_t [log pi(y_t) -
  log sum_v pi(v)^2])``, detached. It needs, per response, the mean over its tokens of
  ``log pi(y_t) - log sum_v pi(v)^2`` (``chosen_wpo_logps``, ``rejected_wpo_logps``;
  :func:`wpo_token_terms`), which ``miopt train`` takes from the log-prob head's same pass
  (:mod:`miopt.logprobs.weighted_pairs`).
* ``ld_alpha`` (LD-DPO, Liu et al. 2024, "Length Desensitization in Directed Preference
  Optimization"): summed log-probs replaced by ``shared + alpha * tail``, the tokens up to the shorter
  response's length counted fully and the rest weighted by ``alpha`` (:func:`ld_logps`), for the
  policy and the reference alike. ``miopt train`` applies it in the step function
  (:mod:`miopt.logprobs.length_desensitised`); the reference cache keeps each response's tail sum for it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from miopt.objectives.base import ObjectiveOutput, as_listwise, masked_mean
from miopt.objectives.objective import LossFunction

# The batch inputs a WPO-weighted loss reads (:func:`with_wpo_weighting`).
WPO_INPUTS = frozenset({"chosen_wpo_logps", "rejected_wpo_logps"})

MAX_EXPONENT = 80.0  # exp() beyond this overflows float32: the f-divergence exponents are clamped


def f_divergence_score(log_ratio: Tensor, f_divergence_type: str, alpha: float = 0.5) -> Tensor:
    """``f'(pi/pi_ref)`` as a function of the log-ratio ``h`` (module docstring; TRL's scores)."""
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return -torch.expm1((-log_ratio).clamp(max=MAX_EXPONENT))
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is reverse KL
            return log_ratio
        return torch.expm1(((alpha - 1.0) * log_ratio).clamp(max=MAX_EXPONENT)) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


def with_f_divergence(objective: LossFunction, f_divergence_type: str, alpha: float = 0.5) -> LossFunction:
    """``objective`` on ``T = beta f'(pi/pi_ref)`` instead of ``T = beta log(pi/pi_ref)``."""
    if f_divergence_type == "reverse_kl":
        return objective

    def wrapped(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, rejected_mask=None, **kwargs):
        if ref_chosen is None or ref_rejected is None:
            raise ValueError("f_divergence_type needs reference log-probs")
        # Masked slots are zeroed first, so whatever they hold never reaches exp() or a gradient.
        rejected, mask = as_listwise(policy_rejected, rejected_mask)
        ref_rejected, _ = as_listwise(ref_rejected.to(rejected.dtype), mask)
        chosen_score = f_divergence_score(
            policy_chosen - ref_chosen.to(policy_chosen.dtype), f_divergence_type, alpha
        )
        rejected_score = f_divergence_score(rejected - ref_rejected, f_divergence_type, alpha)
        return objective(
            chosen_score,
            rejected_score,
            torch.zeros_like(chosen_score),
            torch.zeros_like(rejected_score),
            rejected_mask=mask,
            **kwargs,
        )

    return wrapped


def wpo_token_terms(token_logps: Tensor, log_sum_sq_probs: Tensor, token_mask: Tensor) -> Tensor:
    """Per response, ``mean_t [log pi(y_t) - log sum_v pi(v)^2]`` over its tokens (WPO eq. 2's exponent,
    the "aligned" form TRL uses). Inputs ``[N, L]``; returns ``[N]``."""
    mask = token_mask.to(token_logps.dtype)
    return ((token_logps - log_sum_sq_probs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def with_wpo_weighting(objective: LossFunction) -> LossFunction:
    """``objective`` with each prompt's loss times ``w(y_w) * mean_k w(y_k)`` (detached; exact WPO for
    K = 1). Needs the batch inputs ``chosen_wpo_logps`` ``[B]`` and ``rejected_wpo_logps`` ``[B]`` or
    ``[B, K]`` (:func:`wpo_token_terms`)."""

    def wrapped(*args, chosen_wpo_logps: Tensor, rejected_wpo_logps: Tensor, rejected_mask=None, **kwargs):
        output: ObjectiveOutput = objective(*args, rejected_mask=rejected_mask, **kwargs)
        rejected_terms, mask = as_listwise(rejected_wpo_logps, output.rejected_mask)
        weights = torch.exp(chosen_wpo_logps.detach()) * masked_mean(torch.exp(rejected_terms.detach()), mask)
        output.losses = output.losses * weights.to(output.losses.dtype)
        output.chosen_grad_weight = output.chosen_grad_weight * weights
        output.rejected_grad_weight = output.rejected_grad_weight * weights
        return output

    return wrapped


def ld_tail_logps(token_logps: Tensor, token_mask: Tensor, shared_lengths: Tensor) -> Tensor:
    """Per response, the summed log-prob of its tokens after the first ``n = shared_lengths`` (LD-DPO's
    tail). ``token_logps`` and ``token_mask`` ``[N, L]`` (mask: response tokens, in order); returns
    ``[N]``."""
    mask = token_mask.to(token_logps.dtype)
    position = torch.cumsum(mask, dim=-1)  # 1-based index of each response token
    tail = mask * (position > shared_lengths.unsqueeze(-1)).to(mask.dtype)
    return (token_logps * tail).sum(-1)


def ld_combine(summed_logps: Tensor, tail_logps: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's log-prob from the full sum and the tail sum: ``shared + alpha * tail = summed - (1 -
    alpha) * tail`` (Liu et al. 2024, LD-DPO)."""
    return summed_logps - (1.0 - ld_alpha) * tail_logps


def ld_logps(token_logps: Tensor, token_mask: Tensor, shared_lengths: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's desensitised log-prob of each response: ``sum of its first n tokens + alpha * the rest``,
    ``n = shared_lengths`` (the shorter response's token count in its pair). ``token_logps`` and
    ``token_mask`` ``[N, L]`` (mask: response tokens, in order); returns ``[N]``."""
    summed = (token_logps * token_mask.to(token_logps.dtype)).sum(-1)
    return ld_combine(summed, ld_tail_logps(token_logps, token_mask, shared_lengths), ld_alpha)

"""WPO's per-response inputs in the training step (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted
Preference Optimization", eq. 2-3; TRL's ``use_weighting``).

The log-prob head returns each response token's ``log sum_v pi(v)^2`` from the same pass
(:func:`miopt.logprobs.forward.sequence_logps` with ``with_log_sum_sq``); here they become the per-response
means :func:`miopt.objectives.wpo_token_terms` that :func:`miopt.objectives.with_wpo_weighting` turns
into each pair's weight.
"""

from __future__ import annotations

from torch import Tensor

from miopt.logprobs.forward import SequenceLogps
from miopt.objectives import wpo_token_terms


def wpo_inputs(result: SequenceLogps, batch) -> dict[str, Tensor]:
    """``chosen_wpo_logps`` ``[B]`` and ``rejected_wpo_logps`` ``[B, K]``: the keywords the weighted
    objective takes."""
    if result.log_sum_sq is None:
        raise ValueError("WPO weights need sequence_logps(..., with_log_sum_sq=True)")
    terms = wpo_token_terms(result.per_token.detach(), result.log_sum_sq, result.token_mask)
    chosen, rejected = batch.split_rows(terms)
    return {"chosen_wpo_logps": chosen, "rejected_wpo_logps": rejected}

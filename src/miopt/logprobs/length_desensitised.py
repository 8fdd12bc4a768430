"""LD-DPO's length-desensitised log-probs in the training step (Liu et al. 2024, "Length Desensitization
in Directed Preference Optimization"; TRL's ``ld_alpha``).

Each response's log-prob becomes ``shared + alpha * tail``: its first ``n`` tokens count fully and the
rest are weighted by ``alpha``, ``n`` the shorter length of the pair (:func:`miopt.objectives.ld_logps`).
With K rejected responses, rejected ``k`` shares ``min(|y_w|, |y_k|)`` tokens and the chosen response
``min(|y_w|, min_k |y_k|)`` (TRL's rule for K = 1). ``n`` depends on the data alone, so the reference
cache stores each response's tail sum beside its full sum (:mod:`miopt.logprobs.reference`) and the same
:func:`miopt.objectives.ld_combine` turns either into LD-DPO's log-prob.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miopt.logprobs.forward import DEFAULT_CHUNK_TOKENS, PairLogps, SequenceLogps, as_pairs, sequence_logps
from miopt.objectives import ld_combine, ld_tail_logps


def shared_lengths(result: SequenceLogps, batch) -> Tensor:
    """``[N]``: the tokens of each row that count fully (the shorter response's length in its pair)."""
    chosen_lengths, rejected_lengths = batch.split_rows(result.token_counts)
    big = torch.iinfo(rejected_lengths.dtype).max
    shortest_rejected = rejected_lengths.masked_fill(~batch.rejected_mask, big).min(-1).values
    chosen_shared = torch.minimum(chosen_lengths, shortest_rejected)
    index = batch.rejected_index  # the (prompt, k) slot of each rejected row, in row order
    rejected_shared = torch.minimum(rejected_lengths, chosen_lengths.unsqueeze(-1))[index[:, 0], index[:, 1]]
    return torch.cat([chosen_shared, rejected_shared])


def tail_logps(result: SequenceLogps, batch) -> Tensor:
    """``[N]``: each row's summed log-prob beyond its shared length."""
    return ld_tail_logps(result.per_token, result.token_mask, shared_lengths(result, batch))


def ld_as_pairs(result: SequenceLogps, batch, ld_alpha: float) -> PairLogps:
    """:func:`miopt.logprobs.forward.as_pairs` of LD-DPO's log-probs instead of the summed ones."""
    return as_pairs(result, batch, ld_combine(result.summed, tail_logps(result, batch), ld_alpha))


def ld_pair_logps(model, batch, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ld_alpha: float) -> PairLogps:
    """:func:`miopt.logprobs.forward.pair_logps` with each summed log-prob replaced by LD-DPO's."""
    return ld_as_pairs(sequence_logps(model, batch, chunk_tokens=chunk_tokens), batch, ld_alpha)

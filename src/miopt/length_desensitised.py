"""LD-DPO's length-desensitised log-probs in the training step (Liu et al. 2024, "Length Desensitization
in Directed Preference Optimization"; TRL's ``ld_alpha``).

Each response's log-prob becomes ``shared + alpha * tail``: its first ``n`` tokens count fully and the
rest are weighted by ``alpha``, ``n`` the shorter length of the pair (:func:`miopt.objectives.ld_logps`).
With K rejected responses, rejected ``k`` shares ``min(|y_w|, |y_k|)`` tokens and the chosen response
``min(|y_w|, min_k |y_k|)`` (TRL's rule for K = 1). The reference needs the same per-token split, so
``miopt train`` requires ``--reference on-the-fly`` with ``ld_alpha``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miopt.logprobs import DEFAULT_CHUNK_TOKENS, PairLogps, sequence_logps
from miopt.objectives import ld_logps
from miopt.packing import PackedBatch


def response_token_mask(batch, shape: tuple[int, int]) -> Tensor:
    """``[N, L]``: True where ``sequence_logps(...).per_token`` holds a response token's log-prob."""
    if isinstance(batch, PackedBatch):
        mask = torch.zeros(shape, dtype=torch.bool, device=batch.token_rows.device)
        mask[batch.token_rows, batch.token_cols] = True
        return mask
    mask = batch.response_mask.clone()
    mask[:, 0] = False  # the first position is never predicted
    return mask


def ld_pair_logps(model, batch, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ld_alpha: float) -> PairLogps:
    """:func:`miopt.logprobs.pair_logps` with each summed log-prob replaced by LD-DPO's."""
    result = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
    chosen_lengths, rejected_lengths = batch.split_rows(result.token_counts)
    mask = batch.rejected_mask
    big = torch.iinfo(rejected_lengths.dtype).max
    shortest_rejected = rejected_lengths.masked_fill(~mask, big).min(-1).values
    chosen_shared = torch.minimum(chosen_lengths, shortest_rejected)
    index = batch.rejected_index  # the (prompt, k) slot of each rejected row, in row order
    rejected_shared = torch.minimum(rejected_lengths, chosen_lengths.unsqueeze(-1))[index[:, 0], index[:, 1]]
    shared = torch.cat([chosen_shared, rejected_shared])
    token_mask = response_token_mask(batch, tuple(result.per_token.shape))
    summed = ld_logps(result.per_token, token_mask, shared, ld_alpha)
    chosen, rejected = batch.split_rows(summed)
    return PairLogps(chosen, rejected, mask, chosen_lengths, rejected_lengths)

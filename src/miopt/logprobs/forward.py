"""Response log-probabilities from one forward pass over a concatenated batch.

``log pi(y|x) = sum_t log softmax(W h_{t-1})[y_t]`` over response tokens (theory.md section 1).
The full-vocabulary float32 log-softmax is never materialised for the whole batch: only the
hidden states of response positions are projected, a chunk of rows at a time, and each chunk
is recomputed in the backward pass instead of keeping its logits (a fused autograd function for
a plain linear head, activation checkpointing otherwise). On request the same pass also yields each
position's ``log sum_v pi(v)^2`` (WPO's weights, :mod:`miopt.logprobs.weighted_pairs`), without a gradient.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from miopt.data.packed import PackedBatch
from miopt.data.tokenize import SequenceBatch, round_up
from miopt.logprobs.packing import model_inputs
from miopt.model.attention import ATTENTION_NAME, block_attention, check_blocks_used
from miopt.model.modeling import (
    SHAPE_MULTIPLE,
    attention_implementation,
    base_model,
    rounds_shapes,
    unwrap,
    uses_plain_head,
)

DEFAULT_CHUNK_TOKENS = 1024


@dataclass
class SequenceLogps:
    """``summed`` ``[N]`` and ``token_counts`` ``[N]`` per row; ``per_token`` ``[N, L]`` with the
    log-prob of token ``t`` at column ``t`` (zero outside the response) and ``token_mask`` ``[N, L]``
    True at those columns; ``log_sum_sq`` ``[N, L]`` (same columns, no gradient) when requested."""

    summed: Tensor
    token_counts: Tensor
    per_token: Tensor
    token_mask: Tensor
    log_sum_sq: Tensor | None = None


def log_sum_sq_probs(logits: Tensor, lse: Tensor) -> Tensor:
    """``log sum_v softmax(logits)_v^2`` over the last dimension (the normaliser of WPO's weights, Zhou
    et al. 2024, eq. 3), given ``lse = logsumexp(logits)``: one exp over the logits, squared in place.
    Without gradient: WPO's weights are constants."""
    with torch.no_grad():
        return (logits - lse.unsqueeze(-1)).exp_().square_().sum(-1).log_()


def _token_logps(
    hidden: Tensor, targets: Tensor, head: torch.nn.Module, with_log_sum_sq: bool = False
) -> tuple[Tensor, Tensor | None]:
    return _gather_logps(head(hidden), targets, with_log_sum_sq)


def response_hidden_states(model, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states that predict response tokens ``[M, H]``, the targets ``[M]``, and ``(row, col)``.

    The forward goes through ``model`` itself (so distributed wrappers and autocast apply) with
    ``logits_to_keep=1``: the head runs on one position only, and the final (normed) hidden
    state comes back in ``hidden_states[-1]``.
    """
    outputs = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = outputs.hidden_states[-1]
    positions = batch.response_mask[:, 1:].nonzero()  # predicting token col+1 from hidden at col
    rows, cols = positions[:, 0], positions[:, 1]
    return hidden[rows, cols], batch.input_ids[rows, cols + 1], positions


def sequence_logps(
    model, batch, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, with_log_sum_sq: bool = False
) -> SequenceLogps:
    """Summed and per-token response log-probs of every row of ``batch`` (and, with
    ``with_log_sum_sq``, each response token's ``log sum_v pi(v)^2``).

    ``chunk_tokens <= 0`` takes the plain path: the model's own full logits and log-softmax
    (for models whose head is not a plain projection; also the reference the tests compare to).
    """
    if isinstance(batch, PackedBatch):
        return packed_sequence_logps(model, batch, chunk_tokens=chunk_tokens, with_log_sum_sq=with_log_sum_sq)
    num_rows, length = batch.input_ids.shape
    if chunk_tokens <= 0 or not uses_plain_head(model):
        return full_sequence_logps(model, batch, with_log_sum_sq=with_log_sum_sq)
    hidden, targets, positions = response_hidden_states(model, batch)
    head = unwrap(model).get_output_embeddings()
    token_logps, log_sum_sq = chunked_token_stats(hidden, targets, head, chunk_tokens, with_log_sum_sq)
    return _assemble(token_logps, positions, num_rows, length, log_sum_sq)


class _LinearTokenLogps(torch.autograd.Function):
    """``log softmax(hidden @ W^T + b)[targets]`` for one chunk, keeping only ``hidden`` and the
    log-sum-exp for the backward pass: the logits are recomputed there once and turned in place into
    ``d logits = g * (onehot(target) - softmax)``. Against checkpointing the generic path this saves
    the recomputed forward's log-sum-exp passes over ``[chunk, vocab]`` and their temporaries.
    ``compute_dtype``: the matmul dtype (autocast's, or the weights'); the softmax is in float32.
    Second output: :func:`log_sum_sq_probs` of each row when ``with_log_sum_sq`` (else empty), no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, with_log_sum_sq):
        logits = torch.nn.functional.linear(
            hidden.to(compute_dtype),
            weight.to(compute_dtype),
            None if bias is None else bias.to(compute_dtype),
        ).float()
        lse = torch.logsumexp(logits, dim=-1)
        out = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        log_sum_sq = log_sum_sq_probs(logits, lse) if with_log_sum_sq else lse.new_empty(0)
        ctx.mark_non_differentiable(log_sum_sq)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.compute_dtype = compute_dtype
        return out, log_sum_sq

    @staticmethod
    def backward(ctx, grad, _log_sum_sq_grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = ctx.compute_dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        logits = torch.nn.functional.linear(h, w, None if bias is None else bias.to(dtype)).float()
        dlogits = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
        dlogits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))
        dlogits = dlogits.to(dtype)
        dhidden = (dlogits @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        dweight = (dlogits.t() @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = dlogits.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dhidden, dweight, dbias, None, None, None


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def chunked_token_logps(hidden: Tensor, targets: Tensor, head: torch.nn.Module, chunk_tokens: int) -> Tensor:
    """``log softmax(head(hidden))[targets]`` in float32, ``chunk_tokens`` rows at a time, each chunk's
    logits recomputed in the backward pass instead of kept (a fused function for a plain ``nn.Linear``
    head; activation checkpointing of the head's own forward for anything else)."""
    return chunked_token_stats(hidden, targets, head, chunk_tokens)[0]


def chunked_token_stats(
    hidden: Tensor, targets: Tensor, head: torch.nn.Module, chunk_tokens: int, with_log_sum_sq: bool = False
) -> tuple[Tensor, Tensor | None]:
    """:func:`chunked_token_logps`, plus each row's :func:`log_sum_sq_probs` (detached) from the same
    logits when ``with_log_sum_sq`` (else None)."""
    fused = type(head) is torch.nn.Linear and type(head.weight) in (Tensor, torch.nn.Parameter)
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    dtype = _compute_dtype(hidden, head.weight) if fused else None
    multiple = SHAPE_MULTIPLE if rounds_shapes(hidden.device, hidden.dtype) else 1
    pieces, sums = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk_hidden, chunk_targets = (
            hidden[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
        )
        rows = chunk_hidden.shape[0]
        padding = round_up(rows, multiple) - rows
        if padding:  # zero rows whose log-probs are dropped (and so get no gradient)
            chunk_hidden = F.pad(chunk_hidden, (0, 0, 0, padding))
            chunk_targets = F.pad(chunk_targets, (0, padding))
        if fused:
            piece, log_sum_sq = _LinearTokenLogps.apply(
                chunk_hidden, head.weight, head.bias, chunk_targets, dtype, with_log_sum_sq
            )
        elif grad:
            piece, log_sum_sq = checkpoint(
                _token_logps, chunk_hidden, chunk_targets, head, with_log_sum_sq, use_reentrant=False
            )
        else:
            piece, log_sum_sq = _token_logps(chunk_hidden, chunk_targets, head, with_log_sum_sq)
        pieces.append(piece[:rows])
        sums.append(log_sum_sq[:rows] if with_log_sum_sq else None)
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_log_sum_sq else None)
    return torch.cat(pieces), (torch.cat(sums) if with_log_sum_sq else None)


def packed_sequence_logps(
    model, batch, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, with_log_sum_sq: bool = False
) -> SequenceLogps:
    """:func:`sequence_logps` of a :class:`miopt.data.packed.PackedBatch` (prefix-tree or packed layout).

    One forward over the packed rows (position ids, and the 4D mask of the prefix-tree layout); each
    scored token's log-prob is computed once and summed into every sequence that contains it.
    """
    inputs = model_inputs(model, batch)
    with _attention_for(model, batch):
        if chunk_tokens > 0 and uses_plain_head(model):
            outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
            check_blocks_used(batch.attention_blocks)
            hidden = outputs.hidden_states[-1]
            hidden = hidden.reshape(-1, hidden.shape[-1])[batch.predict_index]
            head = unwrap(model).get_output_embeddings()
            token_logps, log_sum_sq = chunked_token_stats(
                hidden, batch.targets, head, chunk_tokens, with_log_sum_sq
            )
        else:
            logits = model(**inputs).logits
            check_blocks_used(batch.attention_blocks)
            logits = logits.reshape(-1, logits.shape[-1])[batch.predict_index]
            token_logps, log_sum_sq = _gather_logps(logits, batch.targets, with_log_sum_sq)
    shape = (batch.num_sequences, batch.sequence_length)
    rows, cols = batch.token_rows, batch.token_cols
    per_sequence = token_logps[batch.token_node]
    summed = per_sequence.new_zeros(batch.num_sequences).index_add(0, rows, per_sequence)
    per_token = per_sequence.new_zeros(shape).index_put((rows, cols), per_sequence)
    token_mask = torch.zeros(shape, dtype=torch.bool, device=rows.device).index_put_(
        (rows, cols), torch.tensor(True, device=rows.device)
    )
    if log_sum_sq is not None:
        log_sum_sq = log_sum_sq.new_zeros(shape).index_put((rows, cols), log_sum_sq[batch.token_node])
    return SequenceLogps(summed, batch.token_counts, per_token, token_mask, log_sum_sq)


def _gather_logps(logits: Tensor, targets: Tensor, with_log_sum_sq: bool) -> tuple[Tensor, Tensor | None]:
    """Float32 ``log softmax(logits)[targets]`` (and :func:`log_sum_sq_probs`) of full logits ``[..., V]``."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return token_logps, (log_sum_sq_probs(logits, lse) if with_log_sum_sq else None)


def _attention_for(model, batch: PackedBatch):
    """The block attention around a forward of a one-row batch (a no-op where the caller has switched
    the model for its whole job, as training does). A model that reruns its forward in the backward
    pass (gradient checkpointing) must be switched for the whole step, not just the forward."""
    if batch.attention_blocks is None:
        return nullcontext()
    inner = base_model(model)
    checkpointing = (
        "is_activation_checkpointing"
        if hasattr(type(inner), "is_activation_checkpointing")
        else ("is_gradient_checkpointing")
    )
    if (
        getattr(inner, checkpointing, False)
        and torch.is_grad_enabled()
        and attention_implementation(inner) != ATTENTION_NAME
    ):
        raise RuntimeError(
            "gradient checkpointing reruns the forward in the backward pass: run forward and backward "
            "inside miopt.model.attention.block_attention(model)"
        )
    return block_attention(model)


def full_sequence_logps(model, batch: SequenceBatch, *, with_log_sum_sq: bool = False) -> SequenceLogps:
    """The naive path: the model's full logits, then a float32 log-softmax at the response positions."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    positions = batch.response_mask[:, 1:].nonzero()
    rows, cols = positions[:, 0], positions[:, 1]
    token_logps, log_sum_sq = _gather_logps(
        logits[rows, cols], batch.input_ids[rows, cols + 1], with_log_sum_sq
    )
    return _assemble(token_logps, positions, *batch.input_ids.shape, log_sum_sq)


def _assemble(
    token_logps: Tensor, positions: Tensor, num_rows: int, length: int, log_sum_sq: Tensor | None = None
) -> SequenceLogps:
    rows, cols = positions[:, 0], positions[:, 1] + 1
    summed = token_logps.new_zeros(num_rows).index_add(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=num_rows)
    per_token = token_logps.new_zeros(num_rows, length).index_put((rows, cols), token_logps)
    token_mask = torch.zeros(num_rows, length, dtype=torch.bool, device=rows.device)
    token_mask[rows, cols] = True
    if log_sum_sq is not None:
        log_sum_sq = log_sum_sq.new_zeros(num_rows, length).index_put((rows, cols), log_sum_sq)
    return SequenceLogps(summed, counts, per_token, token_mask, log_sum_sq)


@dataclass
class PairLogps:
    """Log-probs arranged per prompt: chosen ``[B]``, rejected ``[B, K]`` with ``rejected_mask``."""

    chosen: Tensor
    rejected: Tensor
    rejected_mask: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor


def pair_logps(model, batch, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> PairLogps:
    """One forward pass over chosen and rejected rows (a padded :class:`SequenceBatch` or a
    :class:`miopt.data.packed.PackedBatch`), split back into ``[B]`` and ``[B, K]``."""
    return as_pairs(sequence_logps(model, batch, chunk_tokens=chunk_tokens), batch)


def as_pairs(result: SequenceLogps, batch, summed: Tensor | None = None) -> PairLogps:
    """``result``'s rows (or ``summed``, another per-row log-prob ``[N]``) as chosen and rejected."""
    chosen, rejected = batch.split_rows(result.summed if summed is None else summed)
    chosen_lengths, rejected_lengths = batch.split_rows(result.token_counts)
    return PairLogps(chosen, rejected, batch.rejected_mask, chosen_lengths, rejected_lengths)

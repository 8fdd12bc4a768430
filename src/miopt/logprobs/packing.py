"""Batch layouts for a model: which padding-free layout its attention can take, and its forward inputs.

The layouts themselves (prefix trees, packed sequences, their masks and gather indices) are built in
:mod:`miopt.data.packed`; the attention that runs unit by unit is :mod:`miopt.model.attention`. How the
units are kept apart depends on the model's attention (:func:`plan`):

- ``sdpa``: all units in one row with no padding at all, and the attention run unit by unit
  (miopt's registered block attention): each unit costs its own length squared;
- ``eager``, or an sdpa model that cannot be switched to the block attention: units packed into rows
  (first-fit decreasing, row width = the largest unit) with a 4D mask;
- anything else (flash attention, ...): no custom mask is possible, so the prefix tree falls back to
  ``"packed"`` rows whose position ids alone separate the sequences (flash attention's variable-length path).

A model with a sliding window (Mistral, Gemma) is exact in the one-row layout (the block attention
applies each layer's window); one 4D mask cannot hold the windows of every layer, so a batch with a
sequence longer than the window is padded instead (:func:`make_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from miopt.data.packed import PACKINGS, PackedBatch, collate_packed
from miopt.data.tokenize import SequenceBatch, TokenizedExample, collate, round_up
from miopt.model.attention import BLOCKS_KWARG, takes_block_attention
from miopt.model.modeling import (
    SHAPE_MULTIPLE,
    attention_implementation,
    forward_takes_kwargs,
    model_rounds_shapes,
    rounds_shapes,
    sliding_window,
    unwrap,
)

__all__ = [
    "PACKINGS",
    "SHAPE_MULTIPLE",
    "make_batch",
    "model_inputs",
    "plan",
    "resolve_packing",
    "round_up",
    "rounds_shapes",
]


def plan(model, packing: str) -> tuple[str, str | None]:
    """``(layout, attention)`` for ``model``: sdpa runs the packed layouts unit by unit (``"blocks"``, no
    padding at all) when the model can be switched to miopt's block attention and its forward passes
    extra keyword arguments on (rows with a 4D mask otherwise); eager takes rows with a 4D mask; any
    other attention (flash attention, ...) takes no custom mask, so the prefix tree falls back to plain
    packing by position ids."""
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; valid: {', '.join(PACKINGS)}")
    if packing == "padded":
        return "padded", None
    if model is None:
        return packing, "mask"
    if forward_takes_kwargs(model) and takes_block_attention(model):
        return packing, "blocks"
    if attention_implementation(model) in ("sdpa", "eager"):
        return packing, "mask"
    return "packed", "positions"


def resolve_packing(model, packing: str) -> str:
    """The layout :func:`make_batch` uses for ``model`` (see :func:`plan`)."""
    return plan(model, packing)[0]


def _longest(examples: Sequence[TokenizedExample]) -> int:
    return max(
        (len(e.prompt_ids) + len(r) for e in examples for r in (e.chosen_ids, *e.rejected_ids)), default=0
    )


def make_batch(
    examples: Sequence[TokenizedExample], pad_token_id: int, packing: str, model=None
) -> SequenceBatch | PackedBatch:
    """The batch of ``examples`` in layout ``packing``, in the form ``model``'s attention takes
    (:func:`plan`; without a model, rows with a 4D mask). Its width is rounded up to
    :data:`SHAPE_MULTIPLE` when ``model`` runs in bf16/fp16 on CPU (:func:`rounds_shapes`; call this
    inside the autocast context the forward will run in)."""
    layout, attention = plan(model, packing)
    window = sliding_window(model) if model is not None else None
    if attention == "mask" and window is not None and _longest(examples) > window:
        layout = "padded"
    multiple = SHAPE_MULTIPLE if model_rounds_shapes(model) else 1
    if layout == "padded":
        return collate(examples, pad_token_id, pad_to_multiple_of=multiple)
    return collate_packed(
        examples,
        pad_token_id,
        share_prompt=layout == "shared-prompt",
        attention=attention,
        pad_to_multiple_of=multiple,
    )


def model_inputs(model, batch: PackedBatch) -> dict:
    """The forward's keyword arguments for ``batch``: its 4D mask in the form the attention takes (bool
    for sdpa, additive float for eager), or its attention blocks (the forward must then run under
    :func:`miopt.model.attention.block_attention`)."""
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if batch.attention_blocks is not None:
        batch.attention_blocks.calls = 0
        # a placeholder: a 4D mask is passed through untouched, so no mask is built; the blocks replace it
        inputs["attention_mask"] = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=batch.input_ids.device)
        inputs[BLOCKS_KWARG] = batch.attention_blocks
        return inputs
    mask = batch.attention_mask
    if mask is not None and attention_implementation(model) == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )
    inputs["attention_mask"] = mask
    return inputs

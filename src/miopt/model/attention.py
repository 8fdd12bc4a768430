"""Block attention: sdpa run unit by unit over a one-row batch, registered under a name of its own.

The padding-free layouts (:mod:`miopt.data.packed`) can put every unit (a prefix tree or a sequence)
in one row with no padding; the attention must then run on each unit separately, at the cost of its
own length squared. That attention is registered with transformers as :data:`ATTENTION_NAME`
(``AttentionInterface.register``, with sdpa's mask function under the same name), and a model is
switched to it with its public ``set_attn_implementation`` only while miopt runs it
(:func:`block_attention`); other models in the process, and their ``"sdpa"``, are never touched.

Without the blocks keyword argument the registered function is plain sdpa, so a switched model
computes exactly what it computed before (generation included). A model that cannot be switched
(its attention does not go through transformers' attention interface) gets the rows-with-a-mask
layout instead (:func:`miopt.logprobs.packing.plan`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from miopt.data.packed import AttentionBlocks
from miopt.data.tokenize import round_up
from miopt.model.modeling import SHAPE_MULTIPLE, attention_implementation, base_model, rounds_shapes

ATTENTION_NAME = "miopt_blocks"
"""The name miopt's block attention is registered under in transformers' ``AttentionInterface``."""

BLOCKS_KWARG = "miopt_attention_blocks"
"""The forward keyword argument that carries the blocks (transformers passes it down to the attention)."""


def _sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _window_mask(mask: torch.Tensor | None, length: int, window: int, device) -> torch.Tensor:
    """``mask`` (or the causal mask) restricted to keys less than ``window`` positions back: the
    sliding window of Mistral/Gemma layers (transformers' ``kv_idx > q_idx - window``). In a tree a
    node's position is its depth, which is its number of ancestors."""
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    depth = mask[0, 0].sum(-1) - 1
    return mask & ((depth[:, None] - depth[None, :]) < window)


def _block_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """sdpa on each block of ``kwargs[BLOCKS_KWARG]``, concatenated; plain sdpa without it."""
    blocks = kwargs.pop(BLOCKS_KWARG, None)
    sdpa = _sdpa()
    if blocks is None:
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    blocks.calls += 1
    window = kwargs.get("sliding_window")
    multiple = SHAPE_MULTIPLE if rounds_shapes(query.device, query.dtype) else 1
    outputs = []
    for a, b, mask in blocks:
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        length = b - a
        if window and length > window:
            mask = _window_mask(mask, length, window, query.device)
        padding = round_up(length, multiple) - length
        if padding:
            # appended positions: causal rows never see them; a mask is widened to hide them
            q, k, v = (F.pad(t, (0, 0, 0, padding)) for t in (q, k, v))
            if mask is not None:
                mask = F.pad(mask, (0, padding, 0, padding))
                mask[..., length:, length:] = True
        out = sdpa(module, q, k, v, mask, *args, **kwargs)[0]
        outputs.append(out[:, :length] if padding else out)
    return torch.cat(outputs, dim=1), None


def register_block_attention() -> None:
    """Register :data:`ATTENTION_NAME` with transformers (idempotent): the attention function, and
    sdpa's mask function for the masks transformers builds itself (generation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _block_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


_SWITCHABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _switch(model, implementation: str) -> bool:
    """``set_attn_implementation(implementation)``; whether the model now runs it (a model whose
    attention does not go through the attention interface stays as it was)."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the "does not support setting its attention" warning: we fall back
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError):
        return False
    finally:
        logger.setLevel(level)
    return attention_implementation(model) == implementation


def takes_block_attention(model) -> bool:
    """Whether ``model`` runs sdpa (or is switched already) and can be switched to the block attention
    (tried once per model, then remembered)."""
    inner = base_model(model)
    implementation = attention_implementation(inner)
    if implementation == ATTENTION_NAME:
        return True
    if implementation != "sdpa" or not hasattr(inner, "set_attn_implementation"):
        return False
    if inner not in _SWITCHABLE:
        register_block_attention()
        _SWITCHABLE[inner] = _switch(inner, ATTENTION_NAME)
        _switch(inner, implementation)
    return _SWITCHABLE[inner]


@contextmanager
def block_attention(model) -> Iterator[bool]:
    """Within the block, ``model`` (its base model, under distributed and peft wrappers) runs
    :data:`ATTENTION_NAME`; afterwards its own attention again. Yields whether it is switched.

    A training job wraps its whole loop in this: with gradient checkpointing the backward pass reruns
    the forward, which must still find the block attention."""
    inner = base_model(model) if model is not None else None
    previous = attention_implementation(inner) if inner is not None else None
    if inner is None or previous == ATTENTION_NAME or not takes_block_attention(inner):
        yield previous == ATTENTION_NAME
        return
    _switch(inner, ATTENTION_NAME)
    try:
        yield True
    finally:
        _switch(inner, previous)


def check_blocks_used(blocks: AttentionBlocks | None) -> None:
    """Fail loudly when a forward did not run its attention through the blocks (a model whose attention
    does not receive extra keyword arguments): its results would be wrong."""
    if blocks is not None and blocks.calls == 0:
        raise RuntimeError(
            "the model's attention ignored miopt's attention blocks; use packing='padded' for this model"
        )

"""Padding-free batches with the prompt computed once for all responses.

The padded batch of :func:`miopt.data.tokenize.collate` repeats the prompt in every row (chosen and each
rejected) and pads every row to the longest; the forward pass spends much of its time on those copies and
that padding. The layouts here remove both, with log-probs equal to the padded ones (same maths, other
floating-point summation order; tests/test_fast_paths.py):

``"shared-prompt"`` (the default of ``miopt train``)
    Each example (prompt, chosen, K rejected) becomes one *prefix tree* of tokens: the prompt once, then
    each response as a branch (tokens that several responses share at their start, e.g. the beginning of a
    worked solution, are one branch too). A token attends to exactly its ancestors in the tree and its
    position id is its depth, so each response sees the context it would see in its own padded row, and
    every shared token (hidden state, keys/values and its log-prob) is computed once.
``"packed"``
    Every sequence (prompt + response, the prompt repeated) back to back, position ids restarting at 0.
``"padded"``
    The plain right-padded batch (the reference the fast paths are tested against).

How the units (trees or sequences) are kept apart depends on the model's attention (:func:`plan`):

- ``sdpa``: all units in one row with no padding at all, and the attention run unit by unit
  (:func:`install_block_attention`): each unit costs its own length squared;
- ``eager``: units packed into rows (first-fit decreasing, row width = the largest unit) with a 4D mask;
- anything else (flash attention, ...): no custom mask is possible, so the prefix tree falls back to
  ``"packed"`` rows whose position ids alone separate the sequences (flash attention's variable-length path).

Every index the log-prob gather needs is built on the host here, so the step issues no device-to-host
synchronisation of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from miopt.data.tokenize import PairRows, SequenceBatch, TokenizedExample, collate, round_up

PACKINGS = ("shared-prompt", "packed", "padded")

SHAPE_MULTIPLE = 64
"""Lengths are rounded up to this multiple where :func:`rounds_shapes` says so."""


def rounds_shapes(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether lengths (batch width, attention blocks, scored-token chunks) are rounded up to
    :data:`SHAPE_MULTIPLE` for tensors of ``dtype`` on ``device`` (or autocast's dtype where autocast
    is enabled there: float32 tensors, e.g. after RoPE, still reach the kernels in bf16).

    bf16/fp16 matmuls and attention on CPU run oneDNN kernels that are compiled and kept for each
    distinct shape, and are never freed. We measured about 1 MB per shape for a 128-wide linear layer,
    3.5 MB with a 32k-vocabulary head, and 4 MB per sequence length in sdpa. A run whose lengths vary from
    batch to batch therefore grows by gigabytes (docs/performance.md). float32 and GPU kernels keep nothing
    per shape, so their lengths stay exact.
    """
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def _model_rounds_shapes(model) -> bool:
    """:func:`rounds_shapes` for ``model``'s matmuls: its weights' dtype, or autocast's where enabled."""
    from miopt.logprobs import unwrap

    if not isinstance(model, torch.nn.Module):
        return False
    parameter = next(unwrap(model).parameters(), None)
    return parameter is not None and rounds_shapes(parameter.device, parameter.dtype)


@dataclass
class PackedBatch(PairRows):
    """Sequences (``N`` rows of the padded layout: chosen first, then rejected) laid out without padding.

    ``input_ids``/``position_ids`` ``[R, C]``; ``attention_mask`` ``[R, 1, C, C]`` (True = may attend) for
    the prefix-tree layout, None for plain packing. Log-prob bookkeeping: ``predict_index`` ``[U]`` is the
    flat position (``row * C + col``) of the hidden state that predicts scored token ``u``, ``targets``
    ``[U]`` its id; each response token ``t`` of each sequence is scored token ``token_node[t]``, at row
    ``token_rows[t]`` and column ``token_cols[t]`` of the padded layout (one scored token can serve
    several sequences: a shared response prefix is scored once).
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor | None
    attention_blocks: AttentionBlocks | None
    predict_index: Tensor
    targets: Tensor
    token_rows: Tensor
    token_cols: Tensor
    token_node: Tensor
    token_counts: Tensor  # [N] response tokens per sequence
    num_sequences: int
    sequence_length: int  # longest prompt + response (the width of the padded layout)
    num_prompts: int
    rejected_index: Tensor
    rejected_shape: tuple[int, int]
    layout: str

    def to(self, device) -> PackedBatch:
        moved = {
            name: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
            for name, value in self.__dict__.items()
        }
        if self.attention_blocks is not None:
            moved["attention_blocks"] = AttentionBlocks(
                (a, b, None if m is None else m.to(device, non_blocking=True))
                for a, b, m in self.attention_blocks
            )
        return PackedBatch(**moved)

    @property
    def computed_tokens(self) -> int:
        """Positions the forward pass runs on (padding included)."""
        return self.input_ids.numel()


def _sequences(
    examples: Sequence[TokenizedExample],
) -> tuple[list[list[tuple[int, ...]]], list[tuple[int, int]]]:
    """Per example, its responses in row order (chosen, then rejected); and ``(prompt, k)`` of each rejected."""
    groups = [[e.chosen_ids, *e.rejected_ids] for e in examples]
    rejected_index = [(b, k) for b, e in enumerate(examples) for k in range(len(e.rejected_ids))]
    return groups, rejected_index


def _sequence_rows(examples: Sequence[TokenizedExample]) -> list[list[int]]:
    """Row of each response of each example in the padded layout (chosen ``b``, rejected after all chosen)."""
    rows, next_rejected = [], len(examples)
    for b, example in enumerate(examples):
        ids = [b]
        for _ in example.rejected_ids:
            ids.append(next_rejected)
            next_rejected += 1
        rows.append(ids)
    return rows


@dataclass
class _Tree:
    """One example as a token tree: ``tokens``/``parents``/``depths`` per node (ancestors first),
    ``paths`` the node list of each sequence."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    paths: list[list[int]]
    prompt_length: int


def _build_tree(prompt: tuple[int, ...], responses: Sequence[tuple[int, ...]], share: bool) -> _Tree:
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    paths: list[list[int]] = []
    children: dict[tuple[int, int], int] = {}
    for response in responses:
        path: list[int] = []
        parent = -1
        for depth, token in enumerate((*prompt, *response)):
            node = children.get((parent, token)) if share else None
            if node is None:
                node = len(tokens)
                tokens.append(token)
                parents.append(parent)
                depths.append(depth)
                if share:
                    children[(parent, token)] = node
            path.append(node)
            parent = node
        paths.append(path)
    return _Tree(tokens, parents, depths, paths, len(prompt))


def _first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total size <= capacity; items larger than capacity get their own bin."""
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for b, free in enumerate(room):
            if sizes[item] <= free:
                bins[b].append(item)
                room[b] -= sizes[item]
                break
        else:
            bins.append([item])
            room.append(capacity - sizes[item])
    return bins


def _tree_mask(tree: _Tree) -> np.ndarray:
    """``[n, n]``: node ``i`` may attend to node ``j`` iff ``j`` is ``i`` or one of its ancestors (the union
    over the tree's paths of each path's lower triangle)."""
    n = len(tree.tokens)
    mask = np.zeros((n, n), dtype=bool)
    for path in tree.paths:
        nodes = np.asarray(path)
        rows, cols = np.tril_indices(len(path))
        mask[nodes[rows], nodes[cols]] = True
    return mask


class AttentionBlocks(list):
    """``(start, stop, mask)`` per unit of a one-row batch, for the block attention of
    :func:`install_block_attention` (``mask`` ``[1, 1, n, n]`` bool, or None for a causal sequence).
    ``calls`` counts the attention calls that consumed it: a forward that never did ignored the blocks."""

    calls: int = 0


def collate_packed(
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    *,
    share_prompt: bool = True,
    attention: str = "mask",
    row_length: int | None = None,
    pad_to_multiple_of: int = 1,
) -> PackedBatch:
    """The padding-free batch of ``examples`` (see the module docstring).

    ``share_prompt``: one prefix tree per example (else one sequence per response, prompts repeated).
    ``attention``: how the units are kept apart:

    - ``"blocks"``: every unit in one row, no padding at all; the attention runs unit by unit
      (:func:`install_block_attention`, sdpa);
    - ``"mask"``: units packed into rows (first-fit decreasing) with a 4D mask (any attention that takes one);
    - ``"positions"``: rows as for ``"mask"`` but no mask (``share_prompt=False`` only): the model derives
      the block-diagonal causal mask from the position ids (flash attention's variable-length path).

    ``row_length``: capacity of a row in tokens for ``"mask"``/``"positions"`` (default: the largest unit;
    a larger value fills rows better but costs attention over the masked-out blocks).
    ``pad_to_multiple_of``: the row width is rounded up to this multiple (:func:`rounds_shapes`).
    """
    if attention not in ("blocks", "mask", "positions"):
        raise ValueError(f"unknown attention layout {attention!r}")
    if attention == "positions" and share_prompt:
        raise ValueError("the prefix-tree layout needs a mask (attention='mask' or 'blocks')")
    groups, rejected_index = _sequences(examples)
    sequence_rows = _sequence_rows(examples)
    num_sequences = sum(len(g) for g in groups)
    # Units: one tree per example, or one single-path tree per sequence without sharing.
    trees: list[_Tree] = []
    unit_rows: list[list[int]] = []  # padded-layout row of each path of a unit
    for example, responses, rows in zip(examples, groups, sequence_rows):
        if share_prompt:
            trees.append(_build_tree(example.prompt_ids, responses, share=True))
            unit_rows.append(rows)
        else:
            for response, row in zip(responses, rows):
                trees.append(_build_tree(example.prompt_ids, [response], share=False))
                unit_rows.append([row])
    sizes = [len(t.tokens) for t in trees]
    if attention == "blocks":
        bins = [list(range(len(trees)))]
    else:
        bins = _first_fit_decreasing(sizes, max(max(sizes, default=1), row_length or 0))
    width = max(sum(sizes[i] for i in b) for b in bins) if bins else 1
    width = round_up(width, pad_to_multiple_of)

    num_rows = len(bins)
    input_ids = np.full((num_rows, width), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((num_rows, width), dtype=np.int64)
    mask = np.zeros((num_rows, width, width), dtype=bool) if attention == "mask" else None
    blocks = AttentionBlocks() if attention == "blocks" else None
    predict_index: list[int] = []
    targets: list[int] = []
    token_rows: list[int] = []
    token_cols: list[int] = []
    token_node: list[int] = []
    token_counts = np.zeros(num_sequences, dtype=np.int64)
    sequence_length = 0
    for row, members in enumerate(bins):
        offset = 0
        for unit in members:
            tree, n = trees[unit], sizes[unit]
            input_ids[row, offset : offset + n] = tree.tokens
            position_ids[row, offset : offset + n] = tree.depths
            if mask is not None:
                mask[row, offset : offset + n, offset : offset + n] = _tree_mask(tree)
            if blocks is not None:
                local = torch.from_numpy(_tree_mask(tree))[None, None] if share_prompt else None
                blocks.append((offset, offset + n, local))
            scored: dict[int, int] = {}  # node -> index into predict_index / targets
            for path, sequence_row in zip(tree.paths, unit_rows[unit]):
                sequence_length = max(sequence_length, len(path))
                start = max(tree.prompt_length, 1)
                for depth in range(start, len(path)):
                    node = path[depth]
                    u = scored.get(node)
                    if u is None:
                        u = len(targets)
                        scored[node] = u
                        predict_index.append(row * width + offset + path[depth - 1])
                        targets.append(tree.tokens[node])
                    token_rows.append(sequence_row)
                    token_cols.append(depth)
                    token_node.append(u)
                token_counts[sequence_row] = len(path) - start
            offset += n
        if offset < width:
            # padding: positions continue (a harmless sequence of its own); each pad token sees itself only
            position_ids[row, offset:] = np.arange(width - offset)
            if mask is not None:
                pad = np.arange(offset, width)
                mask[row, pad, pad] = True
            if blocks is not None:
                blocks.append((offset, width, None))

    def long(values) -> Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64))

    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        attention_mask=torch.from_numpy(mask).unsqueeze(1) if mask is not None else None,
        attention_blocks=blocks,
        predict_index=long(predict_index),
        targets=long(targets),
        token_rows=long(token_rows),
        token_cols=long(token_cols),
        token_node=long(token_node),
        token_counts=torch.from_numpy(token_counts),
        num_sequences=num_sequences,
        sequence_length=sequence_length,
        num_prompts=len(examples),
        rejected_index=long(rejected_index).reshape(-1, 2),
        rejected_shape=(len(examples), max((len(e.rejected_ids) for e in examples), default=0)),
        layout="shared-prompt" if share_prompt else "packed",
    )


def attention_implementation(model) -> str | None:
    from miopt.logprobs import unwrap

    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def plan(model, packing: str) -> tuple[str, str | None]:
    """``(layout, attention)`` for ``model``: sdpa runs the packed layouts unit by unit (``"blocks"``, no
    padding at all; rows with a 4D mask if the forward takes no extra keyword arguments); eager takes them
    as rows with a 4D mask; any other attention (flash attention, ...) takes no custom mask, so the prefix
    tree falls back to plain packing by position ids."""
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; valid: {', '.join(PACKINGS)}")
    if packing == "padded":
        return "padded", None
    implementation = attention_implementation(model) if model is not None else "eager"
    if implementation == "sdpa" and _forward_takes_kwargs(model):
        return packing, "blocks"
    if implementation == "sdpa":
        return packing, "mask"
    if implementation == "eager":
        return packing, "mask"
    return "packed", "positions"


def _forward_takes_kwargs(model) -> bool:
    """Whether the forward passes extra keyword arguments on (to the attention, in transformers 5)."""
    import inspect

    from miopt.logprobs import unwrap

    inner = unwrap(model)
    forward = getattr(getattr(inner, "get_base_model", lambda: inner)(), "forward", None)
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def resolve_packing(model, packing: str) -> str:
    """The layout :func:`make_batch` uses for ``model`` (see :func:`plan`)."""
    return plan(model, packing)[0]


def make_batch(
    examples: Sequence[TokenizedExample], pad_token_id: int, packing: str, model=None
) -> SequenceBatch | PackedBatch:
    """The batch of ``examples`` in layout ``packing``, in the form ``model``'s attention takes
    (:func:`plan`; without a model, rows with a 4D mask). Its width is rounded up to
    :data:`SHAPE_MULTIPLE` when ``model`` runs in bf16/fp16 on CPU (:func:`rounds_shapes`; call this
    inside the autocast context the forward will run in)."""
    layout, attention = plan(model, packing)
    multiple = SHAPE_MULTIPLE if _model_rounds_shapes(model) else 1
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
    for sdpa, additive float for eager), or its attention blocks."""
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if batch.attention_blocks is not None:
        install_block_attention()
        batch.attention_blocks.calls = 0
        # a placeholder: a 4D mask is passed through untouched, so no mask is built; the blocks replace it
        inputs["attention_mask"] = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=batch.input_ids.device)
        inputs[BLOCKS_KWARG] = batch.attention_blocks
        return inputs
    mask = batch.attention_mask
    if mask is not None and attention_implementation(model) == "eager":
        from miopt.logprobs import unwrap

        dtype = next(unwrap(model).parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )
    inputs["attention_mask"] = mask
    return inputs


def check_blocks_used(batch: PackedBatch) -> None:
    """Fail loudly when a forward did not run its attention through the blocks (a model whose attention
    does not receive extra keyword arguments): its results would be wrong."""
    if batch.attention_blocks is not None and batch.attention_blocks.calls == 0:
        raise RuntimeError(
            "the model's attention ignored miopt's attention blocks; use packing='padded' for this model"
        )


BLOCKS_KWARG = "miopt_attention_blocks"


def install_block_attention() -> None:
    """Wrap transformers' ``sdpa`` attention so that a forward given ``miopt_attention_blocks`` runs it
    block by block: each unit of a one-row batch attends within itself (with its tree mask, or causally),
    at the cost of its own length squared, with no padding. Without that keyword argument the wrapped
    function is called unchanged. Transformers passes a forward's extra keyword arguments down to the
    attention function (as it does for flash attention's variable-length arguments)."""
    from transformers import AttentionInterface

    original = AttentionInterface._global_mapping["sdpa"]
    if getattr(original, "miopt_blocks", False):
        return

    def sdpa_by_blocks(module, query, key, value, attention_mask, *args, **kwargs):
        blocks = kwargs.pop(BLOCKS_KWARG, None)
        if blocks is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        blocks.calls += 1
        multiple = SHAPE_MULTIPLE if rounds_shapes(query.device, query.dtype) else 1
        outputs = []
        for a, b, mask in blocks:
            q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
            length = b - a
            padding = round_up(length, multiple) - length
            if padding:
                # appended positions: causal rows never see them; a tree mask is widened to hide them
                q, k, v = (F.pad(t, (0, 0, 0, padding)) for t in (q, k, v))
                if mask is not None:
                    mask = F.pad(mask, (0, padding, 0, padding))
                    mask[..., length:, length:] = True
            out = original(module, q, k, v, mask, *args, **kwargs)[0]
            outputs.append(out[:, :length] if padding else out)
        return torch.cat(outputs, dim=1), None

    sdpa_by_blocks.miopt_blocks = True
    AttentionInterface.register("sdpa", sdpa_by_blocks)

"""Padding-free batches with the prompt computed once for all responses: the pure token layout.

The padded batch of :func:`miopt.data.tokenize.collate` repeats the prompt in every row (chosen and each
rejected) and pads every row to the longest; the forward pass spends much of its time on those copies and
that padding. The layouts here remove both, with log-probs equal to the padded ones (same maths, other
floating-point summation order; tests/logprobs/test_fast_paths.py, tests/logprobs/test_model_families.py):

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

This module only arranges token ids on the host (numpy): trees, bins of units per row, masks, and every
index the log-prob gather needs, so the step issues no device-to-host synchronisation of its own. Which
arrangement a model takes is decided by :func:`miopt.logprobs.packing.plan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from miopt.data.tokenize import PairRows, TokenizedExample, round_up

PACKINGS = ("shared-prompt", "packed", "padded")
ATTENTION_LAYOUTS = ("blocks", "mask", "positions")


class AttentionBlocks(list):
    """``(start, stop, mask)`` per unit of a one-row batch, for miopt's block attention
    (:mod:`miopt.model.attention`; ``mask`` ``[1, 1, n, n]`` bool, or None for a causal sequence).
    ``calls`` counts the attention calls that consumed it: a forward that never did ignored the blocks."""

    calls: int = 0

    def to(self, device, non_blocking: bool = True) -> AttentionBlocks:
        return AttentionBlocks(
            (a, b, None if m is None else m.to(device, non_blocking=non_blocking)) for a, b, m in self
        )


@dataclass
class PackedBatch(PairRows):
    """Sequences (``N`` rows of the padded layout: chosen first, then rejected) laid out without padding.

    ``input_ids``/``position_ids`` ``[R, C]``; ``attention_mask`` ``[R, 1, C, C]`` (True = may attend) for
    the prefix-tree layout in rows, None otherwise; ``attention_blocks`` the units of a one-row batch.
    Log-prob bookkeeping: ``predict_index`` ``[U]`` is the flat position (``row * C + col``) of the hidden
    state that predicts scored token ``u``, ``targets`` ``[U]`` its id; each response token ``t`` of each
    sequence is scored token ``token_node[t]``, at row ``token_rows[t]`` and column ``token_cols[t]`` of
    the padded layout (one scored token can serve several sequences: a shared response prefix is scored
    once).
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
            name: value.to(device, non_blocking=True)
            if isinstance(value, Tensor | AttentionBlocks)
            else value
            for name, value in self.__dict__.items()
        }
        return PackedBatch(**moved)

    @property
    def computed_tokens(self) -> int:
        """Positions the forward pass runs on (padding included)."""
        return self.input_ids.numel()


@dataclass
class _Tree:
    """One unit as a token tree: ``tokens``/``parents``/``depths`` per node (ancestors first),
    ``paths`` the node list of each sequence, ``rows`` each sequence's row in the padded layout."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    paths: list[list[int]]
    prompt_length: int
    rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def _build_tree(prompt: tuple[int, ...], responses: Sequence[tuple[int, ...]], share: bool) -> _Tree:
    """The prompt followed by each response; with ``share``, equal prefixes are one branch."""
    tree = _Tree([], [], [], [], len(prompt))
    children: dict[tuple[int, int], int] = {}
    for response in responses:
        path: list[int] = []
        parent = -1
        for depth, token in enumerate((*prompt, *response)):
            node = children.get((parent, token)) if share else None
            if node is None:
                node = len(tree.tokens)
                tree.tokens.append(token)
                tree.parents.append(parent)
                tree.depths.append(depth)
                if share:
                    children[(parent, token)] = node
            path.append(node)
            parent = node
        tree.paths.append(path)
    return tree


def _tree_mask(tree: _Tree) -> np.ndarray:
    """``[n, n]``: node ``i`` may attend to node ``j`` iff ``j`` is ``i`` or one of its ancestors (the union
    over the tree's paths of each path's lower triangle)."""
    n = len(tree)
    mask = np.zeros((n, n), dtype=bool)
    for path in tree.paths:
        nodes = np.asarray(path)
        rows, cols = np.tril_indices(len(path))
        mask[nodes[rows], nodes[cols]] = True
    return mask


def _units(examples: Sequence[TokenizedExample], share_prompt: bool) -> list[_Tree]:
    """One tree per example (chosen, then rejected, as branches), or one single-path tree per sequence.
    Rows of the padded layout: chosen ``b`` of example ``b``, rejected after all chosen."""
    units: list[_Tree] = []
    next_rejected = len(examples)
    for b, example in enumerate(examples):
        responses = [example.chosen_ids, *example.rejected_ids]
        rows = [b, *range(next_rejected, next_rejected + len(example.rejected_ids))]
        next_rejected += len(example.rejected_ids)
        if share_prompt:
            tree = _build_tree(example.prompt_ids, responses, share=True)
            tree.rows = rows
            units.append(tree)
            continue
        for response, row in zip(responses, rows):
            tree = _build_tree(example.prompt_ids, [response], share=False)
            tree.rows = [row]
            units.append(tree)
    return units


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


class _Rows:
    """The arrays of a packed batch being filled, unit by unit and row by row."""

    def __init__(self, num_rows: int, width: int, pad_token_id: int, attention: str, num_sequences: int):
        self.width = width
        self.input_ids = np.full((num_rows, width), pad_token_id, dtype=np.int64)
        self.position_ids = np.zeros((num_rows, width), dtype=np.int64)
        self.mask = np.zeros((num_rows, width, width), dtype=bool) if attention == "mask" else None
        self.blocks = AttentionBlocks() if attention == "blocks" else None
        self.predict_index: list[int] = []
        self.targets: list[int] = []
        self.token_rows: list[int] = []
        self.token_cols: list[int] = []
        self.token_node: list[int] = []
        self.token_counts = np.zeros(num_sequences, dtype=np.int64)
        self.sequence_length = 0

    def place(self, row: int, offset: int, tree: _Tree, tree_mask: bool) -> None:
        """Tokens, position ids (depths) and the attention of ``tree`` at ``row``, ``offset``."""
        n = len(tree)
        self.input_ids[row, offset : offset + n] = tree.tokens
        self.position_ids[row, offset : offset + n] = tree.depths
        if self.mask is not None:
            self.mask[row, offset : offset + n, offset : offset + n] = _tree_mask(tree)
        if self.blocks is not None:
            local = torch.from_numpy(_tree_mask(tree))[None, None] if tree_mask else None
            self.blocks.append((offset, offset + n, local))

    def score(self, row: int, offset: int, tree: _Tree) -> None:
        """The gather indices of every response token of ``tree``'s sequences; a node shared by several
        sequences is scored once."""
        scored: dict[int, int] = {}  # node -> index into predict_index / targets
        start = max(tree.prompt_length, 1)
        for path, sequence_row in zip(tree.paths, tree.rows):
            self.sequence_length = max(self.sequence_length, len(path))
            for depth in range(start, len(path)):
                node = path[depth]
                u = scored.get(node)
                if u is None:
                    u = scored[node] = len(self.targets)
                    self.predict_index.append(row * self.width + offset + path[depth - 1])
                    self.targets.append(tree.tokens[node])
                self.token_rows.append(sequence_row)
                self.token_cols.append(depth)
                self.token_node.append(u)
            self.token_counts[sequence_row] = len(path) - start

    def pad(self, row: int, offset: int) -> None:
        """Padding after ``offset``: positions continue (a harmless sequence of its own); each pad token
        sees itself only."""
        if offset >= self.width:
            return
        self.position_ids[row, offset:] = np.arange(self.width - offset)
        if self.mask is not None:
            pad = np.arange(offset, self.width)
            self.mask[row, pad, pad] = True
        if self.blocks is not None:
            self.blocks.append((offset, self.width, None))


def _long(values) -> Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


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
      (:mod:`miopt.model.attention`, sdpa);
    - ``"mask"``: units packed into rows (first-fit decreasing) with a 4D mask (any attention that takes one);
    - ``"positions"``: rows as for ``"mask"`` but no mask (``share_prompt=False`` only): the model derives
      the block-diagonal causal mask from the position ids (flash attention's variable-length path).

    ``row_length``: capacity of a row in tokens for ``"mask"``/``"positions"`` (default: the largest unit;
    a larger value fills rows better but costs attention over the masked-out blocks).
    ``pad_to_multiple_of``: the row width is rounded up to this multiple (:func:`miopt.model.modeling.rounds_shapes`).
    """
    if attention not in ATTENTION_LAYOUTS:
        raise ValueError(f"unknown attention layout {attention!r}")
    if attention == "positions" and share_prompt:
        raise ValueError("the prefix-tree layout needs a mask (attention='mask' or 'blocks')")
    units = _units(examples, share_prompt)
    sizes = [len(unit) for unit in units]
    if attention == "blocks":
        bins = [list(range(len(units)))]
    else:
        bins = _first_fit_decreasing(sizes, max(max(sizes, default=1), row_length or 0))
    width = max((sum(sizes[i] for i in b) for b in bins), default=1)
    rows = _Rows(
        len(bins),
        round_up(width, pad_to_multiple_of),
        pad_token_id,
        attention,
        sum(len(unit.rows) for unit in units),
    )
    for row, members in enumerate(bins):
        offset = 0
        for index in members:
            rows.place(row, offset, units[index], tree_mask=share_prompt)
            rows.score(row, offset, units[index])
            offset += sizes[index]
        rows.pad(row, offset)
    return _as_batch(rows, examples, share_prompt)


def _as_batch(rows: _Rows, examples: Sequence[TokenizedExample], share_prompt: bool) -> PackedBatch:
    """The filled rows as tensors, with the gather indices of the rejected responses."""
    return PackedBatch(
        input_ids=torch.from_numpy(rows.input_ids),
        position_ids=torch.from_numpy(rows.position_ids),
        attention_mask=torch.from_numpy(rows.mask).unsqueeze(1) if rows.mask is not None else None,
        attention_blocks=rows.blocks,
        predict_index=_long(rows.predict_index),
        targets=_long(rows.targets),
        token_rows=_long(rows.token_rows),
        token_cols=_long(rows.token_cols),
        token_node=_long(rows.token_node),
        token_counts=torch.from_numpy(rows.token_counts),
        num_sequences=len(rows.token_counts),
        sequence_length=rows.sequence_length,
        num_prompts=len(examples),
        rejected_index=_long(
            [(b, k) for b, e in enumerate(examples) for k in range(len(e.rejected_ids))]
        ).reshape(-1, 2),
        rejected_shape=(len(examples), max((len(e.rejected_ids) for e in examples), default=0)),
        layout="shared-prompt" if share_prompt else "packed",
    )

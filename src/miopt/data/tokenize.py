"""Tokenisation, truncation and batching of preference and SFT records.

Truncation rule (applied once, before training):
1. A prompt whose token count is ``>= max_length`` leaves no room for a response: error
   naming the record (or the record is skipped with ``skip_invalid``).
2. A prompt longer than ``max_prompt_length`` keeps its last ``max_prompt_length`` tokens
   (left truncation: the end of a prompt is what the response answers).
3. Each response keeps its first ``max_length - len(prompt)`` tokens (right truncation; the
   end-of-sequence token is then lost, as in TRL).
A record is counted as truncated when any of its sequences was cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from miopt.errors import DataError


@dataclass(frozen=True)
class TokenizedExample:
    """One prompt with its chosen response and ``K >= 1`` rejected responses (token ids)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[tuple[int, ...], ...]
    source: str = ""


@dataclass
class TokenizeReport:
    total: int = 0
    truncated: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.total} records tokenised, {self.truncated} truncated"
        if self.skipped:
            text += f", {self.skipped} skipped (prompt too long)"
        return text


def _encode_prompt(tokenizer, text: str) -> list[int]:
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def _encode_response(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def tokenize_examples(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    sources: Sequence[str],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenise prompts and their responses (first response = chosen, the rest = rejected; an
    SFT example has just one) under the truncation rule of this module."""
    report = TokenizeReport()
    examples: list[TokenizedExample] = []
    for prompt, texts, source in zip(prompts, responses, sources):
        report.total += 1
        prompt_ids = _encode_prompt(tokenizer, prompt)
        if len(prompt_ids) >= max_length:
            message = (
                f"prompt is {len(prompt_ids)} tokens, max_length is {max_length}: no room for a response"
            )
            if not skip_invalid:
                raise DataError(message, source=source, field="prompt")
            report.skipped += 1
            report.reasons.append(f"{source}: {message}")
            continue
        truncated = False
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
            truncated = True
        room = max_length - len(prompt_ids)
        encoded = []
        for text in texts:
            ids = _encode_response(tokenizer, text)
            if len(ids) > room:
                ids, truncated = ids[:room], True
            encoded.append(tuple(ids))
        report.truncated += truncated
        examples.append(TokenizedExample(tuple(prompt_ids), encoded[0], tuple(encoded[1:]), source))
    return examples, report


def tokenize_preferences(
    records, tokenizer, *, max_length: int, max_prompt_length: int | None = None, skip_invalid: bool = False
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenise :class:`miopt.data.records.PreferenceRecord` objects."""
    return tokenize_examples(
        [r.prompt for r in records],
        [(r.chosen, *r.rejected) for r in records],
        [r.source for r in records],
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        skip_invalid=skip_invalid,
    )


def tokenize_sft(
    records, tokenizer, *, max_length: int, max_prompt_length: int | None = None, skip_invalid: bool = False
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenise :class:`miopt.data.records.SFTRecord` objects (the completion is the 'chosen')."""
    return tokenize_examples(
        [r.prompt for r in records],
        [(r.completion,) for r in records],
        [r.source for r in records],
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        skip_invalid=skip_invalid,
    )


def fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """A hash of every token id (identifies the data, tokenizer and truncation together)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(repr((example.prompt_ids, example.chosen_ids, example.rejected_ids)).encode())
    return digest.hexdigest()


class PairRows:
    """Rows ``0..B-1`` are the chosen responses of the ``B`` prompts, the rest the rejected ones, with
    ``rejected_index`` ``[R, 2]`` the ``(prompt, k)`` slot of each in ``[B, K]`` (``rejected_shape``)."""

    num_prompts: int
    rejected_index: Tensor
    rejected_shape: tuple[int, int]

    @property
    def rejected_mask(self) -> Tensor:
        mask = torch.zeros(self.rejected_shape, dtype=torch.bool, device=self.rejected_index.device)
        if len(self.rejected_index):
            mask[self.rejected_index[:, 0], self.rejected_index[:, 1]] = True
        return mask

    def split_rows(self, per_row: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row values ``[N]`` to chosen ``[B]`` and rejected ``[B, K]`` (zeros where masked)."""
        chosen = per_row[: self.num_prompts]
        rejected = per_row.new_zeros(self.rejected_shape)
        if len(self.rejected_index):
            rejected = rejected.index_put(
                (self.rejected_index[:, 0], self.rejected_index[:, 1]), per_row[self.num_prompts :]
            )
        return chosen, rejected


@dataclass
class SequenceBatch(PairRows):
    """Sequences ``prompt + response`` of one batch, right-padded, chosen first.

    Row ``i < B`` is prompt ``i``'s chosen response; the remaining rows are the rejected
    responses, with ``rejected_index`` mapping each to its ``(prompt, k)`` slot in ``[B, K]``.
    ``response_mask`` marks the tokens whose log-probability counts (response tokens).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    num_prompts: int
    rejected_index: Tensor  # [R, 2] long: (prompt, k) of each rejected row
    rejected_shape: tuple[int, int]  # (B, K)
    prompt_lengths: Tensor  # [N] prompt length of each row

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.num_prompts,
            self.rejected_index.to(device),
            self.rejected_shape,
            self.prompt_lengths.to(device),
        )


def round_up(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


def collate(
    examples: Sequence[TokenizedExample], pad_token_id: int, *, pad_to_multiple_of: int = 1
) -> SequenceBatch:
    """Build the concatenated, right-padded batch of chosen then rejected sequences (width rounded up
    to ``pad_to_multiple_of``)."""
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for example in examples:
        rows.append((example.prompt_ids, example.chosen_ids))
    rejected_index = []
    width = max((len(e.rejected_ids) for e in examples), default=0)
    for b, example in enumerate(examples):
        for k, ids in enumerate(example.rejected_ids):
            rows.append((example.prompt_ids, ids))
            rejected_index.append((b, k))
    length = round_up(max(len(p) + len(r) for p, r in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    response_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    prompt_lengths = torch.zeros(len(rows), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        total = len(prompt) + len(response)
        input_ids[i, :total] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :total] = 1
        response_mask[i, len(prompt) : total] = True
        prompt_lengths[i] = len(prompt)
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        num_prompts=len(examples),
        rejected_index=torch.tensor(rejected_index, dtype=torch.long).reshape(-1, 2),
        rejected_shape=(len(examples), width),
        prompt_lengths=prompt_lengths,
    )

"""Unpaired preference data for KTO: records, their validation, tokenisation and the mismatched pairs.

Rows (https://huggingface.co/docs/trl/dataset_formats, "unpaired preference"):

* ``prompt``, ``completion`` (strings, or message lists rendered with the chat template as for SFT
  rows) and ``label`` (a JSON boolean: true = desirable);
* any paired preference row (``miopt.data.records``) is split into one desirable record (the chosen
  response) and one undesirable record per rejected response.

A bad row raises ``DataError`` naming file, line and field (missing or non-boolean ``label``, empty
``completion``, ...), or with ``skip_invalid`` is counted. Tokenised, each record becomes an
:class:`UnpairedExample` whose single "rejected" slot holds a *mismatched* completion: the
completion of another example, for the KL reference point of KTO (``miopt.objectives.kto``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miopt.data import records as paired
from miopt.data.sources import kind_of
from miopt.data.tokenize import TokenizedExample, TokenizeReport, tokenize_examples
from miopt.errors import DataError


@dataclass(frozen=True)
class UnpairedRecord:
    prompt: str
    completion: str
    label: bool  # True: desirable
    source: str


@dataclass(frozen=True)
class UnpairedExample(TokenizedExample):
    """A tokenised unpaired record: ``chosen_ids`` is the completion, ``rejected_ids`` one mismatched
    completion (of another example) for the KL estimate, ``label`` True when desirable."""

    label: bool = True


def load_unpaired_records(
    source: str | Path, tokenizer=None, *, skip_invalid: bool = False, split: str = "train"
) -> tuple[list[UnpairedRecord], paired.LoadReport]:
    """Read and validate every row of ``source`` as unpaired records (paired rows are split)."""
    renderer = paired._ChatRenderer(tokenizer)
    groups, report = paired._load(
        source, split, skip_invalid, lambda row, where: _unpaired(row, where, renderer)
    )
    return [record for group in groups for record in group], report


def _unpaired(row: dict[str, Any], where: str, renderer) -> tuple[UnpairedRecord, ...]:
    if "chosen" in row or "rejected" in row:
        record = paired._preference(row, where, renderer)
        return (
            UnpairedRecord(record.prompt, record.chosen, True, where),
            *(UnpairedRecord(record.prompt, text, False, where) for text in record.rejected),
        )
    if "completion" not in row and "label" not in row:
        raise DataError(
            "missing: unpaired rows need prompt, completion and label (or paired rows: prompt, chosen, "
            f"rejected); {paired._fields_of(row)}",
            source=where,
            field="completion",
        )
    label = paired._require(row, "label", where)
    if type(label).__name__ not in ("bool", "bool_"):  # JSON true/false (numpy's bool from Parquet)
        raise DataError(
            f"must be a boolean (true = desirable), got {kind_of(label)}", source=where, field="label"
        )
    prompt_kind, prompt = paired._classify(paired._require(row, "prompt", where), "prompt", where)
    completion_kind, completion = paired._classify(
        paired._require(row, "completion", where), "completion", where
    )
    if completion_kind != prompt_kind:
        raise DataError(
            f"is {paired._describe(completion_kind)} but prompt is {paired._describe(prompt_kind)}; "
            "they must have the same format",
            source=where,
            field="completion",
        )
    if completion_kind == "text":
        if not completion.strip():
            raise DataError("is empty", source=where, field="completion")
        return (UnpairedRecord(prompt, completion, bool(label), where),)
    if not "".join(message["content"] for message in completion).strip():
        raise DataError("is empty: its messages have no content", source=where, field="completion")
    renderer.check(where, "completion")
    prompt_text, texts = renderer.split(prompt, [("completion", completion)], where)
    return (UnpairedRecord(prompt_text, texts[0], bool(label), where),)


def tokenize_unpaired(
    records: Sequence[UnpairedRecord],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    skip_invalid: bool = False,
) -> tuple[list[UnpairedExample], TokenizeReport]:
    """Tokenise unpaired records (the truncation rule of ``miopt.data.tokenize``); the mismatched
    completions are attached later by :func:`with_mismatched_completions`."""
    examples, report = tokenize_examples(
        [r.prompt for r in records],
        [(r.completion,) for r in records],
        [r.source for r in records],
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        skip_invalid=skip_invalid,
    )
    labels = {r.source: [] for r in records}
    for record in records:
        labels[record.source].append(record.label)
    result = [
        UnpairedExample(e.prompt_ids, e.chosen_ids, (), e.source, labels[e.source].pop(0)) for e in examples
    ]
    return result, report


def split_pairs(examples: Sequence[TokenizedExample]) -> list[UnpairedExample]:
    """Paired examples -> unpaired ones: the chosen response desirable, each rejected one undesirable."""
    result = []
    for e in examples:
        result.append(UnpairedExample(e.prompt_ids, e.chosen_ids, (), e.source, True))
        result.extend(UnpairedExample(e.prompt_ids, ids, (), e.source, False) for ids in e.rejected_ids)
    return result


def with_mismatched_completions(
    examples: Sequence[UnpairedExample], *, block: int, max_length: int, seed: int = 0
) -> list[UnpairedExample]:
    """Give each example a mismatched completion for KTO's KL estimate (TRL's KTOTrainer scheme).

    The examples are put in a seeded random order and cut into blocks of ``block``; within a block the
    completions are rotated by one, so example ``j`` of a block gets the completion of example
    ``j - 1`` (the first gets the last's), cut to fit ``max_length`` after its own prompt. The pairing is
    fixed before training, so its reference log-probs are computed and cached with the rest.
    """
    if block < 2:
        raise ValueError("the mismatched pairs need blocks of at least 2 examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    partner = {}
    for start in range(0, len(order), block):
        members = order[start : start + block]
        if len(members) == 1 and start > 0:  # a lone last example borrows from the block before
            members = order[start - 1 : start + 1]
        for j, index in enumerate(members):
            partner[index] = members[j - 1]
    result = []
    for index, e in enumerate(examples):
        other = examples[partner[index]].chosen_ids if len(examples) > 1 else e.chosen_ids
        room = max_length - len(e.prompt_ids)
        result.append(UnpairedExample(e.prompt_ids, e.chosen_ids, (other[:room],), e.source, e.label))
    return result

"""Evaluation records from files or the built-in task, in one common form (:class:`EvalRecord`).

Accepted JSONL records (one JSON object per line; the format is recognised per record by its
fields; docs/evaluation.md):

* GSM8K: ``{"question", "answer"}``, ``answer`` a worked solution ending ``#### <number>``;
  also ``{"question", "ground_truth"}`` (example_model_solutions.jsonl; ``ground_truth`` ends
  ``A: <number>``). Prompted as :data:`GSM8K_PROMPT`; checked as numbers.
* MATH: ``{"problem", "solution"}``, the answer being the solution's last ``\\boxed{}``;
  checked by math-verify.
* Multiple choice (ARC / MMLU style): ``{"question", "choices", "answer"}``; ``choices`` a list
  of strings or ARC's ``{"text": [...], "label": [...]}``; the answer an index, a label (``"B"``),
  or the choice's text (ARC's ``answerKey`` is accepted for ``answer``).
* Generic: ``{"prompt", "answer"}`` with optional ``choices`` (then multiple choice) and
  optional ``answer_type`` (``number``, ``math``, ``arithmetic``, ``exact``; default: ``number``
  when the answer is a number, else ``math``).

The built-in arithmetic task is named ``arithmetic`` (held-out problems of
:func:`miopt.tasks.arithmetic.generate_splits`), optionally with its split as
``arithmetic:n_train=24800,n_heldout=1000,seed=0`` (the embedded default's held-out split).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from miopt.data.sources import read_jsonl
from miopt.errors import DataError
from miopt.evaluation.answers import (
    ANSWER_TYPES,
    extract_boxed,
    format_number,
    gsm8k_reference,
    is_number,
    parse_number,
)
from miopt.evaluation.choice import continuation
from miopt.tasks import arithmetic
from miopt.tasks.gsm8k import gsm8k_prompt

CHOICE_PROMPT = "Question: {question}\nAnswer:"
"""The context for question-style multiple-choice records; each choice follows after a space."""

# The embedded default's split (miopt.experiments.default_run.DefaultTask: 20,000 SFT + 4,800 preference problems,
# 1,000 held out, seed 0), so `miopt eval --data arithmetic` scores its model on problems it never saw.
ARITHMETIC_DEFAULTS = {"n_train": 24800, "n_heldout": 1000, "seed": 0}


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation item.

    ``prompt`` is the text given to the model (before any few-shot prefix or chat template);
    ``gold`` the reference answer (for multiple choice, the correct choice's text); ``answer_type``
    one of ``number``, ``math``, ``arithmetic``, ``exact``, or ``choice``; ``choices`` and
    ``gold_index`` are set for multiple choice; ``solution`` is a worked reference solution when
    the source has one (used for few-shot examples); ``source`` is ``FILE:LINE`` or the task name.
    """

    prompt: str
    gold: str
    answer_type: str
    choices: tuple[str, ...] | None = None
    gold_index: int | None = None
    solution: str | None = None
    source: str = ""

    @property
    def is_choice(self) -> bool:
        return self.choices is not None


def _text(record: dict[str, Any], name: str, where: str) -> str:
    if name not in record:
        raise DataError("missing", source=where, field=name)
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"expected a string, got {type(value).__name__}", source=where, field=name)
    if isinstance(value, str) and not value.strip():
        raise DataError("empty", source=where, field=name)
    return str(value)


def _gsm8k_record(record: dict[str, Any], where: str) -> EvalRecord:
    question = _text(record, "question", where)
    name = "answer" if "answer" in record else "ground_truth"
    solution = _text(record, name, where)
    gold = gsm8k_reference(solution)
    if gold is None:
        raise DataError("no final answer ('#### <number>' or 'A: <number>') found", source=where, field=name)
    return EvalRecord(
        prompt=gsm8k_prompt(question),
        gold=format_number(gold),
        answer_type="number",
        solution=solution,
        source=where,
    )


def _math_record(record: dict[str, Any], where: str) -> EvalRecord:
    problem = _text(record, "problem", where)
    solution = _text(record, "solution", where)
    gold = record.get("answer")
    if gold is None:
        gold = extract_boxed(solution)
    if gold is None or not str(gold).strip():
        raise DataError("no \\boxed{...} answer found", source=where, field="solution")
    return EvalRecord(
        prompt=f"Problem: {problem.strip()}\nSolution:\n",
        gold=str(gold),
        answer_type="math",
        solution=solution,
        source=where,
    )


def _choices(record: dict[str, Any], where: str) -> tuple[tuple[str, ...], list[str]]:
    """(choice texts, labels)."""
    raw = record["choices"]
    labels: list[str] | None = None
    if isinstance(raw, dict):
        if "text" not in raw:
            raise DataError(
                "expected a list of strings or {'text': [...], 'label': [...]}", source=where, field="choices"
            )
        labels = [str(label) for label in raw.get("label", [])] or None
        raw = raw["text"]
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(choice, str) for choice in raw):
        raise DataError("expected a list of at least two strings", source=where, field="choices")
    if labels is None or len(labels) != len(raw):
        labels = list(string.ascii_uppercase[: len(raw)])
    return tuple(raw), labels


def _gold_index(answer: Any, choices: Sequence[str], labels: Sequence[str], where: str, name: str) -> int:
    if isinstance(answer, bool):
        raise DataError(f"expected an index, a label or a choice, got {answer!r}", source=where, field=name)
    if isinstance(answer, int):
        if 0 <= answer < len(choices):
            return answer
        raise DataError(f"index {answer} outside 0..{len(choices) - 1}", source=where, field=name)
    if isinstance(answer, str):
        text = answer.strip()
        if text in labels:
            return labels.index(text)
        if text in choices:
            return list(choices).index(text)
        if text.isdigit() and int(text) < len(choices):
            return int(text)
    raise DataError(
        f"{answer!r} is neither an index, a label ({', '.join(labels)}) nor one of the choices",
        source=where,
        field=name,
    )


def _choice_record(record: dict[str, Any], where: str, prompt: str | None) -> EvalRecord:
    choices, labels = _choices(record, where)
    name = "answer" if "answer" in record else "answerKey" if "answerKey" in record else None
    if name is None:
        raise DataError("missing", source=where, field="answer")
    index = _gold_index(record[name], choices, labels, where, name)
    if prompt is None:
        prompt = CHOICE_PROMPT.format(question=_text(record, "question", where).strip())
    return EvalRecord(
        prompt=prompt,
        gold=choices[index],
        answer_type="choice",
        choices=choices,
        gold_index=index,
        source=where,
    )


def _generic_record(record: dict[str, Any], where: str) -> EvalRecord:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise DataError("expected a non-empty string", source=where, field="prompt")
    if "choices" in record:
        return _choice_record(record, where, prompt)
    gold = _text(record, "answer", where)
    answer_type = record.get("answer_type")
    if answer_type is None:
        answer_type = "number" if is_number(gold) else "math"
    if answer_type not in ANSWER_TYPES:
        raise DataError(
            f"{answer_type!r} is not one of {', '.join(ANSWER_TYPES)}", source=where, field="answer_type"
        )
    if answer_type == "number" and parse_number(gold) is None:
        raise DataError(f"{gold!r} is not a number", source=where, field="answer")
    return EvalRecord(
        prompt=prompt, gold=gold, answer_type=answer_type, solution=record.get("solution"), source=where
    )


def parse_record(record: dict[str, Any], where: str) -> EvalRecord:
    """One JSON object in any accepted format (module docstring) as an :class:`EvalRecord`."""
    if "prompt" in record:
        return _generic_record(record, where)
    if "question" in record and "choices" in record:
        return _choice_record(record, where, None)
    if "question" in record and ("answer" in record or "ground_truth" in record):
        return _gsm8k_record(record, where)
    if "problem" in record:
        return _math_record(record, where)
    if "question" in record:
        raise DataError(
            "missing (a question needs an answer, or choices and an answer)", source=where, field="answer"
        )
    fields = ", ".join(sorted(record)) or "none"
    raise DataError(
        f"unrecognised record (fields: {fields}); expected prompt+answer[+choices], question+answer "
        "(GSM8K), question+choices+answer, or problem+solution (MATH)",
        source=where,
    )


def load_jsonl_records(path: str | Path, *, limit: int | None = None) -> list[EvalRecord]:
    """Records of a JSONL file (any accepted format); at most ``limit`` of them."""
    records = []
    for number, record in read_jsonl(path):
        if limit is not None and len(records) >= limit:
            break
        records.append(parse_record(record, f"{path}:{number}"))
    if not records and limit != 0:
        raise DataError("no records", source=str(path))
    return records


def arithmetic_records(problems: Sequence[arithmetic.Problem]) -> list[EvalRecord]:
    """The built-in task's problems as records (prompt ``Q: ...=?``, answer after ``A:``)."""
    return [
        EvalRecord(
            prompt=problem.prompt,
            gold=str(problem.answer),
            answer_type="arithmetic",
            solution=problem.solution,
            source=f"arithmetic:{index}",
        )
        for index, problem in enumerate(problems)
    ]


def _arithmetic_spec(spec: str) -> dict[str, int]:
    settings = dict(ARITHMETIC_DEFAULTS)
    _, _, rest = spec.partition(":")
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, _, value = item.partition("=")
        if key not in settings or not value.strip().isdigit():
            raise DataError(
                f"bad setting {item!r}; expected arithmetic:n_train=N,n_heldout=N,seed=N", source=spec
            )
        settings[key] = int(value)
    return settings


def load_records(spec: str | Path, *, limit: int | None = None) -> list[EvalRecord]:
    """Records from a JSONL file, or from the built-in task named ``arithmetic`` (module docstring)."""
    text = str(spec)
    if text == "arithmetic" or (text.startswith("arithmetic:") and not Path(text).exists()):
        settings = _arithmetic_spec(text)
        n_heldout = settings["n_heldout"] if limit is None else min(limit, settings["n_heldout"])
        _, heldout = arithmetic.generate_splits(
            settings["n_train"], settings["n_heldout"], seed=settings["seed"]
        )
        return arithmetic_records(heldout[:n_heldout])
    return load_jsonl_records(text, limit=limit)


def few_shot_prefix(examples: Sequence[EvalRecord], separator: str = "\n\n") -> str:
    """Worked examples to put before each prompt: ``prompt + solution`` each, then ``separator``."""
    parts = []
    for example in examples:
        if example.is_choice:
            parts.append(example.prompt + continuation(example.prompt, example.gold))
        elif example.solution:
            parts.append(example.prompt + example.solution.strip())
        else:
            raise DataError(
                "a few-shot example needs a worked solution", source=example.source, field="solution"
            )
    return "".join(part + separator for part in parts)


def with_prefix(records: Sequence[EvalRecord], prefix: str) -> list[EvalRecord]:
    return [replace(record, prompt=prefix + record.prompt) for record in records]

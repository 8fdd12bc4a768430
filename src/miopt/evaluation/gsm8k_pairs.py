"""Real preference pairs from GSM8K model samples (``example_model_solutions.jsonl`` of
openai/grade-school-math: Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems").

Each record holds a ``question``, a ``ground_truth`` solution ending ``A: <number>`` and model
samples (``6b_finetuning``, ... : any field whose value is ``{"is_correct": bool, "solution": str}``).
Per question the positives are the ground truth and every sample marked correct (exact duplicates
dropped); the negatives are the samples marked incorrect. Each positive gives one preference record
``{"prompt", "chosen", "rejected"}`` whose ``rejected`` is the negative (a string) or all of them
(a list) when there are several; a question with no negative gives none. Questions are split at
random (by ``seed``) into train and held-out sets, so no question is in both; the held-out
questions are also written as a GSM8K-format evaluation file (``question``, ``answer`` ending
``#### <number>``) for ``miopt eval``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from miopt.data.sources import read_jsonl
from miopt.errors import DataError
from miopt.evaluation.answers import format_number, gsm8k_reference
from miopt.run.atomic_io import atomic_write_json, atomic_write_jsonl
from miopt.tasks.gsm8k import gsm8k_prompt

TRAIN_FILE = "pairs_train.jsonl"
HELDOUT_FILE = "pairs_heldout.jsonl"
EVAL_FILE = "heldout_eval.jsonl"
MANIFEST_FILE = "manifest.json"

_FINAL_LINE = re.compile(r"\n?[ \t]*A:[^\n]*\s*$")


def _string(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise DataError("missing", source=where, field=name)
    if not isinstance(value, str) or not value.strip():
        raise DataError("expected a non-empty string", source=where, field=name)
    return value


def _samples(record: dict[str, Any], where: str) -> list[tuple[str, bool, str]]:
    """(field, is_correct, solution) for each model sample in the record."""
    samples = []
    for name, value in record.items():
        if not isinstance(value, dict):
            continue
        if "is_correct" not in value or "solution" not in value:
            raise DataError("a model sample needs 'is_correct' and 'solution'", source=where, field=name)
        if not isinstance(value["is_correct"], bool):
            raise DataError("expected true/false", source=where, field=f"{name}.is_correct")
        if not isinstance(value["solution"], str):
            raise DataError("expected a string", source=where, field=f"{name}.solution")
        samples.append((name, value["is_correct"], value["solution"]))
    return samples


def _unique(texts: list[str]) -> list[str]:
    seen: set[str] = set()
    return [text for text in texts if text.strip() and not (text in seen or seen.add(text))]


def gsm8k_format_answer(ground_truth: str, where: str = "") -> str:
    """A solution ending ``A: <number>`` rewritten to GSM8K's own ending ``#### <number>``."""
    gold = gsm8k_reference(ground_truth)
    if gold is None:
        raise DataError(
            "no final answer ('A: <number>' or '#### <number>') found", source=where, field="ground_truth"
        )
    if "####" in ground_truth:
        return ground_truth
    return f"{_FINAL_LINE.sub('', ground_truth).rstrip()}\n#### {format_number(gold)}"


def convert_gsm8k_pairs(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, int]:
    """Write ``pairs_train.jsonl``, ``pairs_heldout.jsonl``, ``heldout_eval.jsonl`` and
    ``manifest.json`` (these counts and the settings) under ``output_dir``; returns the counts."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(
            f"held-out fraction must be in [0, 1), got {heldout_fraction}", source=str(input_path)
        )
    questions = _read_questions(input_path)
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    heldout = set(order[: round(heldout_fraction * len(questions))])
    train_indices = [index for index in range(len(questions)) if index not in heldout]
    heldout_indices = sorted(heldout)
    train_rows, heldout_rows = _pairs(questions, train_indices), _pairs(questions, heldout_indices)
    eval_rows = [
        {"question": questions[i]["question"], "answer": questions[i]["answer"]} for i in heldout_indices
    ]
    output_dir = Path(output_dir)
    atomic_write_jsonl(output_dir / TRAIN_FILE, train_rows)
    atomic_write_jsonl(output_dir / HELDOUT_FILE, heldout_rows)
    atomic_write_jsonl(output_dir / EVAL_FILE, eval_rows)
    counts = {
        "questions": len(questions),
        "train_questions": len(train_indices),
        "heldout_questions": len(heldout_indices),
        "questions_without_negatives": sum(not item["negatives"] for item in questions),
        "correct_samples": sum(item["correct_samples"] for item in questions),
        "incorrect_samples": sum(item["incorrect_samples"] for item in questions),
        "train_pairs": len(train_rows),
        "heldout_pairs": len(heldout_rows),
        "heldout_eval_records": len(eval_rows),
    }
    manifest = {
        "source": str(input_path),
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "files": {"train": TRAIN_FILE, "heldout": HELDOUT_FILE, "eval": EVAL_FILE},
        "counts": counts,
    }
    atomic_write_json(output_dir / MANIFEST_FILE, manifest)
    return counts


def _read_questions(input_path: str | Path) -> list[dict[str, Any]]:
    """Each record's question, its distinct correct (``positives``: the ground truth first) and wrong
    (``negatives``) solutions, its answer in GSM8K's format; a repeated question is an error."""
    questions: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for number, record in read_jsonl(input_path):
        where = f"{input_path}:{number}"
        question = _string(record, "question", where)
        ground_truth = _string(record, "ground_truth", where)
        if question.strip() in seen:
            raise DataError(
                f"question repeats the one at {seen[question.strip()]}", source=where, field="question"
            )
        seen[question.strip()] = where
        samples = _samples(record, where)
        positives = _unique([ground_truth] + [text for _, correct, text in samples if correct])
        negatives = _unique([text for _, correct, text in samples if not correct])
        questions.append(
            {
                "question": question,
                "positives": positives,
                "negatives": [text for text in negatives if text not in positives],
                "answer": gsm8k_format_answer(ground_truth, where),
                "correct_samples": sum(correct for _, correct, _ in samples),
                "incorrect_samples": sum(not correct for _, correct, _ in samples),
            }
        )
    if not questions:
        raise DataError("no records", source=str(input_path))
    return questions


def _pairs(questions: list[dict[str, Any]], indices: list[int]) -> list[dict[str, Any]]:
    """One row per correct solution of each question that has a wrong one: chosen the correct
    solution, rejected the wrong one (or the list of them)."""
    rows = []
    for index in indices:
        item = questions[index]
        if not item["negatives"]:
            continue
        rejected: str | list[str] = item["negatives"][0] if len(item["negatives"]) == 1 else item["negatives"]
        prompt = gsm8k_prompt(item["question"])
        rows.extend(
            {"prompt": prompt, "chosen": positive, "rejected": rejected} for positive in item["positives"]
        )
    return rows

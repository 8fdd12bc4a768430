"""Evaluate a model on records: generation tasks are completed and checked, multiple-choice tasks
scored by log-likelihood; returns a summary and one prediction row per record.

Used by ``miopt eval`` and by training code (:func:`evaluate_arithmetic` for the built-in task).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from miopt.evaluation import answers
from miopt.evaluation.choice import continuation, score_choices
from miopt.evaluation.generation import generate
from miopt.evaluation.metrics import accuracy, majority_vote, pass_at_k, wilson_interval
from miopt.evaluation.tasks import EvalRecord, arithmetic_records
from miopt.tasks.arithmetic import Problem

DEFAULT_STOPS: dict[str, list[str]] = {
    "number": ["\n\n", "\nQuestion:"],
    "math": ["\n\n\n", "\nProblem:"],
    "arithmetic": ["\n"],
    "exact": ["\n"],
}
"""Stop strings per answer type when none are given (none with a chat template: the model's
end-of-turn token ends a reply)."""


def _render(tokenizer: Any, prompt: str, chat_template: bool, system_prompt: str | None) -> str:
    if not chat_template:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; leave chat_template off")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def complete_records(
    model: Any,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    *,
    prompts: Sequence[str] | None = None,
    stop: Sequence[str] | None = None,
    **generate_options: Any,
) -> list[list[str]]:
    """Completions of each record (``generate_options`` as :func:`generate` takes them), cut at
    ``stop`` or else at the stop strings of the record's answer type (:data:`DEFAULT_STOPS`); one
    :func:`generate` call per stop list. ``prompts`` replaces the records' own prompts (rendered)."""
    prompts = [record.prompt for record in records] if prompts is None else prompts
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        stops = list(stop) if stop is not None else DEFAULT_STOPS.get(record.answer_type, [])
        groups[tuple(stops)].append(index)
    results: list[list[str]] = [[] for _ in records]
    for stops, indices in groups.items():
        outputs = generate(
            model, tokenizer, [prompts[i] for i in indices], stop=list(stops), **generate_options
        )
        for index, texts in zip(indices, outputs):
            results[index] = texts
    return results


def _interval(flags: Sequence[bool]) -> list[float]:
    low, high = wilson_interval(sum(map(bool, flags)), len(flags))
    return [low, high]


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate` completes and scores records.

    Generation records are completed (greedy when ``num_samples == 1`` and ``temperature == 0``, else
    ``num_samples`` samples each, ``top_p`` nucleus sampling, seeded by ``seed``) up to
    ``max_new_tokens``, ``batch_size`` prompts at a time; ``stop`` overrides :data:`DEFAULT_STOPS`.
    ``pass_k``: the ``k`` of ``pass@k`` with several samples (default 1 and ``num_samples``).
    ``few_shot_prefix`` is put before every prompt; ``chat_template`` wraps each (prefixed) prompt as a
    user turn, after ``system_prompt`` if given.
    """

    max_new_tokens: int = 256
    batch_size: int = 16
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] | None = None
    few_shot_prefix: str = ""
    chat_template: bool = False
    system_prompt: str | None = None
    seed: int = 0
    pass_k: Sequence[int] | None = None
    progress: bool = False

    def render(self, tokenizer: Any, prompt: str) -> str:
        """The text the model is given for ``prompt``."""
        return _render(tokenizer, self.few_shot_prefix + prompt, self.chat_template, self.system_prompt)

    def summary(self) -> dict[str, Any]:
        """The settings recorded in the summary."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop) if self.stop is not None else None,
            "few_shot_prefix_chars": len(self.few_shot_prefix),
            "chat_template": self.chat_template,
            "seed": self.seed,
        }


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    settings: EvalSettings | None = None,
    **overrides: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``model`` on ``records`` with ``settings`` (:class:`EvalSettings`; keyword arguments
    replace single fields); returns (summary, predictions).

    Generation records are completed and checked by their answer type; with several samples a
    record counts as correct when the majority-vote answer is right (self-consistency), and
    ``pass@k`` (Chen et al. 2021, eq. 1) is reported. Multiple-choice records are scored by
    log-likelihood; a record counts as correct when the raw log-likelihood picks the gold choice
    (``accuracy_norm`` reports the length-normalised choice).

    The summary holds ``accuracy`` (over all records), ``ci95`` (Wilson), ``n``, ``correct`` and
    per-kind details; each prediction row holds ``source``, ``prompt``, ``output``, ``extracted``,
    ``gold`` and ``correct`` (with several samples, ``output`` and ``sample_extracted`` /
    ``sample_correct`` are lists and ``extracted`` is the majority answer).
    """
    settings = dataclasses.replace(settings or EvalSettings(), **overrides)
    started = time.perf_counter()
    generation = [index for index, record in enumerate(records) if not record.is_choice]
    choice = [index for index, record in enumerate(records) if record.is_choice]
    rows: dict[int, dict[str, Any]] = {}
    sample_flags = _generation_rows(model, tokenizer, records, generation, settings, rows)
    _choice_rows(model, tokenizer, records, choice, settings, rows)

    predictions = [rows[index] for index in sorted(rows)]
    flags = [bool(row["correct"]) for row in predictions]
    summary: dict[str, Any] = {
        "accuracy": accuracy(flags),
        "ci95": _interval(flags),
        "ci_method": "wilson",
        "n": len(flags),
        "correct": sum(flags),
    }
    if generation:
        summary["generation"] = _generation_summary(rows, generation, sample_flags, settings)
    if choice:
        summary["choice"] = _choice_summary(rows, choice)
    summary["by_answer_type"] = _by_answer_type(records, rows)
    summary["settings"] = settings.summary()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary, predictions


def _generation_rows(
    model: Any,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    indices: list[int],
    settings: EvalSettings,
    rows: dict[int, dict[str, Any]],
) -> dict[int, list[bool]]:
    """Complete and check the generation records at ``indices`` (one ``generate()`` call per stop list),
    writing their prediction rows; returns each record's per-sample correctness."""
    stop = settings.stop
    completions = complete_records(
        model,
        tokenizer,
        [records[i] for i in indices],
        prompts=[settings.render(tokenizer, records[i].prompt) for i in indices],
        stop=stop if stop is not None else ([] if settings.chat_template else None),
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        num_samples=settings.num_samples,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        add_special_tokens=not settings.chat_template,
        progress=settings.progress,
    )
    sample_flags: dict[int, list[bool]] = {}
    for index, samples in zip(indices, completions):
        record = records[index]
        verdicts = [answers.check(record.answer_type, text, record.gold) for text in samples]
        flags = sample_flags[index] = [verdict.correct for verdict in verdicts]
        row: dict[str, Any] = {"source": record.source, "prompt": record.prompt}
        if settings.num_samples == 1:
            row.update(output=samples[0], extracted=verdicts[0].extracted, gold=record.gold, correct=flags[0])
        else:
            extracted = [verdict.extracted for verdict in verdicts]
            vote = majority_vote(
                extracted, lambda a, b, kind=record.answer_type: answers.equivalent(kind, a, b)
            )
            winner = next((flags[k] for k, value in enumerate(extracted) if value == vote), False)
            row.update(
                output=samples,
                extracted=vote,
                gold=record.gold,
                correct=bool(vote is not None and winner),
                sample_extracted=extracted,
                sample_correct=flags,
            )
        rows[index] = row
    return sample_flags


def _choice_rows(
    model: Any,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    indices: list[int],
    settings: EvalSettings,
    rows: dict[int, dict[str, Any]],
) -> None:
    """Score the multiple-choice records at ``indices`` by log-likelihood, writing their prediction rows."""
    if not indices:
        return
    items = []
    for index in indices:
        context = settings.render(tokenizer, records[index].prompt)
        items.append((context, [continuation(context, option) for option in records[index].choices or ()]))
    scores = score_choices(
        model,
        tokenizer,
        items,
        batch_size=settings.batch_size,
        add_special_tokens=not settings.chat_template,
        progress=settings.progress,
    )
    for index, score in zip(indices, scores):
        record = records[index]
        rows[index] = {
            "source": record.source,
            "prompt": record.prompt,
            "output": record.choices[score.best],
            "extracted": score.best,
            "gold": record.gold,
            "gold_index": record.gold_index,
            "correct": score.best == record.gold_index,
            "extracted_norm": score.best_normalised,
            "correct_norm": score.best_normalised == record.gold_index,
            "loglikelihoods": score.loglikelihoods,
        }


def _generation_summary(
    rows: dict[int, dict[str, Any]],
    indices: list[int],
    sample_flags: dict[int, list[bool]],
    settings: EvalSettings,
) -> dict[str, Any]:
    """Accuracy of the generation records; with several samples, majority vote and pass@k."""
    generated = [bool(rows[i]["correct"]) for i in indices]
    part: dict[str, Any] = {
        "n": len(generated),
        "accuracy": accuracy(generated),
        "ci95": _interval(generated),
    }
    n = settings.num_samples
    if n > 1:
        part["num_samples"] = n
        part["majority_vote_accuracy"] = part["accuracy"]
        for k in sorted({k for k in (settings.pass_k or (1, n)) if 0 < k <= n}):
            part[f"pass@{k}"] = sum(pass_at_k(n, sum(sample_flags[i]), k) for i in indices) / len(indices)
    return part


def _choice_summary(rows: dict[int, dict[str, Any]], indices: list[int]) -> dict[str, Any]:
    """Raw and length-normalised accuracy of the multiple-choice records."""
    raw = [bool(rows[i]["correct"]) for i in indices]
    norm = [bool(rows[i]["correct_norm"]) for i in indices]
    return {
        "n": len(raw),
        "accuracy": accuracy(raw),
        "ci95": _interval(raw),
        "accuracy_norm": accuracy(norm),
        "ci95_norm": _interval(norm),
    }


def _by_answer_type(records: Sequence[EvalRecord], rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for index, row in sorted(rows.items()):
        by_type[records[index].answer_type].append(bool(row["correct"]))
    return {kind: {"n": len(v), "accuracy": accuracy(v)} for kind, v in by_type.items()}


def evaluate_arithmetic(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    batch_size: int = 256,
    max_new_tokens: int = 48,
) -> float:
    """Greedy accuracy on built-in arithmetic problems (e.g. the held-out split of
    :func:`miopt.tasks.arithmetic.generate_splits`): each ``problem.prompt`` is completed in
    batches up to a newline or end of sequence, and the integer after ``A:`` is compared with the
    answer. The model's train/eval mode and the tokenizer's padding side are restored after."""
    if not problems:
        return 0.0
    outputs = generate(
        model,
        tokenizer,
        [problem.prompt for problem in problems],
        max_new_tokens=max_new_tokens,
        stop=["\n"],
        batch_size=batch_size,
    )
    return accuracy(
        [
            answers.check_arithmetic(texts[0], problem.answer).correct
            for texts, problem in zip(outputs, problems)
        ]
    )


__all__ = ["DEFAULT_STOPS", "EvalSettings", "arithmetic_records", "evaluate", "evaluate_arithmetic"]

"""Evaluate a model on records: generation tasks are completed and checked, multiple-choice tasks
scored by log-likelihood; returns a summary and one prediction row per record.

Used by ``miopt eval`` and by training code (:func:`evaluate_arithmetic` for the built-in task).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
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


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] | None = None,
    few_shot_prefix: str = "",
    chat_template: bool = False,
    system_prompt: str | None = None,
    seed: int = 0,
    pass_k: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``model`` on ``records``; returns (summary, predictions).

    Generation records are completed (greedy when ``num_samples == 1`` and ``temperature == 0``,
    else ``num_samples`` samples each) and checked by their answer type; with several samples a
    record counts as correct when the majority-vote answer is right (self-consistency), and
    ``pass@k`` (Chen et al. 2021, eq. 1) is reported for each ``k`` in ``pass_k`` (default 1 and
    ``num_samples``). Multiple-choice records are scored by log-likelihood; a record counts as
    correct when the raw log-likelihood picks the gold choice (``accuracy_norm`` reports the
    length-normalised choice). ``few_shot_prefix`` is put before every prompt; ``chat_template``
    wraps each (prefixed) prompt as a user turn. ``stop`` overrides :data:`DEFAULT_STOPS`.

    The summary holds ``accuracy`` (over all records), ``ci95`` (Wilson), ``n``, ``correct`` and
    per-kind details; each prediction row holds ``source``, ``prompt``, ``output``, ``extracted``,
    ``gold`` and ``correct`` (with several samples, ``output`` and ``sample_extracted`` /
    ``sample_correct`` are lists and ``extracted`` is the majority answer).
    """
    started = time.perf_counter()
    rows: list[dict[str, Any] | None] = [None] * len(records)
    add_special = not chat_template
    generation = [index for index, record in enumerate(records) if not record.is_choice]
    choice = [index for index, record in enumerate(records) if record.is_choice]

    # Generation: one generate() call per stop list (records of one answer type share one).
    completions = complete_records(
        model,
        tokenizer,
        [records[i] for i in generation],
        prompts=[
            _render(tokenizer, few_shot_prefix + records[i].prompt, chat_template, system_prompt)
            for i in generation
        ],
        stop=stop if stop is not None else ([] if chat_template else None),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        add_special_tokens=add_special,
        progress=progress,
    )
    sample_flags: dict[int, list[bool]] = {}
    for index, samples in zip(generation, completions):
        record = records[index]
        verdicts = [answers.check(record.answer_type, text, record.gold) for text in samples]
        flags = [verdict.correct for verdict in verdicts]
        sample_flags[index] = flags
        row: dict[str, Any] = {"source": record.source, "prompt": record.prompt}
        if num_samples == 1:
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

    # Multiple choice.
    if choice:
        items = []
        for index in choice:
            record = records[index]
            context = _render(tokenizer, few_shot_prefix + record.prompt, chat_template, system_prompt)
            items.append((context, [continuation(context, option) for option in record.choices or ()]))
        scores = score_choices(
            model, tokenizer, items, batch_size=batch_size, add_special_tokens=add_special, progress=progress
        )
        for index, score in zip(choice, scores):
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

    predictions = [row for row in rows if row is not None]
    flags = [bool(row["correct"]) for row in predictions]
    summary: dict[str, Any] = {
        "accuracy": accuracy(flags),
        "ci95": _interval(flags),
        "ci_method": "wilson",
        "n": len(flags),
        "correct": sum(flags),
    }
    if generation:
        generated = [bool(rows[i]["correct"]) for i in generation]
        part: dict[str, Any] = {
            "n": len(generated),
            "accuracy": accuracy(generated),
            "ci95": _interval(generated),
        }
        if num_samples > 1:
            ks = sorted({k for k in (pass_k or (1, num_samples)) if 0 < k <= num_samples})
            part["num_samples"] = num_samples
            part["majority_vote_accuracy"] = part["accuracy"]
            for k in ks:
                part[f"pass@{k}"] = sum(
                    pass_at_k(num_samples, sum(sample_flags[i]), k) for i in generation
                ) / len(generation)
        summary["generation"] = part
    if choice:
        raw = [bool(rows[i]["correct"]) for i in choice]
        norm = [bool(rows[i]["correct_norm"]) for i in choice]
        summary["choice"] = {
            "n": len(raw),
            "accuracy": accuracy(raw),
            "ci95": _interval(raw),
            "accuracy_norm": accuracy(norm),
            "ci95_norm": _interval(norm),
        }
    by_type: dict[str, list[bool]] = defaultdict(list)
    for record, row in zip(records, rows):
        if row is not None:
            by_type[record.answer_type].append(bool(row["correct"]))
    summary["by_answer_type"] = {kind: {"n": len(v), "accuracy": accuracy(v)} for kind, v in by_type.items()}
    summary["settings"] = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "stop": list(stop) if stop is not None else None,
        "few_shot_prefix_chars": len(few_shot_prefix),
        "chat_template": chat_template,
        "seed": seed,
    }
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary, predictions


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


__all__ = ["DEFAULT_STOPS", "arithmetic_records", "evaluate", "evaluate_arithmetic"]

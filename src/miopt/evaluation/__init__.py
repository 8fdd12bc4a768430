"""Evaluation harness for reasoning and math (``miopt eval``; docs/evaluation.md).

The main entry points:

* :func:`evaluate` (model, tokenizer, records) -> (summary, predictions), records from
  :func:`load_records` (JSONL in GSM8K / MATH / multiple-choice / generic format, or ``arithmetic``);
* :func:`evaluate_arithmetic` (model, tokenizer, problems) -> accuracy, fast greedy evaluation of
  the built-in task for training loops;
* :func:`generate` (batched generation with stop strings), :func:`score_choices`
  (log-likelihood multiple choice), :func:`check` (answer checking), and the metrics.
"""

from __future__ import annotations

from miopt.evaluation.answers import (
    ANSWER_TYPES,
    Verdict,
    check,
    check_arithmetic,
    check_math,
    check_number,
    extract_boxed,
    extract_number,
    gsm8k_reference,
)
from miopt.evaluation.choice import ChoiceScores, loglikelihoods, score_choices
from miopt.evaluation.generation import cut_at_stop, generate
from miopt.evaluation.metrics import accuracy, majority_vote, pass_at_k, wilson_interval
from miopt.evaluation.runner import DEFAULT_STOPS, EvalSettings, evaluate, evaluate_arithmetic
from miopt.evaluation.tasks import EvalRecord, arithmetic_records, few_shot_prefix, load_records
from miopt.tasks.gsm8k import GSM8K_PROMPT, gsm8k_prompt

__all__ = [
    "ANSWER_TYPES",
    "DEFAULT_STOPS",
    "GSM8K_PROMPT",
    "ChoiceScores",
    "EvalRecord",
    "Verdict",
    "accuracy",
    "arithmetic_records",
    "check",
    "check_arithmetic",
    "check_math",
    "check_number",
    "cut_at_stop",
    "EvalSettings",
    "evaluate",
    "evaluate_arithmetic",
    "extract_boxed",
    "extract_number",
    "few_shot_prefix",
    "generate",
    "gsm8k_prompt",
    "gsm8k_reference",
    "load_records",
    "loglikelihoods",
    "majority_vote",
    "pass_at_k",
    "score_choices",
    "wilson_interval",
]

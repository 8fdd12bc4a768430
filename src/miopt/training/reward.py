"""Reward-model training (``miopt reward``): a Bradley-Terry scorer from preference data.

The model is an ``AutoModelForSequenceClassification`` with one output (``num_labels=1``): the
score of ``prompt + response`` read at the last non-padding token. It is trained on the same
preference formats as ``miopt train`` (read and validated by :mod:`miopt.data`, tokenised by the
same truncation rule) with the Bradley-Terry loss of :mod:`miopt.objectives.bradley_terry`, by the
shared loop (:func:`miopt.run.loop.run_loop`: accumulation, schedule, checkpoints, exact resume). A
seeded held-out split (``--eval-fraction``) gives the pair accuracy in ``summary.json``. The model
is saved with ``save_pretrained`` so that ``AutoModelForSequenceClassification.from_pretrained``
(and ``miopt online --reward-model``) loads it.

``--model builtin`` builds the embedded character tokenizer and a tiny Llama sequence classifier
(:mod:`miopt.model.builtin`'s sizes); any other value is a Hugging Face folder or hub id (a causal-LM
checkpoint gets a freshly initialised score head, seeded by ``--seed``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miopt.config import option
from miopt.data import load_preference_records
from miopt.data.tokenize import TokenizedExample, collate, tokenize_preferences
from miopt.errors import OptionError
from miopt.model.loading import check_model_source
from miopt.model.modeling import unwrap
from miopt.objectives.bradley_terry import bradley_terry, pair_accuracy
from miopt.run.atomic_io import atomic_write_json
from miopt.run.engine import full_state_dict, make_accelerator
from miopt.run.loop import LoopOptions, check_loop_options, run_loop
from miopt.run.plots import plot_training_curves
from miopt.run.preemption import stop_after
from miopt.run.ranks import is_main_process
from miopt.training.preference import load_examples, save_model

BUILTIN = "builtin"


@dataclass
class RewardOptions(LoopOptions):
    """Options of ``miopt reward``."""

    model: str | None = option(
        None,
        "Base model: a Hugging Face folder or hub id, a .gguf file, or 'builtin' (the tiny embedded Llama).",
    )
    data: str | None = option(
        None, "Preference data (the formats of miopt train): JSONL/JSON/Parquet/CSV, folder or hub id."
    )
    output_dir: str = option("runs/reward", "Folder for metrics.jsonl, checkpoints, the model and summary.")
    learning_rate: float = option(1e-5, "Peak AdamW learning rate.")
    dtype: str | None = option(None, "Load weights in this dtype (float32, bfloat16, float16).")
    max_length: int = option(1024, "Max tokens of prompt + response; longer responses are cut at the end.")
    max_prompt_length: int | None = option(None, "Prompts longer than this keep their last tokens.")
    skip_invalid: bool = option(False, "Skip bad records (and say how many) instead of stopping.")
    eval_fraction: float = option(
        0.1, "Fraction of the records held out (seeded) for the pair accuracy in summary.json; 0: none."
    )
    eval_batch_size: int = option(32, "Prompts per forward pass when scoring the held-out split.")


def check_reward_options(options: RewardOptions) -> None:
    """Fail fast on values no run can use (before anything is loaded or written)."""
    check_loop_options(options)
    if not options.model:
        raise OptionError("--model is required (a model folder, hub id, .gguf file, or 'builtin')")
    check_model_source(options.model)
    if not options.data:
        raise OptionError("--data is required (preference data in a miopt train format)")
    if not 0 <= options.eval_fraction < 1:
        raise OptionError(f"--eval-fraction must be in [0, 1), got {options.eval_fraction}")
    if options.eval_batch_size < 1:
        raise OptionError("--eval-batch-size must be >= 1")
    if options.max_length < 2:
        raise OptionError("--max-length must be >= 2")


def load_reward_model(path_or_id: str, tokenizer, *, dtype: str | None = None, seed: int = 0):
    """A one-output sequence classifier: the built-in tiny Llama for ``builtin``, else
    ``AutoModelForSequenceClassification.from_pretrained(path_or_id, num_labels=1)``. New weights
    (the built-in model, a new score head) are initialised from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if path_or_id == BUILTIN:
            from transformers import LlamaForSequenceClassification

            from miopt.model.builtin import build_model

            config = build_model(tokenizer, seed=seed).config
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
        else:
            from transformers import AutoModelForSequenceClassification

            kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
            try:
                model = AutoModelForSequenceClassification.from_pretrained(path_or_id, num_labels=1, **kwargs)
            except OSError as error:
                raise OptionError(f"cannot load model {path_or_id!r}: {error}") from error
    if model.config.pad_token_id is None:  # the classifier pools at the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def sequence_scores(model, batch) -> torch.Tensor:
    """One float score per row of a :class:`~miopt.data.tokenize.SequenceBatch` ``[N]``."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return output.logits[..., 0].float()


def make_reward_step(examples: Sequence[TokenizedExample], pad_token_id: int):
    """The step function for :func:`miopt.run.loop.run_loop`: score chosen and rejected rows in one
    forward pass, then the Bradley-Terry loss and its metrics (``rewards/*`` = scores)."""

    def step(model, indices: Sequence[int]):
        device = next(unwrap(model).parameters()).device
        batch = collate([examples[i] for i in indices], pad_token_id).to(device)
        chosen, rejected = batch.split_rows(sequence_scores(model, batch))
        output = bradley_terry(chosen, rejected, batch.rejected_mask)
        return output.losses.mean(), output.metrics()

    return step


@torch.no_grad()
def heldout_pair_accuracy(
    model, examples: Sequence[TokenizedExample], pad_token_id: int, *, batch_size: int, autocast=None
) -> tuple[float, int]:
    """(pooled pair accuracy, number of comparisons) of ``model`` on ``examples``: the fraction of
    (chosen, rejected) comparisons whose chosen response scores strictly higher."""

    was_training = model.training
    model.eval()
    device = next(unwrap(model).parameters()).device
    correct, total = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id).to(device)
        with autocast() if autocast else nullcontext():
            scores = sequence_scores(model, batch)
        chosen, rejected = batch.split_rows(scores)
        mask = batch.rejected_mask
        count = int(mask.sum())
        correct += float(pair_accuracy(chosen, rejected, mask)) * count
        total += count
    model.train(was_training)
    return (correct / total if total else float("nan")), total


def split_heldout(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): a seeded permutation, the last ``fraction`` held out
    (at least one record when ``fraction > 0`` and two or more records exist)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held = round(count * fraction)
    if fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    return sorted(order[: count - held]), sorted(order[count - held :])


def train_reward(options: RewardOptions) -> dict[str, Any]:
    """Run ``miopt reward``: validate, split, train with the shared loop, evaluate, save."""
    check_reward_options(options)
    main = is_main_process()
    tokenizer, examples, load_report, token_report = load_examples(
        options, load_preference_records, tokenize_preferences, report=main
    )
    train_ids, heldout_ids = split_heldout(len(examples), options.eval_fraction, options.seed)
    train_examples = [examples[i] for i in train_ids]
    heldout = [examples[i] for i in heldout_ids]
    model = load_reward_model(options.model, tokenizer, dtype=options.dtype, seed=options.seed)
    accelerator = make_accelerator(options.bf16)
    started = time.perf_counter()
    # a signal during the held-out pass or the final save waits for them (the steps are done)
    with stop_after(accelerator, options.output_dir):
        result = run_loop(
            options,
            model=model,
            num_examples=len(train_examples),
            step_fn=make_reward_step(train_examples, tokenizer.pad_token_id),
            accelerator=accelerator,
        )
        accuracy, comparisons = float("nan"), 0
        if heldout:
            accuracy, comparisons = heldout_pair_accuracy(
                model,
                heldout,
                tokenizer.pad_token_id,
                batch_size=options.eval_batch_size,
                autocast=accelerator.autocast,
            )
        state_dict = full_state_dict(accelerator, model)
        summary: dict[str, Any] = {}
        if accelerator.is_main_process:
            save_model(model, tokenizer, options.output_dir, state_dict=state_dict)
            details = {
                "train_records": len(train_examples),
                "heldout_records": len(heldout),
                "heldout_pairs": comparisons,
                "heldout_pair_accuracy": accuracy if heldout else None,
                "seconds": round(time.perf_counter() - started, 2),
            }
            summary = _write_summary(options, result, details, load_report.skipped, token_report.truncated)
            if heldout:
                print(
                    f"held-out pair accuracy {accuracy:.3f} ({comparisons} comparisons, {len(heldout)} records)",
                    file=sys.stderr,
                )
        accelerator.wait_for_everyone()
    return summary


def _write_summary(
    options: RewardOptions, result, details: dict[str, Any], skipped: int, truncated: int
) -> dict:
    """``curves.png`` and ``summary.json`` of a finished reward-model run (main process)."""
    output_dir = Path(options.output_dir)
    plot_training_curves(result.history, output_dir / "curves.png", title="reward model (Bradley-Terry)")
    summary = {
        "kind": "reward-model",
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        **details,
        "first": result.history[0] if result.history else {},
        "final": result.history[-1] if result.history else {},
        "data": options.data,
        "skipped_records": skipped,
        "truncated_records": truncated,
        "options": dataclasses.asdict(options),
    }
    atomic_write_json(output_dir / "summary.json", summary)
    return summary


__all__ = [
    "RewardOptions",
    "check_reward_options",
    "heldout_pair_accuracy",
    "load_reward_model",
    "make_reward_step",
    "sequence_scores",
    "split_heldout",
    "train_reward",
]

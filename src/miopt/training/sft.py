"""Supervised warm-start (``miopt sft``): maximise the log-likelihood of completions given prompts.

``loss = -sum_t log pi(y_t | x, y_<t) / (number of completion tokens in the batch)``; prompt
tokens are masked out. This is how a reference model for preference training is made.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miopt.config import option
from miopt.data import load_sft_records
from miopt.data.tokenize import TokenizedExample, tokenize_examples, tokenize_sft
from miopt.errors import OptionError
from miopt.logprobs.forward import DEFAULT_CHUNK_TOKENS, sequence_logps
from miopt.logprobs.packing import make_batch
from miopt.model import loading as models
from miopt.model.modeling import unwrap
from miopt.run.atomic_io import atomic_write_json
from miopt.run.engine import full_state_dict, make_accelerator, sharded_setup
from miopt.run.loop import LoopOptions, check_loop_options, run_loop
from miopt.run.plots import plot_training_curves
from miopt.run.preemption import stop_after
from miopt.run.run_folder import RunFolder
from miopt.tasks.default import start_problems
from miopt.training.option_checks import check_model_options, check_model_sources
from miopt.training.preference import ModelOptions, apply_lora, load_examples, save_model


@dataclass
class SFTOptions(ModelOptions, LoopOptions):
    """Options of ``miopt sft``."""

    data: str | None = option(
        None,
        "Prompt/completion data (TRL prompt-completion or messages, or GSM8K "
        "question/answer): JSONL/JSON/Parquet/CSV, save_to_disk folder, or hub id; or "
        "'builtin:arithmetic': a fresh built-in arithmetic problem for every example, none held out "
        "('builtin:arithmetic-lm': the same with the question in the loss too).",
    )
    learning_rate: float = option(2e-5, "Peak AdamW learning rate.")
    logprob_chunk: int = option(
        DEFAULT_CHUNK_TOKENS, "Completion tokens per log-softmax chunk; 0 = full logits."
    )


ARITHMETIC_DATA = "builtin:arithmetic"
ARITHMETIC_LM_DATA = "builtin:arithmetic-lm"  # the same problems, the question in the loss too
ARITHMETIC_PROBLEMS = 128_000  # an epoch: 2,000 steps of batch 64, one fresh problem per example


def arithmetic_examples(options: SFTOptions, tokenizer) -> list[TokenizedExample]:
    """``--data builtin:arithmetic``: fresh worked problems, seeded by ``--seed``, disjoint from the
    built-in task's held-out, validation and preference problems
    (:func:`miopt.tasks.default.start_problems`). Always ``ARITHMETIC_PROBLEMS`` of them (later epochs
    reshuffle them), so that the data order does not depend on ``--max-steps``: with a constant
    learning rate and no warmup, a run of N steps is exactly the first N steps of a longer one."""

    if options.max_steps < 1:
        raise OptionError("--data builtin:arithmetic needs --max-steps (one fresh problem per example)")
    problems = start_problems(ARITHMETIC_PROBLEMS, options.seed)
    whole = options.data == ARITHMETIC_LM_DATA  # no prompt: every token of question and solution scored
    examples, _ = tokenize_examples(
        ["" if whole else p.prompt for p in problems],
        [(p.prompt + p.solution if whole else p.solution,) for p in problems],
        [f"{options.data}:{i}" for i in range(len(problems))],
        tokenizer,
        max_length=options.max_length,
    )
    return examples


def completion_tokens(example: TokenizedExample) -> int:
    """Completion tokens the loss scores (the first token of a completion without a prompt has no
    position to be predicted from)."""
    return len(example.chosen_ids) - (0 if example.prompt_ids else 1)


def make_sft_step(examples: Sequence[TokenizedExample], *, pad_token_id: int, chunk_tokens: int):
    """Mean completion-token NLL of a micro-batch; with ``run_loop(example_weights=completion tokens)``
    each optimizer step follows the mean over all its completion tokens, whatever the number of
    processes and micro-steps."""

    def step(model, indices: Sequence[int]):
        device = next(unwrap(model).parameters()).device
        batch = make_batch([examples[i] for i in indices], pad_token_id, "padded", model).to(device)
        result = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
        tokens = result.token_counts.sum().clamp(min=1)
        loss = -result.summed.sum() / tokens
        return loss, {"logps/completion": result.summed.detach().mean(), "tokens": tokens.detach().float()}

    return step


def sft_on_examples(
    options: SFTOptions,
    model,
    tokenizer,
    examples: list[TokenizedExample],
    *,
    save: bool = True,
    checkpoint_last: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` on tokenised prompt/completion examples; saves into ``output_dir``.
    ``checkpoint_last``: :func:`miopt.run.loop.run_loop`'s (a later, longer call continues this one)."""
    check_loop_options(options)
    if options.lora_r:
        model = apply_lora(model, options)
    accelerator = make_accelerator(options.bf16)
    chunk_tokens = sharded_setup(
        accelerator, logprob_chunk=options.logprob_chunk, merge_lora=options.merge_lora
    )
    started = time.perf_counter()
    step = make_sft_step(examples, pad_token_id=tokenizer.pad_token_id, chunk_tokens=chunk_tokens)
    with stop_after(accelerator, options.output_dir):  # a signal during the final save waits for it
        result = run_loop(
            options,
            model=model,
            num_examples=len(examples),
            step_fn=step,
            accelerator=accelerator,
            example_weights=[completion_tokens(example) for example in examples],
            checkpoint_last=checkpoint_last,
        )
        state_dict = full_state_dict(accelerator, model) if save else None
        output_dir = Path(options.output_dir)
        summary = {
            "steps": result.steps,
            "examples": len(examples),
            "seconds": round(time.perf_counter() - started, 2),
            "final": result.history[-1] if result.history else {},
            "options": dataclasses.asdict(options),
        }
        if save and accelerator.is_main_process:
            save_model(model, tokenizer, output_dir, merge_lora=options.merge_lora, state_dict=state_dict)
            plot_training_curves(result.history, output_dir / "curves.png", title="SFT")
            atomic_write_json(output_dir / "summary.json", summary)
    return summary


def sft(options: SFTOptions) -> dict[str, Any]:
    """``miopt sft`` on files: validate all records first, then train and save."""
    check_loop_options(options)
    check_model_options(options)
    if not options.model or not options.data:
        raise OptionError("miopt sft needs --model (folder, hub id or 'builtin') and --data")
    check_model_sources(options)
    with RunFolder(options) as folder:
        folder.check()
        if options.data in (ARITHMETIC_DATA, ARITHMETIC_LM_DATA):
            tokenizer = models.load_tokenizer(options.model)
            examples = arithmetic_examples(options, tokenizer)
        else:
            tokenizer, examples, _, _ = load_examples(options, load_sft_records, tokenize_sft)
        model = models.load_model(options.model, tokenizer, dtype=options.dtype, seed=options.seed)
        folder.start()
        return sft_on_examples(options, model, tokenizer, examples)

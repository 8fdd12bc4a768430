"""The embedded default: ``miopt train`` with no arguments, offline, in a few minutes on 2 CPU cores.

1. Build the tiny char-level Llama model and tokenizer locally (:mod:`miopt.builtin`) and the
   arithmetic task (:mod:`miopt.tasks.arithmetic`): train problems and 1,000 held-out problems.
2. Warm-start with a short SFT on worked solutions; the SFT model is cached for the next run.
3. Preference pairs: a correct worked solution vs. the SFT model's own wrong greedy answer to the
   same prompt (on-policy negatives: in the runs that sized this task, synthetic negatives gave neither
   objective a gain over the SFT start; measured results in docs/experiments.md).
4. Train with MIO (beta 0.5) and report held-out greedy accuracy of the SFT start and the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from miopt.checkpoint import atomic_directory, atomic_write_json, cache_lock, commit_directory
from miopt.config import Preset, resolve
from miopt.reference import default_cache_dir
from miopt.tasks import arithmetic
from miopt.train import TrainOptions, train_on_examples


@dataclass(frozen=True)
class DefaultTask:
    """Sizes of the built-in run, for 2 CPU cores (SFT about 0.2 s/step, preference about 0.3 s/step)."""

    seed: int = 0
    sft_problems: int = 20000
    preference_prompts: int = 4800
    heldout_problems: int = 1000
    sft_steps: int = 600
    sft_batch_size: int = 64
    sft_learning_rate: float = 2e-3
    sft_min_lr_ratio: float = 0.0
    max_length: int = 128
    max_new_tokens: int = 64


# Preference-stage settings of the default run: above the built-in defaults, below YAML and flags.
DEFAULT_PREFERENCE_OPTIONS = Preset(
    TrainOptions,
    objective="mio",
    beta=0.5,
    learning_rate=5e-5,
    batch_size=32,
    max_steps=100,
    warmup_ratio=0.1,
    lr_scheduler="constant",
    logging_steps=10,
    output_dir="runs/default",
    max_length=128,
)


def sft_cache_path(task: DefaultTask) -> Path:
    settings = json.dumps(dataclasses.asdict(task), sort_keys=True) + "|sft-v2"
    return default_cache_dir() / "default-sft" / hashlib.sha256(settings.encode()).hexdigest()[:16]


def warm_start(task: DefaultTask, tokenizer, problems: list[arithmetic.Problem], progress: bool) -> Path:
    """The SFT start, trained once and cached (a Hugging Face folder)."""
    final = sft_cache_path(task)
    with cache_lock(final):
        return _warm_start(task, tokenizer, problems, progress, final)


def _warm_start(
    task: DefaultTask, tokenizer, problems: list[arithmetic.Problem], progress: bool, final: Path
) -> Path:
    from miopt.builtin import build_model
    from miopt.data.tokenize import tokenize_examples
    from miopt.sft import SFTOptions, sft_on_examples

    if (final / "config.json").is_file():
        print(f"[1/4] SFT start: cached at {final}", file=sys.stderr)
        return final
    print(
        f"[1/4] SFT start: {task.sft_steps} steps on {len(problems)} worked solutions "
        "(about 2 minutes; cached for the next run)",
        file=sys.stderr,
    )
    examples, _ = tokenize_examples(
        [p.prompt for p in problems],
        [(p.solution,) for p in problems],
        [f"arithmetic:{i}" for i in range(len(problems))],
        tokenizer,
        max_length=task.max_length,
    )
    temporary = atomic_directory(final)
    options = SFTOptions(
        output_dir=str(temporary),
        max_steps=task.sft_steps,
        batch_size=task.sft_batch_size,
        learning_rate=task.sft_learning_rate,
        lr_scheduler="cosine",
        min_lr_ratio=task.sft_min_lr_ratio,
        warmup_ratio=0.05,
        logging_steps=50,
        seed=task.seed,
        progress=progress,
        max_length=task.max_length,
    )
    sft_on_examples(options, build_model(tokenizer, seed=task.seed), tokenizer, examples)
    commit_directory(temporary, final)
    return final


def on_policy_pairs(model, tokenizer, problems, task: DefaultTask, *, max_length: int, source: str):
    """Preference pairs from the problems the model gets wrong under greedy decoding: the correct
    worked solution (chosen) vs. the model's own wrong solution (rejected), tokenised."""
    from miopt.data.tokenize import tokenize_examples
    from miopt.evaluation.generation import generate

    outputs = generate(
        model, tokenizer, [p.prompt for p in problems], max_new_tokens=task.max_new_tokens, batch_size=256
    )
    wrong = [
        (p, o[0].strip()) for p, o in zip(problems, outputs) if not arithmetic.is_correct(o[0], p.answer)
    ]
    wrong = [(p, text) for p, text in wrong if text and text != p.solution]
    examples, _ = tokenize_examples(
        [p.prompt for p, _ in wrong],
        [(p.solution, text) for p, text in wrong],
        [f"{source}:{i}" for i in range(len(wrong))],
        tokenizer,
        max_length=max_length,
    )
    return examples


def run_default(
    options: TrainOptions | None = None, explicit: set[str] | None = None, task: DefaultTask | None = None
) -> dict:
    """The whole default pipeline. ``options`` come layered (``miopt train`` resolves them with
    :data:`DEFAULT_PREFERENCE_OPTIONS`; None: the preset over the built-in defaults); for options built
    by hand, ``explicit`` names the fields set, and the preset fills the others."""
    from miopt.builtin import build_tokenizer
    from miopt.evaluation import evaluate_arithmetic
    from miopt.evaluation.metrics import wilson_interval
    from miopt.models import load_model

    task = task or DefaultTask()
    if options is None:
        options = resolve(TrainOptions, preset=DEFAULT_PREFERENCE_OPTIONS)
    if explicit is not None:
        preset = {key: value for key, value in DEFAULT_PREFERENCE_OPTIONS.items() if key not in explicit}
        options = dataclasses.replace(options, **preset)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    train_problems, heldout = arithmetic.generate_splits(
        task.sft_problems + task.preference_prompts, task.heldout_problems, seed=task.seed
    )
    sft_problems, preference_problems = (
        train_problems[: task.sft_problems],
        train_problems[task.sft_problems :],
    )
    sft_dir = warm_start(task, tokenizer, sft_problems, options.progress)
    model = load_model(str(sft_dir))
    tokenizer = build_tokenizer()

    print(
        f"[2/4] held-out accuracy of the SFT start ({len(heldout)} problems) and on-policy negatives",
        file=sys.stderr,
    )
    sft_accuracy = evaluate_arithmetic(model, tokenizer, heldout)
    examples = on_policy_pairs(
        model, tokenizer, preference_problems, task, max_length=options.max_length, source="arithmetic-pairs"
    )
    print(f"      {len(examples)} pairs (correct solution vs. the model's own wrong answer)", file=sys.stderr)

    print(
        f"[3/4] preference training: {options.objective}, beta {options.beta}, lr {options.learning_rate}, "
        f"{options.max_steps} steps",
        file=sys.stderr,
    )
    options = dataclasses.replace(options, model=str(sft_dir))
    summary = train_on_examples(
        options,
        model,
        tokenizer,
        examples,
        extra_summary={"data": "builtin arithmetic (on-policy negatives)"},
    )

    print("[4/4] held-out accuracy of the result", file=sys.stderr)
    final_accuracy = evaluate_arithmetic(model, tokenizer, heldout)
    intervals = {
        name: wilson_interval(round(value * len(heldout)), len(heldout))
        for name, value in (("sft_start", sft_accuracy), ("final", final_accuracy))
    }
    summary.update(
        {
            "heldout_problems": len(heldout),
            "sft_start_accuracy": sft_accuracy,
            "final_accuracy": final_accuracy,
            "sft_start_accuracy_interval_95": intervals["sft_start"],
            "final_accuracy_interval_95": intervals["final"],
            "sft_model": str(sft_dir),
            "pairs": len(examples),
            "total_seconds": round(time.perf_counter() - started, 1),
        }
    )
    output_dir = Path(options.output_dir)
    atomic_write_json(output_dir / "summary.json", summary)
    print(
        f"\nheld-out accuracy ({len(heldout)} problems, greedy): SFT start {sft_accuracy:.1%} -> "
        f"{options.objective} {final_accuracy:.1%}"
    )
    print(
        "95% intervals (Wilson): "
        + ", ".join(f"{name} [{low:.1%}, {high:.1%}]" for name, (low, high) in intervals.items())
    )
    print(
        f"chosen log-prob change {summary['final'].get('logps/chosen_change', float('nan')):+.2f} nats, "
        f"rejected {summary['final'].get('logps/rejected_change', float('nan')):+.2f} nats"
    )
    print(
        f"outputs: {output_dir}/ (model, metrics.jsonl, curves.png, summary.json); "
        f"total {summary['total_seconds']:.0f} s"
    )
    return summary

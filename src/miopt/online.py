"""Online MIO with verifiable rewards (``miopt online``): rounds of sample -> verify -> pair -> update.

Each round

1. samples ``K`` responses per prompt from the current policy (batched, temperature, top-p);
2. scores each with a verifier (:mod:`miopt.verifiers`: the evaluation harness's answer checking,
   or a ``module:function``); a sample is *correct* when its reward is ``>= reward_threshold``;
3. builds one example per prompt: one correct sample as the chosen response and **all** incorrect
   samples as the rejected list ``[K_b]`` (masked to ``[B, K]`` by the objectives, so the listwise
   estimators see every negative). A prompt with no correct sample gives no positive -- unless
   ``inject_reference`` is on, then its reference solution is the chosen response. A prompt with
   no incorrect sample gives no contrast and is left out;
4. runs the ordinary preference training (:func:`miopt.train.train_on_examples`, hence
   :func:`miopt.loop.run_loop` and any registry objective) on those examples, with the reference
   being the starting policy or the policy at the start of the round (``reference_mode``);
5. logs the round to ``DIR/rounds.jsonl`` and commits the policy as ``DIR/round-NNN`` atomically.

Why injection (docs/theory.md section 2): RLHF's optimum ``pi* = pi_ref exp(r/beta) / Z`` only
re-weights what ``pi_ref`` samples, and on-policy positives are the policy's own correct samples:
a prompt whose answer the policy never samples correctly never yields a positive, so the policy
cannot learn it. Supplying the known-correct solution as the positive for exactly those prompts
removes that limit. This is the iterative, verifier-paired form of DPO training (Pang et al. 2024,
"Iterative Reasoning Preference Optimization", arXiv 2404.19733), with MIO as the objective.

Metrics on the sampled prompts: ``pass@1`` and ``pass@K`` by the unbiased estimator
``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code", eq. 1) with ``n = K`` samples of which ``c`` are correct.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miopt.checkpoint import atomic_directory, atomic_write_json, atomic_write_text, commit_directory
from miopt.config import option
from miopt.errors import DataError, OptionError
from miopt.evaluation.runner import complete_records
from miopt.evaluation.tasks import EvalRecord
from miopt.train import TrainOptions, check_train_options

ROUNDS_FILE = "rounds.jsonl"
RUN_FILE = "online.json"
ROUND_FILE = "round.json"
SAMPLES_FILE = "samples.jsonl"
PAIRS_FILE = "pairs.jsonl"
ROUND_PREFIX = "round-"
ARITHMETIC = "arithmetic"

# Options a resumed run must share with the run it continues (others, e.g. --rounds, may change).
RESUME_FIXED = (
    "model",
    "data",
    "samples",
    "prompts_per_round",
    "temperature",
    "top_p",
    "max_new_tokens",
    "verifier",
    "reward_threshold",
    "inject_reference",
    "reference_mode",
    "objective",
    "beta",
    "seed",
)

# Preference-stage settings on the built-in task with the built-in SFT start (as in default_run);
# any option given on the command line or in --config wins.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "objective": "mio",
    "beta": 0.5,
    "learning_rate": 5e-5,
    "batch_size": 16,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "max_length": 128,
    "logging_steps": 5,
}


@dataclass
class OnlineOptions(TrainOptions):
    """Options of ``miopt online`` (the preference-training options apply to each round's update)."""

    model: str | None = option(
        None,
        "Starting policy: a Hugging Face causal-LM folder or hub id, or 'builtin' (untrained). "
        "With --data arithmetic and no --model: the shipped start builtin:arith (as miopt train's default).",
    )
    data: str | None = option(
        ARITHMETIC,
        "Prompts with gold answers: 'arithmetic' (the built-in task's training problems) or a JSONL "
        "file in a miopt eval format (GSM8K question/answer, MATH problem/solution, prompt+answer).",
    )
    output_dir: str = option(
        "runs/online", "Folder for rounds.jsonl, round-NNN/ checkpoints and summary.json."
    )
    resume: bool = option(False, "Continue the run in --output-dir from its last complete round.")
    rounds: int = option(3, "Rounds of sample -> verify -> pair -> update.")
    samples: int = option(8, "K: responses sampled per prompt and round.")
    prompts_per_round: int = option(128, "Prompts sampled per round (taken in turn from a seeded shuffle).")
    temperature: float = option(1.0, "Sampling temperature (> 0 when --samples > 1).")
    top_p: float = option(1.0, "Nucleus sampling threshold (Holtzman et al. 2020).")
    max_new_tokens: int | None = option(
        None, "Most tokens per sampled response (default: 64 on arithmetic, 256 otherwise)."
    )
    generation_batch_size: int = option(64, "Prompts per generation batch (each holds K rows).")
    verifier: str = option(
        "builtin",
        "Reward: 'builtin' (the answer checking of miopt eval, by each record's answer type), an answer "
        "type (number, math, arithmetic, exact), or module:function called as f(prompt, completion, "
        "answer) -> bool | float.",
    )
    reward_threshold: float = option(0.5, "A sample is correct (a positive) when its reward is >= this.")
    inject_reference: bool = option(
        False,
        "When no sample of a prompt is correct, use its reference solution as the positive "
        "(docs/theory.md section 2).",
    )
    reference_mode: str = option(
        "previous",
        "Reference of each round's update: 'start' (the starting policy) or 'previous' (the policy at "
        "the start of the round, as in iterative DPO).",
        choices=["start", "previous"],
    )
    eval_data: str | None = option(
        None,
        "Held-out records for greedy pass@1 before the first and after the last round (default on "
        "arithmetic: the task's held-out split; on files: none).",
    )
    eval_limit: int = option(500, "Held-out records evaluated (0: no held-out evaluation).")
    eval_every: int = option(0, "Also evaluate after every N-th round (0: only before and after).")
    keep_rounds: int = option(0, "Round checkpoints kept (oldest removed first; 0 keeps all).")


@dataclass
class OnlineTask:
    """Training prompts (with gold answers and, where known, reference solutions) and held-out records."""

    records: list[EvalRecord]
    heldout: list[EvalRecord]
    max_new_tokens: int


@dataclass(frozen=True)
class Pair:
    """One prompt's training example: a chosen response and every incorrect sample as rejected."""

    prompt: str
    chosen: str
    rejected: tuple[str, ...]
    source: str
    injected: bool


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    injected: int = 0
    no_correct: int = 0  # prompts none of whose samples is correct
    all_correct: int = 0  # prompts with no incorrect sample (no contrast; left out)
    no_positive: int = 0  # prompts left out for want of a positive


def check_online_options(options: OnlineOptions) -> None:
    """Fail fast on values no run can use (before anything is loaded or written)."""
    check_train_options(options)
    if not options.data:
        raise OptionError("give --data: 'arithmetic' or a JSONL file of prompts with answers")
    if options.rounds < 1:
        raise OptionError(f"--rounds must be >= 1, got {options.rounds}")
    if options.samples < 1:
        raise OptionError(f"--samples must be >= 1, got {options.samples}")
    if options.samples > 1 and options.temperature <= 0:
        raise OptionError("--samples > 1 needs sampling: give --temperature above 0 (e.g. 1.0)")
    if not 0 < options.top_p <= 1:
        raise OptionError(f"--top-p must be in (0, 1], got {options.top_p}")
    if options.prompts_per_round < 1:
        raise OptionError(f"--prompts-per-round must be >= 1, got {options.prompts_per_round}")
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        raise OptionError("--max-new-tokens must be >= 1")
    if options.generation_batch_size < 1:
        raise OptionError("--generation-batch-size must be >= 1")
    if options.eval_limit < 0 or options.eval_every < 0 or options.keep_rounds < 0:
        raise OptionError("--eval-limit, --eval-every and --keep-rounds must be >= 0")
    if options.ref_model:
        raise OptionError(
            "--ref-model does not apply to online training; choose --reference-mode start|previous"
        )
    if options.lora_r and not options.merge_lora:
        raise OptionError(
            "--lora-r in online training needs --merge-lora (each round starts from a full model)"
        )
    if options.lora_r and options.reference_mode == "start" and options.reference == "on-the-fly":
        raise OptionError(
            "--reference-mode start with LoRA needs --reference precompute (on the fly, LoRA's "
            "reference is the round's base, i.e. the previous policy)"
        )


# ----------------------------------------------------------------------------------------------
# Pure parts: prompt selection, pairing, metrics


def round_prompts(pool_size: int, per_round: int, round_index: int, seed: int) -> list[int]:
    """Indices of round ``round_index``'s prompts (1-based rounds): consecutive slices of one seeded
    shuffle of the pool, wrapping around; the same on every run and after a resume."""
    if pool_size < 1:
        return []
    order = list(range(pool_size))
    random.Random(seed).shuffle(order)
    count = min(per_round, pool_size)
    start = (round_index - 1) * count
    return [order[(start + offset) % pool_size] for offset in range(count)]


def build_pairs(
    records: Sequence[EvalRecord],
    samples: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    *,
    threshold: float = 0.5,
    inject_reference: bool = False,
) -> tuple[list[Pair], PairStats]:
    """One example per prompt that has both a positive and a negative (module docstring, step 3).

    Positive: the first correct sample (``reward >= threshold``), or, when none is correct and
    ``inject_reference`` is on, the record's reference solution. Negatives: every incorrect sample.
    """
    pairs: list[Pair] = []
    stats = PairStats()
    for record, texts, scores in zip(records, samples, rewards):
        stats.prompts += 1
        if len(texts) != len(scores):
            raise ValueError(f"{record.source}: {len(texts)} samples but {len(scores)} rewards")
        correct = [score >= threshold for score in scores]
        positives = [text for text, flag in zip(texts, correct) if flag]
        negatives = tuple(text for text, flag in zip(texts, correct) if not flag)
        if not positives:
            stats.no_correct += 1
        if not negatives:
            stats.all_correct += 1
            continue
        if positives:
            chosen, injected = positives[0], False
        elif inject_reference and record.solution:
            chosen, injected = record.solution, True
        else:
            stats.no_positive += 1
            continue
        pairs.append(Pair(record.prompt, chosen, negatives, record.source, injected))
        stats.injected += injected
    stats.pairs = len(pairs)
    return pairs, stats


def sample_metrics(rewards: Sequence[Sequence[float]], threshold: float = 0.5) -> dict[str, float]:
    """pass@1 and pass@K on the sampled prompts (Chen et al. 2021, eq. 1, with ``n = k_max = K``),
    the fraction of prompts with no correct sample and the mean reward."""
    from miopt.evaluation.metrics import pass_at_k

    if not rewards:
        return {"pass@1": 0.0, "pass@K": 0.0, "no_correct_fraction": 0.0, "reward_mean": 0.0}
    counts = [(len(scores), sum(score >= threshold for score in scores)) for scores in rewards]
    flat = [score for scores in rewards for score in scores]
    return {
        "pass@1": sum(pass_at_k(n, c, 1) for n, c in counts) / len(counts),
        "pass@K": sum(pass_at_k(n, c, n) for n, c in counts) / len(counts),
        "no_correct_fraction": sum(c == 0 for _, c in counts) / len(counts),
        "reward_mean": sum(flat) / len(flat),
    }


# ----------------------------------------------------------------------------------------------
# Data, sampling, evaluation


def load_task(options: OnlineOptions) -> OnlineTask:
    """The prompt pool and held-out records of ``--data`` (and ``--eval-data``)."""
    from miopt.evaluation.tasks import arithmetic_records, load_records

    limit = options.eval_limit
    if options.data == ARITHMETIC:
        from miopt.tasks.default import DefaultTask, task_splits

        task = DefaultTask()
        splits = task_splits(task)
        # The prompts are the default run's preference prompts (the shipped start never saw them).
        pool = [
            dataclasses.replace(record, source=f"arithmetic-train:{index}")
            for index, record in enumerate(arithmetic_records(splits.preference))
        ]
        heldout = arithmetic_records(splits.heldout)[:limit]
        if options.eval_data:
            heldout = load_records(options.eval_data, limit=limit) if limit else []
        max_new_tokens = task.max_new_tokens
    else:
        if not Path(options.data).is_file():
            raise OptionError(f"--data {options.data!r}: no such file (give 'arithmetic' or a JSONL file)")
        pool = load_records(options.data)
        heldout = load_records(options.eval_data, limit=limit) if options.eval_data and limit else []
        max_new_tokens = 256
    for record in [*pool, *heldout]:
        if record.is_choice:
            raise DataError(
                "a multiple-choice record; online training needs generation records", source=record.source
            )
    return OnlineTask(pool, heldout, options.max_new_tokens or max_new_tokens)


def heldout_accuracy(
    model: Any,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    progress: bool = False,
) -> float:
    """Greedy accuracy (pass@1 of greedy decoding) on the held-out records, by the evaluation harness."""
    from miopt.evaluation.runner import evaluate

    summary, _ = evaluate(
        model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    return float(summary["accuracy"])


def _evaluate(model: Any, tokenizer: Any, task: OnlineTask, options: OnlineOptions) -> float:
    return heldout_accuracy(
        model,
        tokenizer,
        task.heldout,
        max_new_tokens=task.max_new_tokens,
        batch_size=max(options.generation_batch_size, 64),
        progress=options.progress,
    )


# ----------------------------------------------------------------------------------------------
# The run folder


def round_dir(output_dir: Path, index: int) -> Path:
    return output_dir / f"{ROUND_PREFIX}{index:03d}"


def complete_rounds(output_dir: Path) -> list[int]:
    """Indices of the committed rounds (their ``round.json`` exists), ascending."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        suffix = path.name[len(ROUND_PREFIX) :]
        if path.is_dir() and path.name.startswith(ROUND_PREFIX) and suffix.isdigit():
            if (path / ROUND_FILE).is_file():
                found.append(int(suffix))
    return sorted(found)


def _read_rows(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / ROUNDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(output_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(output_dir / ROUNDS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def _remove_stale(output_dir: Path) -> None:
    """Temporary folders of a round that was interrupted before its commit."""
    for path in output_dir.glob(f".{ROUND_PREFIX}*"):
        if path.is_dir() and (path.name.endswith(".tmp") or path.name.endswith(".old")):
            shutil.rmtree(path, ignore_errors=True)


def prepare_output(options: OnlineOptions) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """(stored run settings or None, log rows kept, last complete round or -1) for a fresh or resumed run."""
    output_dir = Path(options.output_dir)
    done = complete_rounds(output_dir)
    if output_dir.is_dir():
        _remove_stale(output_dir)
    if not options.resume:
        if done or (output_dir / ROUNDS_FILE).exists():
            raise OptionError(
                f"{output_dir} already holds an online run; pass --resume to continue it, "
                "or choose another --output-dir"
            )
        return None, [], -1
    if not (output_dir / RUN_FILE).is_file():
        raise OptionError(f"--resume: {output_dir} holds no online run ({RUN_FILE} missing)")
    stored = json.loads((output_dir / RUN_FILE).read_text())
    differing = [key for key in RESUME_FIXED if stored["options"].get(key) != getattr(options, key)]
    if differing:
        changes = ", ".join(
            f"--{key.replace('_', '-')} {stored['options'].get(key)!r} -> {getattr(options, key)!r}"
            for key in differing
        )
        raise OptionError(f"--resume: options differ from the run in {output_dir}: {changes}")
    last = done[-1] if done else -1
    rows = [row for row in _read_rows(output_dir) if row.get("round", -1) <= last]
    logged = {row["round"] for row in rows}
    for index in done:  # a round committed just before the log line was written
        if index not in logged:
            rows.append(json.loads((round_dir(output_dir, index) / ROUND_FILE).read_text()))
    rows.sort(key=lambda row: row["round"])
    return stored, rows, last


def _prune(output_dir: Path, keep: int, reference: Path | None) -> None:
    if keep <= 0:
        return
    trained = [index for index in complete_rounds(output_dir) if index > 0]
    for index in trained[:-keep]:
        path = round_dir(output_dir, index)
        if reference is None or path.resolve() != reference.resolve():
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The run


def _starting_policy(options: OnlineOptions, progress: bool) -> str:
    """``--model``, or on the built-in task the shipped start ``builtin:arith``."""
    if options.model:
        return options.model
    if options.data != ARITHMETIC:
        raise OptionError("--model is required with --data FILE (a model folder, hub id or 'builtin')")
    from miopt.models import BUILTIN_ARITH

    return BUILTIN_ARITH


def _round_train_options(
    options: OnlineOptions, output_dir: Path, policy: str, reference: str | None, round_index: int
) -> TrainOptions:
    values = {field.name: getattr(options, field.name) for field in dataclasses.fields(TrainOptions)}
    values.update(
        output_dir=str(output_dir),
        resume=None,
        model=policy,
        ref_model=reference,
        data=None,
        seed=options.seed + round_index,
    )
    return TrainOptions(**values)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_online(options: OnlineOptions) -> dict[str, Any]:
    """All rounds of ``miopt online`` (module docstring); returns the summary written to summary.json."""
    from miopt.models import load_model, load_tokenizer
    from miopt.verifiers import load_verifier

    check_online_options(options)
    verifier = load_verifier(options.verifier)
    output_dir = Path(options.output_dir)
    stored, rows, last = prepare_output(options)
    task = load_task(options)
    if not task.records:
        raise OptionError(f"--data {options.data}: no records")

    if stored is None:
        start = _starting_policy(options, options.progress)
        stored = {"start_model": start, "options": dataclasses.asdict(options)}
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / RUN_FILE, stored)
    start = stored["start_model"]
    tokenizer = load_tokenizer(start)
    if start == "builtin":
        start_dir: str = str(round_dir(output_dir, 0))
    else:
        start_dir = start
    _log(
        f"online: {options.rounds} rounds x {min(options.prompts_per_round, len(task.records))} prompts x "
        f"{options.samples} samples from {len(task.records)} ({options.data}); verifier {verifier.name!r}; "
        f"{options.objective}, beta {options.beta}; reference {options.reference_mode}; "
        f"injection {'on' if options.inject_reference else 'off'}; start {start}"
    )

    if last < 0:  # round 0: the starting policy and its held-out accuracy
        from accelerate import Accelerator

        started = time.perf_counter()
        device = Accelerator(mixed_precision="bf16" if options.bf16 else "no").device
        model = load_model(start, tokenizer, dtype=options.dtype, seed=options.seed).to(device)
        temporary = atomic_directory(round_dir(output_dir, 0))
        if start == "builtin":
            from miopt.train import save_model

            save_model(model, tokenizer, temporary)
        row: dict[str, Any] = {"round": 0, "model": start}
        if task.heldout:
            row["heldout_accuracy"] = _evaluate(model, tokenizer, task, options)
            row["heldout_n"] = len(task.heldout)
            _log(f"round 0: held-out greedy pass@1 {row['heldout_accuracy']:.3f} on {len(task.heldout)}")
        row["seconds"] = round(time.perf_counter() - started, 2)
        atomic_write_json(temporary / ROUND_FILE, row)
        commit_directory(temporary, round_dir(output_dir, 0))
        rows = [row]
        _write_rows(output_dir, rows)
        last = 0
        del model
    else:
        _log(f"resuming {output_dir} after round {last}")

    for index in range(last + 1, options.rounds + 1):
        row = run_round(options, index, task, verifier, tokenizer, start_dir)
        rows.append(row)
        _write_rows(output_dir, rows)
        _prune(
            output_dir, options.keep_rounds, Path(start_dir) if options.reference_mode == "start" else None
        )

    final_dir = round_dir(output_dir, options.rounds)
    evaluated = [row for row in rows if "heldout_accuracy" in row]
    summary = {
        "rounds": options.rounds,
        "start_model": start,
        "final_model": str(final_dir),
        "heldout_before": evaluated[0]["heldout_accuracy"] if evaluated else None,
        "heldout_after": evaluated[-1]["heldout_accuracy"] if len(evaluated) > 1 else None,
        "heldout_n": len(task.heldout),
        "rows": rows,
        "options": dataclasses.asdict(options),
    }
    atomic_write_json(output_dir / "summary.json", summary)
    return summary


def run_round(
    options: OnlineOptions, index: int, task: OnlineTask, verifier, tokenizer, start_dir: str
) -> dict[str, Any]:
    """Round ``index`` (>= 1): sample, verify, pair, update, evaluate, commit ``round-NNN``."""
    from accelerate import Accelerator

    from miopt.data.tokenize import tokenize_examples
    from miopt.logprobs import unwrap
    from miopt.models import load_model
    from miopt.train import save_model, train_on_examples

    output_dir = Path(options.output_dir)
    started = time.perf_counter()
    policy = start_dir if index == 1 else str(round_dir(output_dir, index - 1))
    reference = start_dir if options.reference_mode == "start" and index > 1 else None
    accelerator = Accelerator(mixed_precision="bf16" if options.bf16 else "no")
    model = load_model(policy, tokenizer, dtype=options.dtype, seed=options.seed).to(accelerator.device)

    records = [
        task.records[i]
        for i in round_prompts(len(task.records), options.prompts_per_round, index, options.seed)
    ]
    samples = complete_records(
        model,
        tokenizer,
        records,
        num_samples=options.samples,
        temperature=options.temperature,
        top_p=options.top_p,
        max_new_tokens=task.max_new_tokens,
        batch_size=options.generation_batch_size,
        seed=options.seed * 100_003 + index,
        progress=options.progress,
    )
    sampled = time.perf_counter()
    rewards = verifier.score(records, samples)
    pairs, stats = build_pairs(
        records,
        samples,
        rewards,
        threshold=options.reward_threshold,
        inject_reference=options.inject_reference,
    )
    row: dict[str, Any] = {"round": index, "prompts": len(records), "samples": options.samples}
    row.update(sample_metrics(rewards, options.reward_threshold))
    row.update(
        pairs=stats.pairs,
        injected=stats.injected,
        all_correct_fraction=stats.all_correct / max(stats.prompts, 1),
        no_positive=stats.no_positive,
    )

    temporary = atomic_directory(round_dir(output_dir, index))
    chosen_of = {pair.source: pair for pair in pairs}
    lines = []
    for record, texts, scores in zip(records, samples, rewards):
        pair = chosen_of.get(record.source)
        lines.append(
            {
                "source": record.source,
                "prompt": record.prompt,
                "gold": record.gold,
                "samples": texts,
                "rewards": scores,
                "positive": None if pair is None else ("reference" if pair.injected else "sample"),
            }
        )
    atomic_write_text(temporary / SAMPLES_FILE, "".join(json.dumps(line) + "\n" for line in lines))
    atomic_write_text(
        temporary / PAIRS_FILE, "".join(json.dumps(dataclasses.asdict(pair)) + "\n" for pair in pairs)
    )

    examples, report = tokenize_examples(
        [pair.prompt for pair in pairs],
        [(pair.chosen, *pair.rejected) for pair in pairs],
        [pair.source for pair in pairs],
        tokenizer,
        max_length=options.max_length,
        max_prompt_length=options.max_prompt_length,
        skip_invalid=options.skip_invalid,
    )
    if examples:
        train_options = _round_train_options(options, temporary, policy, reference, index)
        summary = train_on_examples(
            train_options,
            model,
            tokenizer,
            examples,
            accelerator=accelerator,
            extra_summary={"data": f"online round {index}", "truncated_records": report.truncated},
        )
        final = summary.get("final", {})
        row["steps"] = summary.get("steps", 0)
        for key in (
            "loss",
            "logps/chosen",
            "logps/rejected",
            "logps/chosen_change",
            "logps/rejected_change",
            "rewards/margins",
            "rewards/accuracies",
        ):
            if key in final:
                row[key] = final[key]
    else:
        _log(f"round {index}: no pairs (no prompt has both a positive and a negative); policy unchanged")
        save_model(model, tokenizer, temporary)
        row["steps"] = 0
    trained = time.perf_counter()

    evaluate_now = index == options.rounds or (options.eval_every and index % options.eval_every == 0)
    if task.heldout and evaluate_now:
        row["heldout_accuracy"] = _evaluate(unwrap(model), tokenizer, task, options)
        row["heldout_n"] = len(task.heldout)
    row["seconds_sampling"] = round(sampled - started, 2)
    row["seconds_training"] = round(trained - sampled, 2)
    row["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(temporary / ROUND_FILE, row)
    commit_directory(temporary, round_dir(output_dir, index))
    accelerator.free_memory()
    _log(describe_row(row))
    return row


def describe_row(row: dict[str, Any]) -> str:
    """One line per round for the terminal."""
    text = (
        f"round {row['round']}: pass@1 {row['pass@1']:.3f}, pass@{row['samples']} {row['pass@K']:.3f}, "
        f"no correct {row['no_correct_fraction']:.1%}, reward {row['reward_mean']:.3f}; "
        f"{row['pairs']} pairs ({row['injected']} injected), {row['steps']} steps"
    )
    if "logps/chosen" in row:
        text += f"; logps chosen {row['logps/chosen']:.2f}, rejected {row['logps/rejected']:.2f}"
    if "heldout_accuracy" in row:
        text += f"; held-out pass@1 {row['heldout_accuracy']:.3f}"
    return text + f" ({row['seconds']:.0f} s)"


__all__ = [
    "OnlineOptions",
    "OnlineTask",
    "Pair",
    "PairStats",
    "build_pairs",
    "check_online_options",
    "complete_rounds",
    "load_task",
    "round_prompts",
    "run_online",
    "run_round",
    "sample_metrics",
]

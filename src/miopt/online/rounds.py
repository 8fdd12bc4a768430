"""Online MIO with verifiable rewards (``miopt online``): rounds of sample -> verify -> pair -> update.

Each round

1. samples ``K`` responses per prompt from the current policy (batched, temperature, top-p);
2. scores each with a verifier (:mod:`miopt.online.verifiers`: the evaluation harness's answer checking,
   or a ``module:function``); a sample is *correct* when its reward is ``>= reward_threshold``;
   and/or with a reward model (``--reward-model``, :mod:`miopt.online.scoring`), batched on the
   policy's device;
3. builds one example per prompt: one correct sample as the chosen response and **all** incorrect
   samples as the rejected list ``[K_b]`` (masked to ``[B, K]`` by the objectives, so the listwise
   estimators see every negative). A prompt with no correct sample gives no positive -- unless
   ``inject_reference`` is on, then its reference solution is the chosen response. A prompt with
   no incorrect sample gives no contrast and is left out. With a reward model the pairs come from
   the scores instead: the best-scored sample against those more than ``--score-margin`` below it,
   the verifier (if any) gating which samples may be chosen (:mod:`miopt.online.pairs`);
4. runs the ordinary preference training (:func:`miopt.training.preference.train_on_examples`, hence
   :func:`miopt.run.loop.run_loop` and any registry objective) on those examples, with the reference
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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miopt.data.tokenize import tokenize_examples
from miopt.errors import DataError, OptionError
from miopt.evaluation.runner import complete_records, evaluate
from miopt.evaluation.tasks import EvalRecord, arithmetic_records, load_records
from miopt.model.loading import BUILTIN_ARITH, load_model, load_tokenizer
from miopt.model.modeling import unwrap
from miopt.online.options import (
    ARITHMETIC,
    BUILTIN_DEFAULTS,
    NO_VERIFIER,
    RESUME_FIXED,
    OnlineOptions,
    check_online_options,
)
from miopt.online.output import (
    ROUND_FILE,
    RUN_FILE,
    complete_rounds,
    describe_row,
    prepare_output,
    prune,
    round_dir,
    write_round_files,
    write_rows,
)
from miopt.online.pairs import (
    Pair,
    PairStats,
    build_pairs,
    build_pairs_by_score,
    round_prompts,
    sample_metrics,
    score_distribution,
)
from miopt.online.scoring import RoundScorer, RoundScores, pair_round
from miopt.online.verifiers import load_verifier
from miopt.run.atomic_io import atomic_directory, atomic_write_json, commit_directory
from miopt.run.engine import make_accelerator
from miopt.run.run_folder import check_output_dir, lock_output_dir
from miopt.training.preference import TrainOptions, save_model, train_on_examples

# Final training metrics copied into each round's row.
ROUND_METRICS = (
    "loss",
    "logps/chosen",
    "logps/rejected",
    "logps/chosen_change",
    "logps/rejected_change",
    "rewards/margins",
    "rewards/accuracies",
)


@dataclass
class OnlineTask:
    """Training prompts (with gold answers and, where known, reference solutions) and held-out records."""

    records: list[EvalRecord]
    heldout: list[EvalRecord]
    max_new_tokens: int


# ----------------------------------------------------------------------------------------------
# Data, sampling, evaluation


def load_task(options: OnlineOptions) -> OnlineTask:
    """The prompt pool and held-out records of ``--data`` (and ``--eval-data``)."""

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
# The run


def _starting_policy(options: OnlineOptions, progress: bool) -> str:
    """``--model``, or on the built-in task the shipped start ``builtin:arith``."""
    if options.model:
        return options.model
    if options.data != ARITHMETIC:
        raise OptionError("--model is required with --data FILE (a model folder, hub id or 'builtin')")

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


def make_scorer(options: OnlineOptions, device: Any) -> RoundScorer:
    """The verifier (unless ``--verifier none``) and the reward model (with ``--reward-model``)."""

    verifier = None if options.verifier == NO_VERIFIER else load_verifier(options.verifier)
    reward_model = None
    if options.reward_model:
        from miopt.online.scoring import RewardModelScorer

        reward_model = RewardModelScorer(
            options.reward_model,
            device=device,
            batch_size=options.reward_batch_size,
            max_length=options.max_length,
        )
    return RoundScorer(verifier, reward_model)


def run_online(options: OnlineOptions) -> dict[str, Any]:
    """All rounds of ``miopt online`` (module docstring); returns the summary written to summary.json."""

    check_online_options(options)
    if options.verifier != NO_VERIFIER:
        load_verifier(options.verifier)  # a bad spec fails before anything is loaded or written
    output_dir = Path(options.output_dir)
    check_output_dir(output_dir)
    lock = lock_output_dir(output_dir) if output_dir.is_dir() else None  # one process per folder
    stored, rows, last = prepare_output(options)
    task = load_task(options)
    if not task.records:
        raise OptionError(f"--data {options.data}: no records")

    if stored is None:
        start = _starting_policy(options, options.progress)
        stored = {"start_model": start, "options": dataclasses.asdict(options)}
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = lock or lock_output_dir(output_dir)
        atomic_write_json(output_dir / RUN_FILE, stored)
    start = stored["start_model"]
    tokenizer = load_tokenizer(start)
    start_dir = str(round_dir(output_dir, 0)) if start == "builtin" else start
    scorer = make_scorer(options, make_accelerator(options.bf16).device)
    _log(
        f"online: {options.rounds} rounds x {min(options.prompts_per_round, len(task.records))} prompts x "
        f"{options.samples} samples from {len(task.records)} ({options.data}); {scorer.name}; "
        f"{options.objective}, beta {options.beta}; reference {options.reference_mode}; "
        f"injection {'on' if options.inject_reference else 'off'}; start {start}"
    )
    if last < 0:
        rows, last = [start_round(options, task, tokenizer, start)], 0
        write_rows(output_dir, rows)
    else:
        _log(f"resuming {output_dir} after round {last}")

    for index in range(last + 1, options.rounds + 1):
        rows.append(run_round(options, index, task, scorer, tokenizer, start_dir))
        write_rows(output_dir, rows)
        prune(output_dir, options.keep_rounds, Path(start_dir) if options.reference_mode == "start" else None)

    evaluated = [row for row in rows if "heldout_accuracy" in row]
    summary = {
        "rounds": options.rounds,
        "start_model": start,
        "final_model": str(round_dir(output_dir, options.rounds)),
        "heldout_before": evaluated[0]["heldout_accuracy"] if evaluated else None,
        "heldout_after": evaluated[-1]["heldout_accuracy"] if len(evaluated) > 1 else None,
        "heldout_n": len(task.heldout),
        "rows": rows,
        "options": dataclasses.asdict(options),
    }
    atomic_write_json(output_dir / "summary.json", summary)
    return summary


def start_round(options: OnlineOptions, task: OnlineTask, tokenizer, start: str) -> dict[str, Any]:
    """Round 0: the starting policy (saved when built in) and its held-out accuracy."""

    output_dir = Path(options.output_dir)
    started = time.perf_counter()
    device = make_accelerator(options.bf16).device
    model = load_model(start, tokenizer, dtype=options.dtype, seed=options.seed).to(device)
    temporary = atomic_directory(round_dir(output_dir, 0))
    if start == "builtin":
        from miopt.training.preference import save_model

        save_model(model, tokenizer, temporary)
    row: dict[str, Any] = {"round": 0, "model": start}
    if task.heldout:
        row["heldout_accuracy"] = _evaluate(model, tokenizer, task, options)
        row["heldout_n"] = len(task.heldout)
        _log(f"round 0: held-out greedy pass@1 {row['heldout_accuracy']:.3f} on {len(task.heldout)}")
    row["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(temporary / ROUND_FILE, row)
    commit_directory(temporary, round_dir(output_dir, 0))
    return row


def sample_round(
    model, tokenizer, task: OnlineTask, options: OnlineOptions, index: int
) -> tuple[list[EvalRecord], list[list[str]]]:
    """Step 1: round ``index``'s prompts and ``K`` sampled completions of each."""
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
    return records, samples


def score_row(
    index: int, records, options: OnlineOptions, scored: RoundScores, stats: PairStats
) -> dict[str, Any]:
    """Step 2's log: sample metrics of the verifier, the reward model's score distribution, pairing."""
    row: dict[str, Any] = {"round": index, "prompts": len(records), "samples": options.samples}
    if scored.rewards is not None:
        row.update(sample_metrics(scored.rewards, options.reward_threshold))
    if scored.scores is not None:
        row.update(score_distribution(scored.scores))
    row.update(
        pairs=stats.pairs,
        injected=stats.injected,
        all_correct_fraction=stats.all_correct / max(stats.prompts, 1),
        no_positive=stats.no_positive,
    )
    return row


def update_policy(
    options: OnlineOptions,
    index: int,
    model,
    tokenizer,
    pairs: Sequence[Pair],
    train_options: TrainOptions,
    accelerator,
) -> dict[str, Any]:
    """Step 3: preference training on the round's pairs with ``train_options`` (its ``output_dir``: the
    round's folder; :func:`_round_train_options`); returns the row's training part."""
    folder = Path(train_options.output_dir)

    examples, report = tokenize_examples(
        [pair.prompt for pair in pairs],
        [(pair.chosen, *pair.rejected) for pair in pairs],
        [pair.source for pair in pairs],
        tokenizer,
        max_length=options.max_length,
        max_prompt_length=options.max_prompt_length,
        skip_invalid=options.skip_invalid,
    )
    if not examples:
        _log(f"round {index}: no pairs (no prompt has both a positive and a negative); policy unchanged")
        save_model(model, tokenizer, folder)
        return {"steps": 0}
    summary = train_on_examples(
        train_options,
        model,
        tokenizer,
        examples,
        accelerator=accelerator,
        extra_summary={"data": f"online round {index}", "truncated_records": report.truncated},
    )
    final = summary.get("final", {})
    return {"steps": summary.get("steps", 0), **{key: final[key] for key in ROUND_METRICS if key in final}}


def run_round(
    options: OnlineOptions, index: int, task: OnlineTask, scorer: RoundScorer, tokenizer, start_dir: str
) -> dict[str, Any]:
    """Round ``index`` (>= 1): sample, score and pair, write, update, evaluate, commit ``round-NNN``."""

    output_dir = Path(options.output_dir)
    started = time.perf_counter()
    policy = start_dir if index == 1 else str(round_dir(output_dir, index - 1))
    reference = start_dir if options.reference_mode == "start" and index > 1 else None
    accelerator = make_accelerator(options.bf16)
    model = load_model(policy, tokenizer, dtype=options.dtype, seed=options.seed).to(accelerator.device)

    records, samples = sample_round(model, tokenizer, task, options, index)
    sampled = time.perf_counter()
    scored = scorer.score(records, samples)
    pairs, stats = pair_round(
        records,
        samples,
        scored,
        threshold=options.reward_threshold,
        margin=options.score_margin,
        inject_reference=options.inject_reference,
    )
    row = score_row(index, records, options, scored, stats)
    temporary = atomic_directory(round_dir(output_dir, index))
    write_round_files(temporary, records, samples, scored.rewards, scored.scores, pairs)
    row.update(
        update_policy(
            options,
            index,
            model,
            tokenizer,
            pairs,
            _round_train_options(options, temporary, policy, reference, index),
            accelerator,
        )
    )
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


__all__ = [
    "ARITHMETIC",
    "BUILTIN_DEFAULTS",
    "RESUME_FIXED",
    "OnlineOptions",
    "OnlineTask",
    "Pair",
    "PairStats",
    "build_pairs",
    "build_pairs_by_score",
    "check_online_options",
    "complete_rounds",
    "load_task",
    "round_prompts",
    "run_online",
    "run_round",
    "sample_metrics",
    "score_distribution",
]

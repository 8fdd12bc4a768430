"""``miopt compare``'s runs: one objective and seed from the shared start, and the whole comparison."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from miopt.checkpoint import atomic_write_json, list_checkpoints
from miopt.compare.options import (
    DEFAULT_OBJECTIVES,
    CompareOptions,
    check_compare_options,
    preset_from_options,
)
from miopt.compare.plots import PLOTS, plot_quantity
from miopt.compare.presets import Prepared
from miopt.compare.table import (
    CURVE_KEYS,
    RESULT_FILE,
    RUNS_DIR,
    START_FILE,
    TABLE_JSON,
    TABLE_MD,
    aggregate,
    columns_for,
    finite_json,
    machine_info,
    write_markdown,
)
from miopt.errors import OptionError


@torch.no_grad()
def pair_metrics(model, tokenizer, examples, reference, *, batch_size: int = 64) -> dict[str, float]:
    """Pair accuracy and chosen/rejected log-prob change against ``reference`` over ``examples``."""
    from miopt.reference import compute_reference_logps

    if not examples:
        nan = float("nan")
        return {"pair_accuracy": nan, "heldout_chosen_change": nan, "heldout_rejected_change": nan}
    policy = compute_reference_logps(
        model, examples, tokenizer.pad_token_id, batch_size=batch_size, progress=False
    )
    counts = torch.tensor([len(e.rejected_ids) for e in examples])
    mask = torch.arange(policy.rejected.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    chosen = policy.chosen - reference.chosen
    rejected = (policy.rejected - reference.rejected) * mask
    beaten = ((chosen.unsqueeze(1) > rejected) & mask).sum(1) / counts
    return {
        "pair_accuracy": float(beaten.mean()),
        "heldout_chosen_change": float(chosen.mean()),
        "heldout_rejected_change": float((rejected.sum(1) / counts).mean()),
    }


def _read_metrics(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_summary(history: Sequence[dict[str, float]]) -> dict[str, Any]:
    """End-of-training values and the lowest chosen change (the start, step 0 and change 0, included)."""
    last = history[-1]
    points = [(0, 0.0)] + [(int(row["step"]), row["logps/chosen_change"]) for row in history]
    low_step, low = min(points, key=lambda point: point[1])
    return {
        "train_pair_accuracy": last["rewards/accuracies"],
        "chosen_change": last["logps/chosen_change"],
        "rejected_change": last["logps/rejected_change"],
        "chosen_change_min": low,
        "chosen_change_min_step": low_step,
        "curves": {
            "step": [int(row["step"]) for row in history],
            **{key: [row.get(key, float("nan")) for row in history] for key in CURVE_KEYS},
        },
    }


def run_key(preset, objective: str, seed: int, preference: dict[str, Any], sft_dir: Path | str) -> str:
    from miopt.models import model_fingerprint

    start = [str(sft_dir), model_fingerprint(str(sft_dir))]
    text = json.dumps([repr(preset), objective, seed, sorted(preference.items()), start], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_one(
    prepared: Prepared,
    heldout_reference,
    objective: str,
    seed: int,
    run_dir: Path,
    *,
    key: str,
    progress: bool,
    resume: bool = True,
) -> dict[str, Any]:
    """Train one objective with one seed from a freshly loaded SFT start; evaluate; write the result.
    ``resume``: a run stopped part-way (preempted, killed) continues from its newest checkpoint."""
    from miopt.models import load_model
    from miopt.train import TrainOptions, train_on_examples

    started = time.perf_counter()
    resuming = resume and run_dir.is_dir() and bool(list_checkpoints(run_dir))
    options = TrainOptions(
        **prepared.preference,
        objective=objective,
        seed=seed,
        output_dir=str(run_dir),
        model=str(prepared.sft_dir),
        progress=progress,
        resume="latest" if resuming else None,
    )
    model = load_model(str(prepared.sft_dir))
    train_on_examples(
        options, model, prepared.tokenizer, prepared.examples, extra_summary={"compare_seed": seed}
    )
    history = _read_metrics(run_dir / "metrics.jsonl")
    final_accuracy = prepared.evaluate(model)
    result = {
        "objective": objective,
        "seed": seed,
        "key": key,
        "final_accuracy": final_accuracy,
        **(prepared.sample(model) if prepared.sample else {}),
        **pair_metrics(model, prepared.tokenizer, prepared.heldout_pairs, heldout_reference),
        **curve_summary(history),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(run_dir / RESULT_FILE, result)
    for checkpoint in list_checkpoints(run_dir):  # the run is complete: its resume points are not needed
        shutil.rmtree(checkpoint, ignore_errors=True)
    return result


def evaluate_start(prepared: Prepared, preset, output_dir: Path) -> tuple[dict[str, float], Any]:
    """The SFT start's accuracy (and pass@k where the preset samples), and the start model; kept in
    ``START_FILE`` and reused by a later invocation on the same start and preset."""
    from miopt.models import load_model

    key = run_key(preset, "start", 0, prepared.preference, prepared.sft_dir)
    path = output_dir / START_FILE
    model = load_model(str(prepared.sft_dir))
    if path.is_file() and (previous := json.loads(path.read_text())).get("key") == key:
        return previous["start"], model
    start = {"accuracy": prepared.evaluate(model), **(prepared.sample(model) if prepared.sample else {})}
    atomic_write_json(path, {"key": key, "start": start})
    return start, model


def run_compare(options: CompareOptions, preset=None) -> dict[str, Any]:
    """Prepare the shared start, train every objective for every seed, aggregate and write.
    ``preset`` replaces the one named by ``options.preset`` (tests pass smaller ones)."""
    check_compare_options(options)
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    preset = preset if preset is not None else preset_from_options(options)
    objectives = list(options.objectives or getattr(preset, "objectives", DEFAULT_OBJECTIVES))
    try:
        return _run_compare(dataclasses.replace(options, objectives=objectives), preset)
    finally:
        torch.set_num_threads(threads)


def _run_compare(options: CompareOptions, preset) -> dict[str, Any]:
    from miopt.reference import compute_reference_logps

    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared = preset.prepare(output_dir, options.progress)
    if not prepared.examples:
        raise OptionError("no preference pairs: the SFT start left nothing to contrast")
    start, sft_model = evaluate_start(prepared, preset, output_dir)
    sft_accuracy = start["accuracy"]
    heldout_reference = (
        compute_reference_logps(
            sft_model, prepared.heldout_pairs, prepared.tokenizer.pad_token_id, batch_size=64, progress=False
        )
        if prepared.heldout_pairs
        else None
    )
    del sft_model
    prepare_seconds = time.perf_counter() - started
    print(
        f"[compare] SFT start {prepared.sft_dir}: held-out accuracy {sft_accuracy:.1%}; "
        f"{len(prepared.examples)} training pairs, {len(prepared.heldout_pairs)} held-out pairs "
        f"({prepare_seconds:.0f} s)",
        file=sys.stderr,
    )

    seeds = list(range(options.seeds or preset.seeds))
    plan = [(objective, seed) for seed in seeds for objective in options.objectives]
    results = []
    run_started = time.perf_counter()
    trained = 0
    for index, (objective, seed) in enumerate(plan, 1):
        run_dir = output_dir / RUNS_DIR / f"{objective}-seed{seed}"
        key = run_key(preset, objective, seed, prepared.preference, prepared.sft_dir)
        result_path = run_dir / RESULT_FILE
        if not options.rerun and result_path.is_file():
            previous = json.loads(result_path.read_text())
            if previous.get("key") == key:
                print(f"[compare] run {index}/{len(plan)}: {objective}, seed {seed}: done before, reused",
                      file=sys.stderr)  # fmt: skip
                results.append({**previous, "sft_accuracy": sft_accuracy})
                continue
        eta = ""
        if trained:
            left = len(plan) - index + 1
            eta = f"; about {(time.perf_counter() - run_started) / trained * left / 60:.0f} min left"
        print(f"[compare] run {index}/{len(plan)}: {objective}, seed {seed}{eta}", file=sys.stderr)
        result = run_one(
            prepared,
            heldout_reference,
            objective,
            seed,
            run_dir,
            key=key,
            progress=options.progress,
            resume=not options.rerun,
        )
        trained += 1
        print(
            f"[compare] run {index}/{len(plan)}: {objective}, seed {seed}: held-out accuracy "
            f"{result['final_accuracy']:.1%} (SFT start {sft_accuracy:.1%}), chosen change "
            f"{result['chosen_change']:+.2f}, rejected change {result['rejected_change']:+.2f} nats "
            f"({result['seconds']:.0f} s)",
            file=sys.stderr,
        )
        results.append({**result, "sft_accuracy": sft_accuracy})

    rows = aggregate(results, options.objectives, sft_accuracy, prepared.info.get("heldout_problems"))
    table = {
        "start": start,
        "settings": {
            "preset": preset.name,
            "preset_repr": repr(preset),
            "objectives": list(options.objectives),
            "seeds": seeds,
            "seed_changes": "the preference stage's data order only (same SFT start, pairs, evaluation)",
            "preference": prepared.preference,
            "sft_model": str(prepared.sft_dir),
        },
        "info": prepared.info,
        "columns": [
            {"key": key, "header": header, "format": kind, "meaning": meaning}
            for key, header, kind, meaning in columns_for(results)
        ],
        "rows": rows,
        "runs": [{k: v for k, v in r.items() if k != "curves"} for r in results],
        "machine": machine_info(),
        "prepare_seconds": round(prepare_seconds, 1),
        "runs_seconds": round(sum(r["seconds"] for r in results), 1),
        "reused_runs": len(results) - trained,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    subtitle = (
        f"{preset.name}: {', '.join(options.objectives)}; beta {prepared.preference.get('beta')}, "
        f"lr {prepared.preference.get('learning_rate')}, {prepared.preference.get('max_steps')} steps"
    )
    for quantity, name in PLOTS.items():
        plot_quantity(results, options.objectives, quantity, output_dir / name, subtitle)
    atomic_write_json(output_dir / TABLE_JSON, finite_json(table))
    write_markdown(output_dir / TABLE_MD, table)
    return table

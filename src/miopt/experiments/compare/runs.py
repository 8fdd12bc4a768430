"""``miopt compare``'s runs: one objective and seed from the shared start, and the whole comparison."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miopt.errors import OptionError
from miopt.experiments.compare.options import (
    DEFAULT_OBJECTIVES,
    CompareOptions,
    check_compare_options,
    preset_from_options,
)
from miopt.experiments.compare.plots import PLOTS, plot_quantity
from miopt.experiments.compare.presets import Prepared
from miopt.experiments.compare.selection import (
    SELECTION_FILE,
    Candidate,
    apply_candidate,
    candidate_tag,
    select_settings,
)
from miopt.experiments.compare.table import (
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
from miopt.logprobs.reference import compute_reference_logps
from miopt.model.loading import load_model, model_fingerprint
from miopt.run.atomic_io import atomic_write_json
from miopt.run.checkpoint import list_checkpoints
from miopt.run.metrics_sink import METRICS_FILE, read_metrics
from miopt.training.preference import TrainOptions, train_on_examples

TRAINED_FILE = "trained.json"  # a run whose training finished: its key and training seconds
VALIDATION_FILE = "validation.json"  # a selection run's validation accuracy


@torch.no_grad()
def pair_metrics(model, tokenizer, examples, reference, *, batch_size: int = 64) -> dict[str, float]:
    """Pair accuracy and chosen/rejected log-prob change against ``reference`` over ``examples``."""

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

    start = [str(sft_dir), model_fingerprint(str(sft_dir))]
    text = json.dumps([repr(preset), objective, seed, sorted(preference.items()), start], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: an objective, a seed and its preference options, in its own folder."""

    objective: str
    seed: int
    preference: dict[str, Any]
    run_dir: Path
    key: str


def trained_model(prepared: Prepared, spec: RunSpec, *, progress: bool, resume: bool = True):
    """The run's final model: trained from a freshly loaded SFT start, or read back from the run folder
    where an earlier invocation finished training it (its :data:`TRAINED_FILE` has the run's key).
    ``resume``: a run stopped part-way (preempted, killed) continues from its newest checkpoint.
    Returns the model and the training's wall seconds."""

    marker = spec.run_dir / TRAINED_FILE
    if resume and marker.is_file() and (done := json.loads(marker.read_text())).get("key") == spec.key:
        return load_model(str(spec.run_dir)), done["seconds"]
    started = time.perf_counter()
    resuming = resume and spec.run_dir.is_dir() and bool(list_checkpoints(spec.run_dir))
    options = TrainOptions(
        **spec.preference,
        objective=spec.objective,
        seed=spec.seed,
        output_dir=str(spec.run_dir),
        model=str(prepared.sft_dir),
        progress=progress,
        resume="latest" if resuming else None,
    )
    model = load_model(str(prepared.sft_dir))
    train_on_examples(
        options, model, prepared.tokenizer, prepared.examples, extra_summary={"compare_seed": spec.seed}
    )
    seconds = round(time.perf_counter() - started, 1)
    atomic_write_json(marker, {"key": spec.key, "seconds": seconds})
    for checkpoint in list_checkpoints(spec.run_dir):  # the final model is saved: resume points go
        shutil.rmtree(checkpoint, ignore_errors=True)
    return model, seconds


def run_one(
    prepared: Prepared, heldout_reference, spec: RunSpec, *, progress: bool, resume: bool = True
) -> dict[str, Any]:
    """Train one run (or read back its trained model), evaluate it, write its result."""
    model, train_seconds = trained_model(prepared, spec, progress=progress, resume=resume)
    started = time.perf_counter()
    history = read_metrics(spec.run_dir / METRICS_FILE)
    result = {
        "objective": spec.objective,
        "seed": spec.seed,
        "key": spec.key,
        "settings": {k: spec.preference[k] for k in ("learning_rate", "beta") if k in spec.preference},
        "final_accuracy": prepared.evaluate(model),
        **(prepared.sample(model) if prepared.sample else {}),
        **pair_metrics(model, prepared.tokenizer, prepared.heldout_pairs, heldout_reference),
        **curve_summary(history),
        "seconds": round(train_seconds + time.perf_counter() - started, 1),
    }
    atomic_write_json(spec.run_dir / RESULT_FILE, result)
    return result


def validation_score(prepared: Prepared, spec: RunSpec, *, progress: bool) -> float:
    """Validation accuracy of the run's final model (kept in the run folder, keyed by the run)."""
    path = spec.run_dir / VALIDATION_FILE
    if path.is_file() and (saved := json.loads(path.read_text())).get("key") == spec.key:
        return saved["validation_accuracy"]
    model, _ = trained_model(prepared, spec, progress=progress)
    accuracy = prepared.validate(model)
    atomic_write_json(path, {"key": spec.key, "validation_accuracy": accuracy})
    return accuracy


def evaluate_start(prepared: Prepared, preset, output_dir: Path) -> tuple[dict[str, float], Any]:
    """The SFT start's accuracy (and pass@k where the preset samples), and the start model; kept in
    ``START_FILE`` and reused by a later invocation on the same start and preset."""

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
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared, start, heldout_reference = _prepare(options, preset, output_dir)
    prepare_seconds = time.perf_counter() - started
    print(
        f"[compare] SFT start {prepared.sft_dir}: held-out accuracy {start['accuracy']:.1%}; "
        f"{len(prepared.examples)} training pairs, {len(prepared.heldout_pairs)} held-out pairs "
        f"({prepare_seconds:.0f} s)",
        file=sys.stderr,
    )
    chosen, selection = _choose_settings(options, preset, prepared, output_dir)
    seeds = list(range(options.seeds or preset.seeds))
    plan = [
        _spec(options, preset, prepared, objective, seed, chosen)
        for seed in seeds
        for objective in options.objectives
    ]
    results, trained = _train_all(options, prepared, heldout_reference, plan, start["accuracy"])
    rows = aggregate(results, options.objectives, start["accuracy"], prepared.info.get("heldout_problems"))
    table = {
        "start": start,
        "settings": {
            "preset": preset.name,
            "preset_repr": repr(preset),
            "objectives": list(options.objectives),
            "seeds": seeds,
            "seed_changes": "the preference stage's data order only (same SFT start, pairs, evaluation)",
            "preference": prepared.preference,
            "chosen_settings": {objective: dict(candidate) for objective, candidate in chosen.items()},
            "selection": selection,
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
    _write_outputs(output_dir, table, results, options.objectives, prepared.preference, preset.name)
    return table


def _prepare(options: CompareOptions, preset, output_dir: Path):
    """The shared start, its evaluation, and the start's log-probs of the held-out pairs."""

    prepared = preset.prepare(output_dir, options.progress)
    if not prepared.examples:
        raise OptionError("no preference pairs: the SFT start left nothing to contrast")
    start, sft_model = evaluate_start(prepared, preset, output_dir)
    heldout_reference = (
        compute_reference_logps(
            sft_model, prepared.heldout_pairs, prepared.tokenizer.pad_token_id, batch_size=64, progress=False
        )
        if prepared.heldout_pairs
        else None
    )
    return prepared, start, heldout_reference


def _grid(options: CompareOptions, preset, prepared: Prepared) -> tuple[Candidate, ...]:
    """The candidates to choose among: the preset's grid where selection is on and the preset can
    score the validation split; otherwise none (every arm uses the shared options)."""
    if not options.select_settings or prepared.validate is None:
        return ()
    return tuple(getattr(preset, "settings_grid", ()))


def _spec(options, preset, prepared: Prepared, objective: str, seed: int, chosen: dict) -> RunSpec:
    candidate = chosen.get(objective)
    preference = apply_candidate(prepared.preference, candidate or ())
    name = (
        f"{objective}-{candidate_tag(candidate)}-seed{seed}"
        if candidate is not None
        else f"{objective}-seed{seed}"
    )
    key = run_key(preset, objective, seed, preference, prepared.sft_dir)
    return RunSpec(objective, seed, preference, Path(options.output_dir) / RUNS_DIR / name, key)


def _choose_settings(options: CompareOptions, preset, prepared: Prepared, output_dir: Path):
    """Each arm's candidate (:mod:`miopt.experiments.compare.selection`), or ``{}`` where there is no grid."""
    grid = _grid(options, preset, prepared)
    if not grid:
        return {}, None
    if options.rerun:  # a rerun trains the selection runs again too
        for objective in options.objectives:
            for candidate in grid:
                (
                    _spec(options, preset, prepared, objective, 0, {objective: candidate}).run_dir
                    / TRAINED_FILE
                ).unlink(missing_ok=True)

    def score(objective: str, candidate: Candidate) -> float:
        spec = _spec(options, preset, prepared, objective, 0, {objective: candidate})
        print(f"[compare] selecting on validation: {objective}, {candidate_tag(candidate)}", file=sys.stderr)
        accuracy = validation_score(prepared, spec, progress=options.progress)
        print(
            f"[compare] {objective}, {candidate_tag(candidate)}: validation accuracy {accuracy:.1%}",
            file=sys.stderr,
        )
        return accuracy

    selection = select_settings(options.objectives, grid, score)
    atomic_write_json(output_dir / SELECTION_FILE, selection)
    chosen = {objective: tuple(record["chosen"].items()) for objective, record in selection.items()}
    return chosen, selection


def _train_all(
    options: CompareOptions, prepared: Prepared, heldout_reference, plan: list[RunSpec], sft_accuracy: float
):
    """Every planned run (finished ones reused); returns the results and how many were trained now."""
    results, trained = [], 0
    run_started = time.perf_counter()
    for index, spec in enumerate(plan, 1):
        label = f"[compare] run {index}/{len(plan)}: {spec.objective}, seed {spec.seed}"
        result_path = spec.run_dir / RESULT_FILE
        if not options.rerun and result_path.is_file():
            previous = json.loads(result_path.read_text())
            if previous.get("key") == spec.key:
                print(f"{label}: done before, reused", file=sys.stderr)
                results.append({**previous, "sft_accuracy": sft_accuracy})
                continue
        eta = ""
        if trained:
            left = len(plan) - index + 1
            eta = f"; about {(time.perf_counter() - run_started) / trained * left / 60:.0f} min left"
        print(f"{label}{eta}", file=sys.stderr)
        result = run_one(
            prepared, heldout_reference, spec, progress=options.progress, resume=not options.rerun
        )
        trained += 1
        print(
            f"{label}: held-out accuracy {result['final_accuracy']:.1%} (SFT start {sft_accuracy:.1%}), "
            f"chosen change {result['chosen_change']:+.2f}, rejected change {result['rejected_change']:+.2f} "
            f"nats ({result['seconds']:.0f} s)",
            file=sys.stderr,
        )
        results.append({**result, "sft_accuracy": sft_accuracy})
    return results, trained


def _write_outputs(
    output_dir: Path, table: dict, results: list, objectives, preference: dict, name: str
) -> None:
    subtitle = (
        f"{name}: {', '.join(objectives)}; beta {preference.get('beta')}, "
        f"lr {preference.get('learning_rate')}, {preference.get('max_steps')} steps"
    )
    for quantity, plot_name in PLOTS.items():
        plot_quantity(results, objectives, quantity, output_dir / plot_name, subtitle)
    atomic_write_json(output_dir / TABLE_JSON, finite_json(table))
    write_markdown(output_dir / TABLE_MD, table)

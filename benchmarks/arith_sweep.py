"""The default run's settings, chosen on a validation split (never on the held-out problems).

    python benchmarks/arith_sweep.py --output-dir runs/sweep

From the shipped start (``builtin:arith``) and the default run's on-policy pairs, every arm gets the
same budget: :data:`GRID` holds three settings per arm, each trained once (seed 0) for ``--steps``
steps with a checkpoint every ``--eval-every`` steps; each checkpoint is scored by greedy accuracy
on the validation split (the first problems of the task's training pool, disjoint from the
preference prompts and the held-out set: :mod:`miopt.tasks.default`). An arm's chosen setting is its
best (setting, steps) on validation; ties go to fewer steps, then to the earlier setting. Writes
``sweep.json`` and prints the tables. Only after every arm's setting is chosen are the chosen
models (and the start) scored once on the 1,000 held-out problems, for the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Three settings per arm (the same tuning budget), each scored at --eval-every steps too.
# mio_sft: MIO plus the chosen response's NLL (--sft-weight); plain mio is the paper's objective.
GRID: dict[str, list[dict]] = {
    "mio": [
        {"objective": "mio", "beta": beta, "learning_rate": lr}
        for beta, lr in ((0.5, 5e-5), (0.5, 1e-4), (0.1, 5e-5))
    ],
    "mio_sft": [
        {"objective": "mio", "beta": 0.5, "learning_rate": lr, "sft_weight": weight}
        for lr, weight in ((5e-5, 1.0), (1e-4, 1.0), (5e-5, 0.3))
    ],
    "dpo": [
        {"objective": "dpo", "beta": beta, "learning_rate": lr}
        for beta, lr in ((0.5, 5e-5), (0.5, 1e-4), (0.1, 5e-5))
    ],
    "sft": [{"objective": "sft", "beta": 0.5, "learning_rate": lr} for lr in (5e-5, 1e-4, 2e-4)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--validation", type=int, default=500, help="validation problems scored")
    parser.add_argument("--arms", nargs="+", default=list(GRID), choices=list(GRID))
    args = parser.parse_args()

    from safetensors.torch import load_file

    from miopt.evaluation import evaluate_arithmetic
    from miopt.experiments.default_run import DEFAULT_PREFERENCE_OPTIONS, START_MODEL, on_policy_pairs
    from miopt.model.loading import load_model, load_tokenizer
    from miopt.run.atomic_io import atomic_write_json
    from miopt.tasks.default import DefaultTask, task_splits
    from miopt.training.preference import TrainOptions, train_on_examples

    task = DefaultTask()
    splits = task_splits(task)
    validation = splits.validation[: args.validation]
    tokenizer = load_tokenizer(START_MODEL)
    start = load_model(START_MODEL)
    shared = {
        k: v
        for k, v in DEFAULT_PREFERENCE_OPTIONS.items()
        if k not in ("objective", "output_dir", "max_steps", "logging_steps")
    }
    examples = on_policy_pairs(
        start, tokenizer, splits.preference, task, max_length=shared["max_length"], source="arithmetic-pairs"
    )
    start_accuracy = evaluate_arithmetic(start, tokenizer, validation)
    start_heldout = evaluate_arithmetic(start, tokenizer, splits.heldout)  # reported, never used to choose
    print(f"start: validation {start_accuracy:.1%} ({len(validation)} problems); {len(examples)} pairs",
          file=sys.stderr, flush=True)  # fmt: skip
    rows = []
    for arm in args.arms:
        for index, setting in enumerate(GRID[arm]):
            run_dir = args.output_dir / f"{arm}-{index}"
            options = TrainOptions(
                **{**shared, **setting},
                model=START_MODEL,
                output_dir=str(run_dir),
                max_steps=args.steps,
                logging_steps=10,
                save_steps=args.eval_every,
                save_total_limit=args.steps,
                seed=TrainOptions.seed,  # the default run's seed: same data order
                progress=False,
            )
            model = load_model(START_MODEL)
            summary = train_on_examples(options, model, tokenizer, examples)
            scores = {args.steps: evaluate_arithmetic(model, tokenizer, validation)}
            for step in range(args.eval_every, args.steps, args.eval_every):
                weights = load_file(str(run_dir / f"checkpoint-{step:07d}" / "model.safetensors"))
                model.load_state_dict(weights, strict=False)
                scores[step] = evaluate_arithmetic(model, tokenizer, validation)
            row = {"arm": arm, "setting": setting, "validation": dict(sorted(scores.items())),
                   "chosen_change": summary["final"].get("logps/chosen_change"),
                   "rejected_change": summary["final"].get("logps/rejected_change")}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    chosen = {}
    for arm in args.arms:
        candidates = [
            (-score, step, index, row)
            for index, row in enumerate(r for r in rows if r["arm"] == arm)
            for step, score in row["validation"].items()
        ]
        score, step, index, row = min(candidates, key=lambda c: c[:3])
        chosen[arm] = {**row["setting"], "max_steps": step, "validation": -score, "run": f"{arm}-{index}"}
    # Only now, the held-out problems: each arm's chosen model, scored once (not used for choosing).
    for setting in chosen.values():
        run_dir = args.output_dir / setting["run"]
        model = load_model(str(run_dir))
        if setting["max_steps"] != args.steps:
            weights = load_file(str(run_dir / f"checkpoint-{setting['max_steps']:07d}" / "model.safetensors"))
            model.load_state_dict(weights, strict=False)
        setting["heldout"] = evaluate_arithmetic(model, tokenizer, splits.heldout)
    atomic_write_json(
        args.output_dir / "sweep.json",
        {
            "start_validation": start_accuracy,
            "validation_problems": len(validation),
            "pairs": len(examples),
            "rows": rows,
            "chosen": chosen,
        },  # fmt: skip
    )
    steps = sorted(rows[0]["validation"])
    print(f"start: {start_accuracy:.1%} on {len(validation)} validation problems; {len(examples)} pairs\n")
    print(
        "| arm | beta | lr | sft-weight | "
        + " | ".join(f"val. @{s}" for s in steps)
        + " | chosen Δ | rejected Δ |"
    )
    print("|---" * (6 + len(steps)) + "|")
    for row in rows:
        s = row["setting"]
        cells = [row["arm"], str(s["beta"]), f"{s['learning_rate']:g}", str(s.get("sft_weight", 0))]
        cells += [f"{row['validation'][step]:.1%}" for step in steps]
        cells += [f"{row['chosen_change']:+.2f}", f"{row['rejected_change']:+.2f}"]
        print("| " + " | ".join(cells) + " |")
    print("\n| arm | chosen setting | steps | validation | held-out (1,000) |\n|---|---|---|---|---|")
    print(f"| start | | | {start_accuracy:.1%} | {start_heldout:.1%} |")
    for arm, c in chosen.items():
        setting = f"beta {c['beta']}, lr {c['learning_rate']:g}" + (
            f", sft-weight {c['sft_weight']}" if c.get("sft_weight") else ""
        )
        print(f"| {arm} | {setting} | {c['max_steps']} | {c['validation']:.1%} | {c['heldout']:.1%} |")


if __name__ == "__main__":
    main()

"""Learning curve of the shipped start's recipe: held-out accuracy of every checkpoint.

Run after ``miopt sft --config examples/recipes/arith-start.yaml --output-dir DIR`` (which saves a
checkpoint every 100 steps):

    python benchmarks/arith_start_curve.py DIR [--problems 500]

Each ``DIR/checkpoint-N`` (and the final model in DIR) is scored by greedy exact-answer accuracy on
the first ``--problems`` of the built-in task's 1,000 held-out problems (``--split validation``: of
its validation split, the one to choose a checkpoint on); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--from-step", type=int, default=0, help="skip earlier checkpoints")
    parser.add_argument(
        "--split",
        choices=["heldout", "validation"],
        default="heldout",
        help="validation: to pick a checkpoint",
    )
    args = parser.parse_args()

    from safetensors.torch import load_file

    from miopt.evaluation import evaluate_arithmetic
    from miopt.model.builtin import build_model, build_tokenizer
    from miopt.model.loading import load_model
    from miopt.tasks.default import DefaultTask, task_splits

    problems = getattr(task_splits(DefaultTask()), args.split)[: args.problems]
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    checkpoints = sorted(
        (int(re.search(r"(\d+)$", p.name).group(1)), p)
        for p in args.run_dir.glob("checkpoint-*")
        if int(re.search(r"(\d+)$", p.name).group(1)) >= args.from_step
    )
    print(f"| step | {args.split} accuracy ({len(problems)} problems) |\n|---|---|")
    for step, folder in checkpoints:
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        print(f"| {step} | {evaluate_arithmetic(model, tokenizer, problems):.1%} |", flush=True)
    if (args.run_dir / "config.json").is_file():
        final = load_model(str(args.run_dir))
        print(f"| final | {evaluate_arithmetic(final, tokenizer, problems):.1%} |")


if __name__ == "__main__":
    main()

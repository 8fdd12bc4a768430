"""``miopt train``: preference training; with no --model and no --data, the embedded default run."""

from __future__ import annotations

import argparse

HELP = "Align a causal LM on preference data (MIO by default); no arguments: the embedded default demo."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from miopt.config import add_options
    from miopt.training.preference import TrainOptions

    add_options(parser, TrainOptions)


def run(args: argparse.Namespace) -> int:
    from miopt.config import load_yaml, resolve
    from miopt.training.preference import TrainOptions, train

    options = resolve(TrainOptions, args)
    if options.model is None and options.data is None:
        from miopt.experiments.default_run import DEFAULT_PREFERENCE_OPTIONS, run_default

        # the default run's preset sits below the YAML file and the flags, which also win over the
        # settings each arm was tuned with
        given = {key for key in vars(args) if not key.startswith("_")} - {"command", "config"}
        if getattr(args, "config", None):
            given |= set(load_yaml(args.config))
        run_default(resolve(TrainOptions, args, preset=DEFAULT_PREFERENCE_OPTIONS), explicit=given)
        return 0
    summary = train(options)
    if not summary:  # not the main process of a distributed run
        return 0
    final = summary.get("final", {})
    print(
        f"done: {summary.get('steps')} steps; loss {final.get('loss', float('nan')):.4f}, "
        f"pair accuracy {final.get('rewards/accuracies', float('nan')):.3f}; model, metrics.jsonl, summary.json "
        f"and curves.png in {options.output_dir}"
    )
    return 0

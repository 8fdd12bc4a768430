"""``miopt reward``: train a Bradley-Terry reward model on preference data (miopt.training.reward)."""

from __future__ import annotations

import argparse

HELP = "Train a Bradley-Terry reward model (one-score sequence classifier) on preference data."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from miopt.config import add_options
    from miopt.training.reward import RewardOptions

    add_options(parser, RewardOptions)


def run(args: argparse.Namespace) -> int:
    from miopt.config import resolve
    from miopt.training.reward import RewardOptions, train_reward

    options = resolve(RewardOptions, args)
    summary = train_reward(options)
    if not summary:  # not the main process of a distributed run
        return 0
    accuracy = summary.get("heldout_pair_accuracy")
    text = "no held-out split" if accuracy is None else f"held-out pair accuracy {accuracy:.3f}"
    print(f"done: {summary['steps']} steps; {text}; reward model and summary.json in {options.output_dir}")
    return 0

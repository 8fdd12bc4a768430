"""``miopt online``: online MIO with verifiable rewards (sample, verify, pair, update; miopt.online.rounds)."""

from __future__ import annotations

import argparse

HELP = "Online MIO with verifiable rewards: rounds of sampling K responses, verifying, pairing, training."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from miopt.config import add_options
    from miopt.online.rounds import OnlineOptions

    add_options(parser, OnlineOptions)


def run(args: argparse.Namespace) -> int:
    from miopt.config import resolve
    from miopt.online.rounds import ARITHMETIC, BUILTIN_DEFAULTS, OnlineOptions, run_online

    options = resolve(OnlineOptions, args)
    if options.model is None and options.data == ARITHMETIC:
        # the built-in task's preset sits below the YAML file and the flags
        options = resolve(OnlineOptions, args, preset=BUILTIN_DEFAULTS)
    summary = run_online(options)
    before, after = summary["heldout_before"], summary["heldout_after"]
    if before is not None and after is not None:
        print(
            f"held-out greedy pass@1 ({summary['heldout_n']} records): {before:.1%} -> {after:.1%} "
            f"after {summary['rounds']} rounds"
        )
    print(
        f"done: final policy {summary['final_model']}; per-round log in "
        f"{options.output_dir}/rounds.jsonl, summary in {options.output_dir}/summary.json"
    )
    return 0

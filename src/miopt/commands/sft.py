"""``miopt sft``: supervised warm-start on prompt/completion data."""

from __future__ import annotations

import argparse

HELP = "Supervised fine-tuning on prompt/completion data (how a reference model is made)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from miopt.config import add_options
    from miopt.training.sft import SFTOptions

    add_options(parser, SFTOptions)


def run(args: argparse.Namespace) -> int:
    from miopt.config import resolve
    from miopt.training.sft import SFTOptions, sft

    options = resolve(SFTOptions, args)
    sft(options)
    print(f"model saved to {options.output_dir}")
    return 0

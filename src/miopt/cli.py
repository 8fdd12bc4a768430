"""The ``miopt`` command: one sub-command per module under ``miopt.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from miopt.errors import MioptError

COMMANDS = {
    "train": "miopt.commands.train",
    "sft": "miopt.commands.sft",
    "eval": "miopt.commands.evaluate",
    "data": "miopt.commands.data",
    "toy": "miopt.commands.toy",
    "online": "miopt.commands.online",
    "compare": "miopt.commands.compare",
    "reward": "miopt.commands.reward",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miopt",
        description="Align language models with preference data by mutual-information optimisation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=module.HELP.replace("%", "%%"),  # argparse %-formats help strings, not descriptions
            description=module.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "output_dir", None):  # every command: a file there is an error before any work
            from miopt.run_folder import check_output_dir

            check_output_dir(args.output_dir)
        return int(args._run(args) or 0)
    except MioptError as error:
        print(f"miopt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"miopt {args.command}: interrupted; resume with --resume", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down a distributed run's process group before the interpreter exits: left to the
    destructors, a gloo worker could abort at exit ("terminate called without an active exception")
    after a successful run."""
    torch = sys.modules.get("torch")  # never import torch just for this (``miopt --help`` stays fast)
    distributed = getattr(torch, "distributed", None)
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

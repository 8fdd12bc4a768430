"""The ``miopt`` command: one sub-command per module under ``miopt.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from miopt.errors import MioptError
from miopt.run.preemption import Interrupted, Preempted, exit_status, signal_name, sigterm_raises
from miopt.run.ranks import is_main_process

COMMANDS = {
    "train": "miopt.commands.train",
    "sft": "miopt.commands.sft",
    "eval": "miopt.commands.evaluate",
    "data": "miopt.commands.data",
    "toy": "miopt.commands.toy",
    "online": "miopt.commands.online",
    "compare": "miopt.commands.compare",
    "reward": "miopt.commands.reward",
    "fetch": "miopt.commands.fetch",
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


# How each command continues a stopped run (others: run the same command again).
RESUME_FLAGS = {
    "train": "--resume latest",
    "sft": "--resume latest",
    "reward": "--resume latest",
    "online": "--resume",
}


def resume_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """The command that continues this one: its arguments, any --resume replaced by the command's own."""
    tokens, skip = [], False
    for index, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token == "--resume":
            following = argv[index + 1] if index + 1 < len(argv) else "-"
            skip = not following.startswith("-")
            continue
        if not token.startswith("--resume="):
            tokens.append(token)
    default_run = args.command == "train" and not any(
        getattr(args, name, None) for name in ("model", "data", "config")
    )
    flag = None if default_run else RESUME_FLAGS.get(args.command)
    if flag is None:
        return f"to continue, run `miopt {shlex.join(argv)}` again"
    return f"resume with: miopt {shlex.join(tokens)} {flag}"


def _report(text: str) -> None:
    if is_main_process():  # one line per run, not one per process
        print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 2
    name = f"miopt {args.command}"
    try:
        with sigterm_raises():
            if getattr(args, "output_dir", None):  # every command: a file there is an error before any work
                from miopt.run.run_folder import check_output_dir

                check_output_dir(args.output_dir)
            return int(args._run(args) or 0)
    except Preempted as stop:
        resume = "" if stop.checkpoint is None else f"; {resume_hint(args, argv)}"
        _report(f"{name}: {stop}{resume}")
        return stop.exit_status
    except MioptError as error:
        _report(f"{name}: error: {error}")
        return error.exit_status
    except Interrupted as stop:
        what = (
            f"aborted by a third {signal_name(stop.signum)}; the checkpoint under way was discarded"
            if stop.aborted
            else f"stopped by {signal_name(stop.signum)} outside the training steps"
        )
        _report(f"{name}: {what}; {resume_hint(args, argv)}")
        return exit_status(stop.signum)
    except KeyboardInterrupt:
        _report(f"{name}: interrupted; {resume_hint(args, argv)}")
        return 130
    except OSError as error:
        from miopt.run.atomic_io import write_problem

        problem = write_problem(error)
        if problem is None:
            raise
        _report(f"{name}: error: cannot write {error.filename or 'a file'}: {problem}")
        return 1
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

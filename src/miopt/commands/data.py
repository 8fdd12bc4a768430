"""``miopt data``: data converters (``miopt data gsm8k-pairs ...``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from miopt.config import add_options, option, resolve
from miopt.errors import OptionError

HELP = "Data converters: 'gsm8k-pairs' turns GSM8K model samples into preference pairs."


@dataclass
class Gsm8kPairsOptions:
    """Options of ``miopt data gsm8k-pairs``."""

    input: str = option(
        "", "example_model_solutions.jsonl (question, ground_truth, model samples with is_correct)."
    )
    output_dir: str = option(
        "", "Folder for pairs_train.jsonl, pairs_heldout.jsonl, heldout_eval.jsonl, manifest.json."
    )
    heldout_fraction: float = option(
        0.2, "Fraction of questions held out (pairs and GSM8K-format evaluation file)."
    )
    seed: int = option(0, "Seed of the question split.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", metavar="CONVERTER", required=True)
    pairs = commands.add_parser(
        "gsm8k-pairs",
        help="GSM8K model samples -> preference pairs split by question, plus a held-out eval file.",
        description=(
            "Positives: the ground-truth solution and samples marked correct; negatives: samples marked "
            "incorrect (a list when several). Questions are split into train and held-out files."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_options(pairs, Gsm8kPairsOptions)
    pairs.set_defaults(_data_run=_run_gsm8k_pairs)


def _run_gsm8k_pairs(args: argparse.Namespace) -> int:
    from miopt.evaluation.gsm8k_pairs import EVAL_FILE, HELDOUT_FILE, TRAIN_FILE, convert_gsm8k_pairs
    from miopt.run.run_folder import check_output_dir

    options = resolve(Gsm8kPairsOptions, args)
    if not options.input:
        raise OptionError("give --input (example_model_solutions.jsonl)")
    if not options.output_dir:
        raise OptionError("give --output-dir")
    if not 0.0 <= options.heldout_fraction < 1.0:
        raise OptionError(f"--heldout-fraction must be in [0, 1), got {options.heldout_fraction}")
    check_output_dir(options.output_dir)
    counts = convert_gsm8k_pairs(
        options.input, options.output_dir, heldout_fraction=options.heldout_fraction, seed=options.seed
    )
    print(
        f"{counts['questions']} questions ({counts['train_questions']} train, "
        f"{counts['heldout_questions']} held out; "
        f"{counts['questions_without_negatives']} without an incorrect sample give no pair); "
        f"samples: {counts['correct_samples']} correct, {counts['incorrect_samples']} incorrect"
    )
    print(f"wrote {counts['train_pairs']} pairs to {options.output_dir}/{TRAIN_FILE}")
    print(f"wrote {counts['heldout_pairs']} pairs to {options.output_dir}/{HELDOUT_FILE}")
    print(f"wrote {counts['heldout_eval_records']} GSM8K-format records to {options.output_dir}/{EVAL_FILE}")
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args._data_run(args) or 0)

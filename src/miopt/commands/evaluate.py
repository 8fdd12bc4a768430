"""``miopt eval``: accuracy of a model on a reasoning / math / multiple-choice data set."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miopt.config import add_options, as_dict, option, resolve
from miopt.errors import OptionError

HELP = "Evaluate a model: generation (GSM8K, MATH, arithmetic) or multiple choice; accuracy with a 95% CI."


@dataclass
class EvalOptions:
    """Options of ``miopt eval``."""

    model: str = option(
        "",
        "Model folder (AutoModelForCausalLM / AutoTokenizer), 'builtin' (untrained; smoke tests) or "
        "'builtin:arith' (the shipped start trained on the built-in arithmetic task), or a GGUF file "
        "(PATH/FILE.gguf or owner/repo/FILE.gguf; needs the gguf extra).",
    )
    data: str = option(
        "", "JSONL file (GSM8K, MATH, multiple-choice or generic format; docs/evaluation.md) or 'arithmetic'."
    )
    output_dir: str | None = option(None, "Folder for summary.json and predictions.jsonl (none: print only).")
    limit: int | None = option(None, "Evaluate only the first N records.")
    max_new_tokens: int = option(256, "Most tokens generated per answer.")
    batch_size: int = option(16, "Prompts per batch.")
    num_samples: int = option(
        1, "Samples per prompt (>1: majority vote and pass@k; needs --temperature > 0)."
    )
    temperature: float = option(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    pass_k: list[int] | None = option(
        None, "k values for pass@k with several samples (default: 1 and num_samples)."
    )
    stop: list[str] | None = option(
        None, "Stop strings (default by answer type: GSM8K '\\n\\n', arithmetic '\\n')."
    )
    chat_template: bool = option(False, "Wrap each prompt as a user turn with the tokenizer's chat template.")
    system_prompt: str | None = option(None, "System message when --chat-template is on.")
    few_shot: int = option(0, "Number of worked examples put before each prompt.")
    few_shot_file: str | None = option(
        None,
        "Where the few-shot examples come from (default: the first records of --data, then not evaluated).",
    )
    seed: int = option(0, "Random seed for sampling.")
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:1, ...")
    dtype: str = option("auto", "Model weights' dtype.", choices=["auto", "float32", "bfloat16", "float16"])
    progress: bool = option(True, "Show a progress bar on stderr.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EvalOptions)


def load_model(name: str, *, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a folder, hub id or 'builtin' / 'builtin:arith', through :mod:`miopt.model.loading` (the loader every
    command uses), on ``device`` (``auto``: CUDA when available)."""
    import torch

    from miopt.model.loading import load_model as load
    from miopt.model.loading import load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(name)
    model = load(name, tokenizer, dtype=None if dtype == "auto" else dtype)
    return model.to(device), tokenizer


def check_eval_options(options: EvalOptions) -> None:
    """Range checks of the numeric options and the output folder, before anything is loaded."""
    from miopt.errors import require
    from miopt.model.loading import check_model_source
    from miopt.run.run_folder import check_output_dir

    o = options
    if not o.model:
        raise OptionError("give --model (a model folder, or 'builtin')")
    if not o.data:
        raise OptionError("give --data (a JSONL file, or 'arithmetic')")
    if o.num_samples < 1:
        raise OptionError("--num-samples must be at least 1")
    if o.num_samples > 1 and o.temperature <= 0:
        raise OptionError("--num-samples > 1 needs sampling: give --temperature above 0 (e.g. 0.7)")
    if o.limit is not None and o.limit < 1:
        raise OptionError("--limit must be at least 1")
    if o.few_shot < 0:
        raise OptionError("--few-shot must be 0 or more")
    check_model_source(o.model)
    require(o.max_new_tokens >= 1, "--max-new-tokens", ">= 1", o.max_new_tokens)
    require(o.batch_size >= 1, "--batch-size", ">= 1", o.batch_size)
    require(o.temperature >= 0, "--temperature", ">= 0 (0: greedy)", o.temperature)
    require(0 < o.top_p <= 1, "--top-p", "in (0, 1]", o.top_p)
    require(o.seed >= 0, "--seed", ">= 0", o.seed)
    for k in o.pass_k or []:
        require(1 <= k <= o.num_samples, "--pass-k", f"in [1, --num-samples = {o.num_samples}]", k)
    if o.output_dir:
        check_output_dir(o.output_dir)


def run(args: argparse.Namespace) -> int:
    from miopt.evaluation.runner import EvalSettings, evaluate

    options = resolve(EvalOptions, args)
    check_eval_options(options)
    records, prefix = _records_and_prefix(options)
    model, tokenizer = load_model(options.model, device=options.device, dtype=options.dtype)
    settings = EvalSettings(
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        num_samples=options.num_samples,
        temperature=options.temperature,
        top_p=options.top_p,
        stop=options.stop,
        few_shot_prefix=prefix,
        chat_template=options.chat_template,
        system_prompt=options.system_prompt,
        seed=options.seed,
        pass_k=options.pass_k,
        progress=options.progress,
    )
    summary, predictions = evaluate(model, tokenizer, records, settings)
    summary = {"model": options.model, "data": options.data, **summary, "options": as_dict(options)}
    _print_summary(summary, options.data)
    if options.output_dir:
        from miopt.run.atomic_io import atomic_write_json, atomic_write_jsonl

        output = Path(options.output_dir)
        atomic_write_json(output / "summary.json", summary)
        atomic_write_jsonl(output / "predictions.jsonl", predictions)
        print(f"wrote {output / 'summary.json'} and {output / 'predictions.jsonl'}", file=sys.stderr)
    return 0


def _records_and_prefix(options: EvalOptions):
    """The records to score and the few-shot prefix: the examples come from ``--few-shot-file``, or
    else are the first ``--few-shot`` records of ``--data`` (then not scored)."""
    from miopt.evaluation.tasks import few_shot_prefix, load_records

    if options.few_shot and options.few_shot_file:
        examples = load_records(options.few_shot_file, limit=options.few_shot)
        records = load_records(options.data, limit=options.limit)
    else:
        extra = options.few_shot
        records = load_records(options.data, limit=None if options.limit is None else options.limit + extra)
        examples, records = records[:extra], records[extra:]
    return records, few_shot_prefix(examples) if options.few_shot else ""


def _print_summary(summary: dict, data: str) -> None:
    low, high = summary["ci95"]
    print(
        f"accuracy {summary['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, Wilson) "
        f"= {summary['correct']}/{summary['n']} on {data}"
    )
    if "choice" in summary:
        part = summary["choice"]
        low, high = part["ci95_norm"]
        print(
            f"multiple choice: accuracy {part['accuracy']:.4f}, "
            f"length-normalised {part['accuracy_norm']:.4f} (95% CI {low:.4f}-{high:.4f})"
        )
    for key, value in summary.get("generation", {}).items():
        if key.startswith("pass@") or key == "majority_vote_accuracy":
            print(f"{key} {value:.4f}")

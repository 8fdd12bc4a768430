"""miopt's generation path against plain Hugging Face ``generate`` on the same prompts, in one process.

    python benchmarks/bench_generation.py --model DIR                 # SmolLM2 folder by default
    python benchmarks/bench_generation.py --model DIR --dtype bfloat16 --repeats 5

Prompts: the first ``--prompts`` preference prompts of ``--preset smollm2-arith``'s task (the prompts
its pairs are sampled from). Both sides sample at temperature 1 (``top_k`` off, ``top_p`` 1), at most
``--max-new-tokens`` tokens per row, ``--batch-size`` rows per batch, stopping at a newline.

* plain: ``model.generate`` on the prompts as given (left-padded batches in prompt order), fp32
  weights, ``stop_strings=["\\n"]``: what a user writes without miopt.
* miopt: :func:`miopt.evaluation.generation.generate` (the path of evaluation, pair building and online
  rounds): length-sorted batches, finished rows dropped every ``--compact-every`` tokens, ``--dtype``
  weights for decoding.

Tokens counted: each row's generated tokens up to and including its stop (the same rule for both, so
``tokens_per_second`` is a like-for-like rate). The sides alternate, ``--repeats`` times each, after
one warm-up each; medians are reported. Run it alone: on 2 shared cores a neighbour halves any rate.
The last line printed is one JSON object with ``tokens_per_second`` (miopt), ``hf_generate_tokens_per_second``
(plain) and ``speedup`` (their ratio).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _prompts(count: int) -> list[str]:
    from miopt.evaluation.tasks import arithmetic_records
    from miopt.experiments.compare.smollm2 import SMOLLM2_TASK
    from miopt.tasks.default import task_splits

    problems = task_splits(SMOLLM2_TASK).preference[:count]
    return [record.prompt for record in arithmetic_records(problems)]


def _generated_tokens(tokenizer, texts: list[str]) -> int:
    """Tokens of the completions (each with its stop newline, as a decoder emits it)."""
    return sum(len(tokenizer(text + "\n", add_special_tokens=False)["input_ids"]) for text in texts)


def plain_generate(model, tokenizer, prompts, *, batch_size: int, max_new_tokens: int) -> list[str]:
    tokenizer.padding_side = "left"
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                stop_strings=["\n"],
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
            )
        decoded = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        texts += [text.split("\n", 1)[0] for text in decoded]
    return texts


def miopt_generate(
    model, tokenizer, prompts, *, batch_size: int, max_new_tokens: int, dtype, compact_every: int
) -> list[str]:
    from miopt.evaluation.generation import generate

    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        stop=["\n"],
        batch_size=batch_size,
        temperature=1.0,
        dtype=dtype,
        compact_every=compact_every,
    )
    return [texts[0] for texts in outputs]


def default_model() -> str:
    from miopt.model.fetch import fetch
    from miopt.model.gguf import to_folder

    return str(to_folder(str(fetch("smollm2"))))  # fetched and converted on first use


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model folder (default: the SmolLM2 folder of 'miopt fetch smollm2 --convert')",
    )
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="miopt's decoding weights"
    )
    parser.add_argument(
        "--compact-every",
        type=int,
        default=16,
        help="miopt's side: finished rows leave the batch every N new tokens (0: never; generate's default 16)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from miopt.model.loading import load_model, load_tokenizer

    source = args.model or default_model()
    model, tokenizer = load_model(source), load_tokenizer(source)
    model.eval()
    prompts = _prompts(args.prompts)
    dtype = getattr(torch, args.dtype)
    sides = {
        "hf_generate": lambda: plain_generate(
            model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
        ),
        "miopt": lambda: miopt_generate(
            model,
            tokenizer,
            prompts,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            dtype=dtype,
            compact_every=args.compact_every,
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for side in sides.values():  # warm-up: allocator, kernels, the bf16 copy's first use
        side()
    for repeat in range(args.repeats):
        for name in sides if repeat % 2 == 0 else reversed(list(sides)):
            torch.manual_seed(repeat)
            started = time.perf_counter()
            texts = sides[name]()
            seconds = time.perf_counter() - started
            rates[name].append(_generated_tokens(tokenizer, texts) / seconds)
            print(f"{name}: {rates[name][-1]:.0f} tokens/s ({seconds:.1f} s)", file=sys.stderr)
    result = {
        "model": source,
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "miopt_dtype": args.dtype,
        "compact_every": args.compact_every,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "repeats": {name: [round(rate, 1) for rate in values] for name, values in rates.items()},
        "tokens_per_second": statistics.median(rates["miopt"]),
        "hf_generate_tokens_per_second": statistics.median(rates["hf_generate"]),
    }
    result["speedup"] = result["tokens_per_second"] / result["hf_generate_tokens_per_second"]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

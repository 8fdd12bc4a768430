"""What the benchmarks measure in each side's process and make of it afterwards: resident memory, this
machine's dense matmul rate, each step's tokens and FLOPs (useful, and executed by TRL's padded batch or
by miopt's layout), and a side's summary (pairs/s, tokens/s, FLOP fractions, memory)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from bench_assets import Config, training_order


def rss_mb(field_name: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 1024, repeats: int = 7, bf16: bool = False) -> float:
    """Dense matmul throughput of this process (median of ``repeats``), GFLOP/s: fp32, or bf16 when
    both sides train in bf16 mixed precision (their matmuls then run in bf16). On a GPU (where the
    sides train) the matmul runs there, at n = 8192 so that it reaches the device's rate."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    cuda = torch.cuda.is_available()
    n = 8192 if cuda else n
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def batch_accounting(
    config: Config,
    model_dir: Path,
    pairs_file: Path,
    packing: str,
    attention: str = "sdpa",
    bf16: bool = False,
) -> list[dict]:
    """Per step: sequence tokens and FLOPs (useful; executed by TRL's padded batch; by miopt's layout,
    with its lengths rounded to SHAPE_MULTIPLE in bf16 on CPU, as ``miopt.logprobs.packing.rounds_shapes`` does)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from miopt.data.records import PreferenceRecord
    from miopt.data.tokenize import collate, tokenize_preferences
    from miopt.logprobs.packing import SHAPE_MULTIPLE, make_batch, round_up

    model_config = AutoConfig.from_pretrained(model_dir)
    # what make_batch looks at: the attention implementation a model loaded from this folder gets (sdpa
    # by default), and a forward that passes keyword arguments on (transformers 5)
    model = SimpleNamespace(
        config=SimpleNamespace(_attn_implementation=attention), forward=lambda *args, **kwargs: None
    )
    multiple = SHAPE_MULTIPLE if bf16 and not torch.cuda.is_available() else 1
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    records = [
        PreferenceRecord(p["prompt"], p["chosen"], (p["rejected"],), str(i)) for i, p in enumerate(pairs)
    ]
    examples, _ = tokenize_preferences(records, tokenizer, max_length=config.max_length)
    h, v, layers = model_config.hidden_size, model_config.vocab_size, model_config.num_hidden_layers
    kv = h * model_config.num_key_value_heads // model_config.num_attention_heads
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * model_config.intermediate_size)

    # fwd + bwd: 6 per weight per token; attention scores and values: 4 * h per (query, key) pair, x3;
    # the log-prob head: forward, recomputed forward, 2 backward matmuls (both libraries checkpoint it).
    def trunk(tokens: int, pairs_qk: int) -> float:
        return 6 * linear * tokens + 12 * layers * h * pairs_qk

    head = 8 * h * v
    order = training_order(len(examples), {"batch_size": config.batch_size, "seed": config.seed})
    steps = []
    for s in range(len(order) // config.batch_size):
        batch = [examples[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size]]
        lengths = [len(e.prompt_ids) + len(r) for e in batch for r in (e.chosen_ids, *e.rejected_ids)]
        responses = [len(r) for e in batch for r in (e.chosen_ids, *e.rejected_ids)]
        padded = collate(batch, tokenizer.pad_token_id)
        rows, width = padded.input_ids.shape
        layout = make_batch(batch, tokenizer.pad_token_id, packing, model)
        if packing == "padded":
            ours = trunk(rows * width, rows * width**2) + head * int(padded.response_mask[:, 1:].sum())
            positions = rows * width
        else:
            r, c = layout.input_ids.shape
            c = round_up(c, multiple)
            if layout.attention_blocks is not None:  # one row; attention within each unit only
                pairs_qk = sum(round_up(b - a, multiple) ** 2 for a, b, _ in layout.attention_blocks)
            else:
                pairs_qk = r * c * c
            scored = round_up(layout.targets.numel(), multiple)
            ours = trunk(r * c, pairs_qk) + head * scored + 2 * h * v * r
            positions = r * c
        steps.append(
            {
                "pairs": len(batch),
                "tokens": sum(lengths),
                "useful_flops": trunk(sum(lengths), sum(n * (n + 1) // 2 for n in lengths))
                + head * sum(responses),
                "trl_flops": trunk(rows * width, rows * width**2) + head * rows * (width - 1),
                "trl_positions": rows * width,
                "miopt_flops": ours,
                "miopt_positions": positions,
            }
        )
    return steps


def summarise(result: dict, steps: list[dict], warmup: int, side: str) -> dict:
    times = [result["events"][0][0] - result["train_start"]]
    times += [b[0] - a[0] for a, b in zip(result["events"], result["events"][1:])]
    measured = list(zip(times, steps))[warmup:]
    peak = result["matmul_gflops"] * 1e9
    key = "trl" if side == "trl" else "miopt"
    median = statistics.median

    return {
        "step_seconds": median(t for t, _ in measured),
        "pairs_per_second": median(s["pairs"] / t for t, s in measured),
        "tokens_per_second": median(s["tokens"] / t for t, s in measured),
        "positions_per_step": median(s[f"{key}_positions"] for _, s in measured),
        "executed_flops_fraction": median(s[f"{key}_flops"] / t for t, s in measured) / peak,
        "useful_flops_fraction": median(s["useful_flops"] / t for t, s in measured) / peak,
        "executed_gflops": median(s[f"{key}_flops"] / t for t, s in measured) / 1e9,
        "matmul_gflops": result["matmul_gflops"],
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_floor_mb": result["rss_floor_mb"],
        "rss_imports_mb": result["rss_imports_mb"],
        "rss_above_imports_mb": result["peak_rss_mb"] - result["rss_imports_mb"],
        "peak_cuda_mb": result["peak_cuda_mb"],
        "setup_seconds": result["setup_seconds"],
        "losses": [loss for _, loss in result["events"]],
        "ids": result["ids"],
        "threads": result["threads"],
    }

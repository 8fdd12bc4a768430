"""The throughput step of ``gpu_check.py``: miopt against TRL's DPOTrainer on a ~370M-parameter Llama.

The sides and their timing are ``bench_vs_trl.py``'s, the FLOP accounting and the matmul rate
``bench_accounting.py``'s (each side
in its own subprocess, same pairs in the same order, same batch, length, optimizer and objective);
this module only builds the assets from what ships in the repository and condenses the figures:

* model: :func:`miopt.model.builtin.build_model` (Llama, hidden 1024, 20 layers, 16 heads, FFN 4096, tied
  embeddings), random weights, vocabulary padded to 32,000 rows (~370M parameters);
* tokenizer: byte-level BPE trained here on the texts of the shipped pairs;
* pairs: ``benchmarks/data/gsm8k_pairs.jsonl`` (160 GSM8K pairs: ``miopt data gsm8k-pairs`` on
  ``../shared/data/gsm8k/example_model_solutions.jsonl``, one rejected response each), those whose
  prompt + response fit ``max_length`` tokens.

MFU is useful FLOPs per second (each sequence alone, causal, no padding: the same count for both
sides) over the dense bf16 matmul rate measured in the same subprocess (8192 x 8192 on the GPU).
"""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
import subprocess
from dataclasses import asdict
from pathlib import Path

import bench_vs_trl as bench
from bench_accounting import batch_accounting, summarise
from bench_assets import Config, build_bpe_tokenizer, save_model_and_pairs

PAIRS = Path(__file__).resolve().parent / "data" / "gsm8k_pairs.jsonl"
GPU_MODEL = {"hidden_size": 1024, "num_layers": 20, "num_heads": 16, "vocab_size": 32000}
TOY_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 32000}


def config_for(dry: bool) -> Config:
    if dry:
        return Config("gpu-check-toy", batch_size=2, steps=2, warmup=1, max_length=512, model=TOY_MODEL)
    return Config("gpu-check-370m", batch_size=8, steps=8, warmup=2, max_length=512, model=GPU_MODEL)


def fitting_pairs(tokenizer, max_length: int) -> list[dict]:
    """The shipped pairs whose prompt + longer response + EOS fit ``max_length`` (so neither side truncates)."""
    pairs = []
    for line in PAIRS.read_text().splitlines():
        pair = json.loads(line)
        prompt = len(tokenizer(pair["prompt"])["input_ids"])
        longest = max(len(tokenizer(pair[k])["input_ids"]) for k in ("chosen", "rejected")) + 1
        if prompt + longest <= max_length:
            pairs.append(pair)
    return pairs


def prepare_assets(config: Config, work: Path) -> tuple[Path, Path, int]:
    """Model folder, pairs file and parameter count for ``config`` (built once per work folder)."""
    model_dir, pairs_file, stamp = work / "model", work / "pairs.jsonl", work / "assets.json"
    if stamp.is_file() and json.loads(stamp.read_text())["config"] == asdict(config):
        return model_dir, pairs_file, json.loads(stamp.read_text())["parameters"]
    work.mkdir(parents=True, exist_ok=True)
    texts = [
        json.loads(line)[key]
        for line in PAIRS.read_text().splitlines()
        for key in ("prompt", "chosen", "rejected")
    ]
    tokenizer = build_bpe_tokenizer(texts, config.model["vocab_size"])
    pairs = fitting_pairs(tokenizer, config.max_length)
    random.Random(config.seed).shuffle(pairs)
    count = config.batch_size * (config.steps + config.warmup)
    if len(pairs) < count:
        raise RuntimeError(f"only {len(pairs)} shipped pairs fit {config.max_length} tokens; {count} needed")
    parameters = save_model_and_pairs(config, tokenizer, pairs[:count], model_dir, pairs_file)
    stamp.write_text(json.dumps({"config": asdict(config), "parameters": parameters}))
    return model_dir, pairs_file, parameters


def side_figures(summary: dict) -> dict:
    """What the report keeps of one side's ``summarise``: peak memory is CUDA's on a GPU, RSS on CPU."""
    cuda = summary["peak_cuda_mb"]
    return {
        "status": "ok",
        "pairs_per_second": summary["pairs_per_second"],
        "tokens_per_second": summary["tokens_per_second"],
        "step_seconds": summary["step_seconds"],
        "peak_memory_mb": cuda if cuda is not None else summary["peak_rss_mb"],
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda is not None else "peak RSS (VmHWM)",
        "mfu": summary["useful_flops_fraction"],
        "executed_flops_fraction": summary["executed_flops_fraction"],
        "matmul_tflops_bf16": summary["matmul_gflops"] / 1000,
        "setup_seconds": summary["setup_seconds"],
        "losses": summary["losses"],
        "ids": summary["ids"],
    }


def run_throughput(work: Path, dry: bool, partial: Path, packing: str = "shared-prompt") -> dict:
    """Both sides (TRL only where it is installed), one after the other, and their ratios; the result
    so far is written to ``partial`` after each side."""
    import os

    import torch

    config = config_for(dry)
    model_dir, pairs_file, parameters = prepare_assets(config, work)
    steps = batch_accounting(config, model_dir, pairs_file, packing, bf16=True)
    measured = steps[config.warmup :]
    common = bench.side_spec(
        config, model_dir, pairs_file, threads=1 if dry else min(8, os.cpu_count() or 1), bf16=True
    )
    result = {
        "model": {
            **config.model,
            "parameters": parameters,
            "intermediate_size": 4 * config.model["hidden_size"],
        },
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "measured_steps": config.steps,
        "warmup_steps": config.warmup,
        "objective": f"{config.objective} (TRL {bench.TRL_LOSS[config.objective]})",
        "precision": "bf16 mixed (autocast), fp32 weights, both sides",
        "miopt_packing": packing,
        "sequence_tokens_per_step": statistics.median(s["tokens"] for s in measured),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "sides": {},
    }
    from miopt.run.atomic_io import atomic_write_json

    sides = [("miopt", packing), ("trl", "padded")]  # miopt first: its figures survive a TRL overrun
    for name, layout in sides:
        if name == "trl" and importlib.util.find_spec("trl") is None:
            result["sides"]["trl"] = {
                "status": "skipped: trl is not installed (bring its wheels: docs/gpu.md)"
            }
            continue
        spec = {**common, "side": name, "packing": layout, "label": f"{name}-{layout}"}
        spec["tmp"] = str(work / "tmp" / spec["label"])
        try:
            raw = bench._spawn(spec, work)
        except subprocess.CalledProcessError as error:  # recorded; the other side still runs
            result["sides"][name] = {
                "status": f"failed: the {name} side exited {error.returncode} (see the log)"
            }
            continue
        result["sides"][name] = side_figures(summarise(raw, steps, config.warmup, name))
        atomic_write_json(partial, result)
    trl, ours = result["sides"].get("trl", {}), result["sides"]["miopt"]
    if "pairs_per_second" in trl and "pairs_per_second" in ours:
        result["speed_ratio"] = ours["pairs_per_second"] / trl["pairs_per_second"]
        result["memory_ratio"] = ours["peak_memory_mb"] / trl["peak_memory_mb"]
        result["same_token_ids"] = ours["ids"] == trl["ids"]
        result["max_loss_difference"] = max(abs(a - b) for a, b in zip(ours["losses"], trl["losses"]))
    positive = all(
        side["pairs_per_second"] > 0 and side["peak_memory_mb"] > 0 and side["mfu"] > 0
        for side in result["sides"].values()
        if "pairs_per_second" in side
    )
    ran = all(side["status"].startswith(("ok", "skipped")) for side in result["sides"].values())
    if not ran:
        result["status"] = "failed: " + "; ".join(
            side["status"] for side in result["sides"].values() if side["status"].startswith("failed")
        )
    else:
        result["status"] = "ok" if positive and result.get("same_token_ids", True) else "failed: see figures"
    return result

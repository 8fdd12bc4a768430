"""miopt against TRL's DPOTrainer, side by side: pairs per second, tokens per second, peak memory.

    python benchmarks/bench_vs_trl.py --config tiny            # built-in char model, synthetic arithmetic pairs
    python benchmarks/bench_vs_trl.py --config mid             # hidden 512 x 8 layers, 32k BPE, GSM8K pairs
    python benchmarks/bench_vs_trl.py --config tiny --repeats 3 --threads 1 --variants padded
    python benchmarks/bench_vs_trl.py --config mid --modifier use_weighting=true   # TRL's modifiers on both sides

Both sides train the same saved model folder on the same pairs (one rejected response each: TRL's
format), batch size, max length, optimizer (AdamW, constant learning rate, clipping at 1.0) and
objective (miopt ``dpo`` = TRL ``sigmoid``, miopt ``mio`` = TRL ``nca_pair``), each with its best
reference handling: reference log-probs precomputed before training (TRL
``precompute_ref_log_probs=True``; miopt's ``compute_reference_logps``), not timed as steps. TRL reads
the pairs in the order miopt's data order visits them (``train_sampling_strategy="sequential"``), so
step ``i`` is the same batch on both sides and the logged losses must agree (checked).

Each side runs in its own subprocess (peak RSS of one library is not polluted by the other), one after
the other (alternating which goes first per repeat), with the same torch thread count. Per side:
median step time after warm-up -> pairs/s; tokens/s (prompt + response tokens of every sequence, the
same count for both sides); peak RSS (``VmHWM``, or peak CUDA memory on a GPU); FLOP/s as a fraction of
a dense fp32 matmul measured in the same subprocess: *executed* FLOPs (what the side actually computes:
TRL's padded rows and its log-prob head over every position; miopt's packed rows and head over the
distinct response tokens) and *useful* FLOPs (each sequence alone, causal, no padding: the same for both
sides, so its ratio is the speed ratio). Everything printed is also written as JSON (``--json``).

Assets (model folder, tokenizer, pairs file) are built once under ``--work-dir`` and reused
(``bench_assets.py``); the memory, matmul-rate and FLOP accounting is ``bench_accounting.py``'s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench_accounting import batch_accounting, matmul_gflops, rss_mb, summarise
from bench_assets import CONFIGS, ROOT, Config, prepare, training_order

TRL_LOSS = {"dpo": "sigmoid", "mio": "nca_pair"}
# --modifier choices: TRL's DPOConfig keyword and value (miopt's objective option of the same name).
MODIFIERS = {"use_weighting=true": ("use_weighting", True), "ld_alpha=0.5": ("ld_alpha", 0.5)}


# ------------------------------------------------------------------------------------------ one side


def _ids_digest(rows) -> str:
    return hashlib.sha256(json.dumps([list(map(list, r)) for r in rows]).encode()).hexdigest()[:16]


def side_trl(spec: dict) -> dict:
    import warnings

    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (in the import floor, as on miopt's side)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    imported = rss_mb()
    pairs = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines()]
    ordered = [pairs[i] for i in training_order(len(pairs), spec)]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    floor = rss_mb()
    events: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                events.append((time.perf_counter(), float(logs["loss"])))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(
            output_dir=spec["tmp"],
            report_to="none",
            beta=spec["beta"],
            loss_type=[TRL_LOSS[spec["objective"]]],
            **spec["modifiers"],
            max_length=spec["max_length"],
            per_device_train_batch_size=spec["batch_size"],
            max_steps=len(ordered) // spec["batch_size"],
            learning_rate=spec["learning_rate"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            disable_dropout=True,
            bf16=spec["bf16"],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            train_sampling_strategy="sequential",
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=spec["batch_size"],
            seed=spec["seed"],
        )
        setup = time.perf_counter()
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=Dataset.from_list(ordered),
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        trainer.remove_callback(PrinterCallback)  # no per-step printing (miopt's side prints nothing either)
        setup = time.perf_counter() - setup
        rows = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
        start = time.perf_counter()
        trainer.train()
    return {
        "ids": _ids_digest(rows),
        "train_start": start,
        "setup_seconds": setup,
        "events": events,
        "rss_floor_mb": floor,
        "rss_imports_mb": imported,
    }


def side_miopt(spec: dict) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (in the import floor, as on TRL's side)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miopt import objectives
    from miopt.data.records import PreferenceRecord
    from miopt.data.tokenize import tokenize_preferences
    from miopt.logprobs.forward import DEFAULT_CHUNK_TOKENS
    from miopt.logprobs.reference import compute_reference_logps
    from miopt.run.engine import make_accelerator
    from miopt.run.loop import LoopOptions, run_loop
    from miopt.training.preference import PreferenceData, make_step_function

    imported = rss_mb()
    pairs = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines()]
    records = [
        PreferenceRecord(p["prompt"], p["chosen"], (p["rejected"],), f"pairs:{i}")
        for i, p in enumerate(pairs)
    ]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    floor = rss_mb()
    setup = time.perf_counter()
    examples, report = tokenize_preferences(records, tokenizer, max_length=spec["max_length"])
    assert report.truncated == 0 and report.skipped == 0, report.describe()
    pad = tokenizer.pad_token_id
    accelerator = make_accelerator(spec["bf16"])
    model.to(accelerator.device)  # the reference pass on the training device, as TRL's precomputation
    reference = compute_reference_logps(
        model,
        examples,
        pad,
        batch_size=spec["batch_size"],
        chunk_tokens=DEFAULT_CHUNK_TOKENS,
        progress=False,
        accelerator=accelerator,
        packing=spec["packing"],
    )
    modifiers = spec["modifiers"]
    step = make_step_function(
        objectives.build(spec["objective"], modifiers),
        PreferenceData(examples, reference),
        beta=spec["beta"],
        pad_token_id=pad,
        chunk_tokens=DEFAULT_CHUNK_TOKENS,
        packing=spec["packing"],
        ld_alpha=modifiers.get("ld_alpha"),
    )
    setup = time.perf_counter() - setup
    options = LoopOptions(
        output_dir=spec["tmp"],
        max_steps=len(examples) // spec["batch_size"],
        batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        lr_scheduler="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        logging_steps=1,
        progress=False,
        bf16=spec["bf16"],
    )
    events: list[tuple[float, float]] = []
    start = time.perf_counter()
    run_loop(
        options,
        model=model,
        num_examples=len(examples),
        step_fn=step,
        accelerator=accelerator,
        on_log=lambda record: events.append((time.perf_counter(), record["loss"])),
    )
    order = training_order(len(examples), spec)
    rows = [(examples[i].prompt_ids, examples[i].chosen_ids, examples[i].rejected_ids[0]) for i in order]
    return {
        "ids": _ids_digest(rows),
        "train_start": start,
        "setup_seconds": setup,
        "events": events,
        "rss_floor_mb": floor,
        "rss_imports_mb": imported,
    }


def side_spec(
    config: Config,
    model_dir: Path,
    pairs_file: Path,
    *,
    threads: int,
    bf16: bool,
    modifiers: dict | None = None,
) -> dict:
    """What both sides are given (``run_side`` adds which side, its layout and its folder)."""
    return {
        "model": str(model_dir),
        "pairs": str(pairs_file),
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "objective": config.objective,
        "beta": config.beta,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "threads": threads,
        "bf16": bf16,
        "modifiers": modifiers or {},
    }


def run_side(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    before = matmul_gflops(bf16=spec["bf16"])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak of the side, not of the matmul's operands
    result = side_trl(spec) if spec["side"] == "trl" else side_miopt(spec)
    peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    after = matmul_gflops(bf16=spec["bf16"])
    result.update(
        matmul_gflops=(before + after) / 2,
        matmul_gflops_before_after=(before, after),
        peak_rss_mb=rss_mb("VmHWM"),
        peak_cuda_mb=peak_cuda_mb,
        threads=torch.get_num_threads(),
    )
    return result


# ------------------------------------------------------------------------------------------- driver


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _spawn(spec: dict, work: Path) -> dict:
    out = work / f"result-{spec['label']}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    command = [sys.executable, __file__, "--side-spec", json.dumps(spec), "--side-out", str(out)]
    subprocess.run(command, check=True, env=env, cwd=work)
    return json.loads(out.read_text())


def _versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "deepspeed": _deepspeed_version(),
    }


def _deepspeed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny")
    parser.add_argument(
        "--repeats", type=int, default=1, help="Runs of each side (alternating which goes first)."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side.")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Measured steps (after --warmup).")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--objective", choices=list(TRL_LOSS), default="dpo")
    parser.add_argument(
        "--modifier",
        action="append",
        default=[],
        choices=[*MODIFIERS],
        metavar="|".join(MODIFIERS),
        help="TRL's DPO modifier on both sides (TRL's DPOConfig name and value), repeatable.",
    )
    parser.add_argument(
        "--packing", default="shared-prompt", help="miopt's layout (shared-prompt, packed, padded)."
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision on both sides (TRL bf16=True, miopt --bf16).",
    )
    parser.add_argument("--variants", default="", help="Extra miopt layouts to time too, comma-separated.")
    parser.add_argument("--work-dir", default=None, help="Assets and results (default runs/bench/CONFIG).")
    parser.add_argument(
        "--json", default=None, help="Write every figure here (default WORK_DIR/report.json)."
    )
    parser.add_argument("--side-spec", help=argparse.SUPPRESS)
    parser.add_argument("--side-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side_spec:
        spec = json.loads(args.side_spec)
        Path(args.side_out).write_text(json.dumps(run_side(spec)))
        return 0

    base = CONFIGS[args.config]
    config = Config(
        **{
            **asdict(base),
            "batch_size": args.batch_size or base.batch_size,
            "steps": args.steps or base.steps,
            "warmup": base.warmup if args.warmup is None else args.warmup,
            "objective": args.objective,
        }
    )
    work = Path(args.work_dir or ROOT / "runs" / "bench" / config.name).resolve()
    model_dir, pairs_file = prepare(config, work)
    layouts = [args.packing] + [v for v in args.variants.split(",") if v and v != args.packing]
    accounting = {
        layout: batch_accounting(config, model_dir, pairs_file, layout, bf16=args.bf16) for layout in layouts
    }
    common = side_spec(
        config,
        model_dir,
        pairs_file,
        threads=args.threads,
        bf16=args.bf16,
        modifiers=dict(MODIFIERS[m] for m in args.modifier),
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"{config.name}: {asdict(config)}\nload average before: {_load()}", flush=True)
    if _deepspeed_version():
        print(
            "warning: deepspeed is installed; TRL's trainer imports it (miopt does not unless launched with "
            "it), which adds to TRL's peak RSS: uninstall it for a fair memory comparison",
            flush=True,
        )
    runs = []
    for repeat in range(args.repeats):
        sides = ["trl", *[f"miopt:{layout}" for layout in layouts]]
        if repeat % 2:
            sides = sides[::-1]
        figures = {"load_before": _load()}
        for side in sides:
            name, _, layout = side.partition(":")
            spec = {**common, "side": name, "packing": layout or "padded", "label": side.replace(":", "-")}
            spec["tmp"] = str(work / "tmp" / spec["label"])
            raw = _spawn(spec, work)
            figures[side] = summarise(raw, accounting[layout or args.packing], config.warmup, name)
            print(f"  repeat {repeat}: {side}: {_line(figures[side])}  (load {_load()})", flush=True)
        figures["load_after"] = _load()
        runs.append(figures)
    report = _report(config, args, layouts, runs, accounting[args.packing], started)
    out = Path(args.json or work / "report.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out}")
    return 0


def _line(f: dict) -> str:
    return (
        f"{f['pairs_per_second']:.2f} pairs/s, {f['tokens_per_second']:.0f} tok/s, "
        f"step {f['step_seconds'] * 1000:.0f} ms, peak RSS {f['peak_rss_mb']:.0f} MB, "
        f"{f['executed_gflops']:.1f} GFLOP/s = {f['executed_flops_fraction']:.0%} of matmul "
        f"({f['matmul_gflops']:.0f}), useful {f['useful_flops_fraction']:.0%}"
    )


def _report(
    config: Config, args, layouts: list[str], runs: list[dict], steps: list[dict], started: str
) -> dict:
    median = statistics.median
    sides = ["trl", *[f"miopt:{layout}" for layout in layouts]]
    table = {}
    for side in sides:
        table[side] = {
            key: median(run[side][key] for run in runs)
            for key in ("pairs_per_second", "tokens_per_second", "step_seconds", "peak_rss_mb", "rss_floor_mb", "rss_imports_mb", "rss_above_imports_mb",
                        "executed_flops_fraction", "useful_flops_fraction", "matmul_gflops", "setup_seconds",
                        "positions_per_step")
        }  # fmt: skip
    ratios = {}
    for side in sides[1:]:
        speed = [run[side]["pairs_per_second"] / run["trl"]["pairs_per_second"] for run in runs]
        memory = [run[side]["peak_rss_mb"] / run["trl"]["peak_rss_mb"] for run in runs]
        above = [run[side]["rss_above_imports_mb"] / run["trl"]["rss_above_imports_mb"] for run in runs]
        ratios[side] = {
            "memory_above_imports": above,
            "memory_above_imports_median": median(above),
            "speed": speed,
            "speed_median": median(speed),
            "memory": memory,
            "memory_median": median(memory),
        }
    checks = {}
    for side in sides[1:]:
        diffs = [max(abs(a - b) for a, b in zip(run["trl"]["losses"], run[side]["losses"])) for run in runs]
        checks[side] = {
            "same_token_ids": all(run["trl"]["ids"] == run[side]["ids"] for run in runs),
            "max_loss_difference": max(diffs),
        }
    measured = steps[config.warmup :]
    modifiers = "".join(f" + {m}" for m in args.modifier)
    print(f"\n== {config.name}: batch {config.batch_size}, {config.objective}{modifiers} (TRL {TRL_LOSS[config.objective]}), "
          f"{'bf16' if args.bf16 else 'fp32'}, {len(runs)} repeat(s), {args.threads} thread(s); "
          f"medians over repeats of per-run medians ==")  # fmt: skip
    print(f"sequence tokens/step {median(s['tokens'] for s in measured):.0f}; positions computed/step: TRL "
          f"{table['trl']['positions_per_step']:.0f}, miopt {table[sides[1]]['positions_per_step']:.0f}")  # fmt: skip
    print(
        f"{'side':22s} {'pairs/s':>9s} {'tok/s':>9s} {'peak RSS':>9s} {'>imports':>9s} {'exec FLOP':>9s} {'useful':>7s}"
    )
    for side in sides:
        row = table[side]
        print(
            f"{side:22s} {row['pairs_per_second']:9.2f} {row['tokens_per_second']:9.0f} {row['peak_rss_mb']:7.0f}MB "
            f"{row['rss_above_imports_mb']:7.0f}MB {row['executed_flops_fraction']:9.1%} {row['useful_flops_fraction']:7.1%}"
        )
    for side in sides[1:]:
        r, c = ratios[side], checks[side]
        print(
            f"{side} / trl: pairs/s x{r['speed_median']:.2f} (runs {', '.join(f'{x:.2f}' for x in r['speed'])}), "
            f"peak RSS x{r['memory_median']:.2f} (runs {', '.join(f'{x:.2f}' for x in r['memory'])}), "
            f"above imports x{r['memory_above_imports_median']:.2f}; "
            f"same token ids: {c['same_token_ids']}, max |loss diff| over steps: {c['max_loss_difference']:.1e}"
        )
    return {
        "config": asdict(config),
        "started": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "bf16": args.bf16,
        "modifiers": args.modifier,
        "versions": _versions(),
        "runs": runs,
        "medians": table,
        "ratios": ratios,
        "checks": checks,
        "steps": steps,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())

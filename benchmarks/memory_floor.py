"""The least peak RSS any torch training loop needs on a benchmark configuration.

A bare loop: no trainer library, only torch and transformers' model class. It loads the same model
folder as ``bench_vs_trl.py`` and trains on the same pairs, with a plain padded batch of chosen and
rejected rows, a next-token loss, ``backward`` and a fused AdamW step. Each figure is measured in its
own subprocess:

- the import floor: torch and transformers' Llama module;
- the bare loop's peak RSS (``VmHWM``).

If ``WORK_DIR/report.json`` from ``bench_vs_trl.py`` exists, the script also prints TRL's and miopt's
peaks against this floor. On the tiny configuration, 0.7x of TRL's peak lies below the bare loop's
peak, so no torch trainer could meet that memory target there (docs/performance.md).

    python benchmarks/memory_floor.py --config tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_accounting import rss_mb

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(
    model_dir: str, pairs_file: str, batch_size: int, steps: int, threads: int, train: bool
) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers.models.llama.modeling_llama  # noqa: F401  (the same import floor as both trainers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = rss_mb("VmRSS")
    if not train:
        return {"imports_mb": imported, "peak_mb": rss_mb("VmHWM")}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pairs = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    pad = tokenizer.pad_token_id
    for step in range(steps):
        batch = pairs[(step * batch_size) % len(pairs) :][:batch_size]
        rows = [
            tokenizer(p["prompt"] + response, add_special_tokens=False)["input_ids"]
            for p in batch
            for response in (p["chosen"], p["rejected"])
        ]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = input_ids.masked_fill(mask == 0, -100)
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"imports_mb": imported, "peak_mb": rss_mb("VmHWM")}


def _spawn(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--work-dir", default=None, help="bench_vs_trl.py's folder (default runs/bench/CONFIG)."
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model_dir, pairs_file, batch, steps, threads, train = args.child
        print(
            json.dumps(bare_loop(model_dir, pairs_file, int(batch), int(steps), int(threads), train == "1"))
        )
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_assets import CONFIGS, prepare

    config = CONFIGS[args.config]
    work = Path(args.work_dir or ROOT / "runs" / "bench" / config.name).resolve()
    model_dir, pairs_file = prepare(config, work)
    common = [str(model_dir), str(pairs_file), str(config.batch_size), str(args.steps), str(args.threads)]
    floors = [_spawn(["--child", *common, "0"])["peak_mb"] for _ in range(args.repeats)]
    loops = [_spawn(["--child", *common, "1"]) for _ in range(args.repeats)]
    floor = statistics.median(floors)
    peak = statistics.median(run["peak_mb"] for run in loops)
    print(f"{config.name}: import floor (torch + transformers' Llama) {floor:.0f} MB")
    runs = ", ".join(f"{run['peak_mb']:.0f}" for run in loops)
    print(
        f"{config.name}: bare torch loop, batch {config.batch_size}, {args.steps} steps: peak {peak:.0f} MB (runs {runs})"
    )
    report = work / "report.json"
    if report.is_file():
        medians = json.loads(report.read_text())["medians"]
        trl = medians["trl"]["peak_rss_mb"]
        print(
            f"TRL peak {trl:.0f} MB; 0.7x of it is {0.7 * trl:.0f} MB, {0.7 * trl - peak:+.0f} MB from the bare loop"
        )
        for side, row in medians.items():
            if side != "trl":
                print(
                    f"{side} peak {row['peak_rss_mb']:.0f} MB: {row['peak_rss_mb'] / peak:.2f}x the bare loop"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

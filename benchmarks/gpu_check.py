"""One prepared check of miopt on a GPU: one command, one JSON report and one log, in under 8 minutes.

    python benchmarks/gpu_check.py runs/gpu-check                 # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py runs/gpu-dry --cpu-dry-run     # the same steps at toy sizes on CPU

Steps (each in its own subprocess with its own time budget; a failure is recorded and the next step
runs; docs/gpu.md describes each and the report):

* ``cuda_tests``: ``pytest -m cuda tests/run/test_cuda.py`` (layouts against padded in fp32 and bf16, the
  fused chunked head, generation with a KV cache, ``miopt train --bf16`` with save, resume, reload);
* ``fsdp``: ``miopt train`` under Accelerate FSDP2 with one process (full state dict on save, resume)
  against the same run without FSDP: equal losses and weights;
* ``throughput``: miopt against TRL's DPOTrainer on a ~370M-parameter random Llama (32k vocabulary),
  GSM8K pairs shipped in ``benchmarks/data``, bf16, same batch and length: pairs/s, peak CUDA memory,
  MFU against this machine's measured bf16 matmul rate (``benchmarks/bench_vs_trl.py`` runs the sides);
* ``default_run``: ``miopt train`` with no arguments: wall time and its printed result.

Before the steps, wheels in ``wheels/`` (``benchmarks/gpu_wheels.sh``) whose distribution is missing
are installed with ``pip install --no-deps --no-index``. ``src/`` is put first on every child's
``PYTHONPATH``, so this tree's miopt runs whether or not it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "wheels"
SITE = ROOT / ".gpu-site"  # where missing wheels are installed (not the machine's environment)
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

from logged_run import run_logged  # noqa: E402  (benchmarks/, put on the path above)

STEPS = ("cuda_tests", "fsdp", "throughput", "default_run")
# seconds per step: on the GPU they sum to 460 s (the check's limit is 480); the dry run is toy-sized
BUDGETS = {"cuda_tests": 70, "fsdp": 130, "throughput": 150, "default_run": 110}
# the dry run's budgets only guard against a hang: a CPU shared with other jobs can be slow
DRY_BUDGETS = {"cuda_tests": 300, "fsdp": 300, "throughput": 300, "default_run": 300}


def child_env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    first = [str(ROOT / "src"), str(ROOT)] + ([str(SITE)] if SITE.is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(first + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# ------------------------------------------------------------------------------------------ wheels


def _wheel_distribution(path: Path) -> str:
    return path.name.split("-")[0].replace("_", "-").lower()


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def install_wheels(folder: Path, log: Path) -> dict:
    """Install the wheels of ``folder`` whose distribution is not installed (no index, no dependencies)
    into ``.gpu-site/``, which every child gets on its ``PYTHONPATH``: the machine's environment is left
    as it is (and a system Python that refuses pip installs, PEP 668, does not matter)."""
    if SITE.is_dir() and str(SITE) not in sys.path:  # installed there by an earlier check
        sys.path.insert(0, str(SITE))
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return {"folder": str(folder), "status": "no wheels folder" if not folder.is_dir() else "empty"}
    missing = [w for w in wheels if not _installed(_wheel_distribution(w))]
    result = {
        "folder": str(folder),
        "available": [w.name for w in wheels],
        "installed": [w.name for w in missing],
    }
    if missing:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--upgrade"]
        code, _ = run_logged([*command, "--target", str(SITE), *map(str, missing)], log, 300)
        if str(SITE) not in sys.path:
            sys.path.insert(0, str(SITE))
        result["status"] = "ok" if code == 0 else f"failed: pip exited {code} (see the log)"
    else:
        result["status"] = "ok: all present"
    return result


def install_miopt(folder: Path, log: Path) -> str:
    """``pip install --no-deps --no-index --find-links WHEELS -e .`` where miopt is not installed (the
    build backend, setuptools and wheel, comes from the wheels folder)."""
    if _installed("miopt"):
        return "ok: already installed"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--find-links", str(folder)]
    code, _ = run_logged([*command, "-e", str(ROOT)], log, 300)
    return (
        "ok: installed (editable)"
        if code == 0
        else f"failed: pip exited {code}; src/ is on PYTHONPATH instead"
    )


def versions() -> dict:
    import torch

    found = {}
    for name in ("transformers", "accelerate", "peft", "trl", "datasets", "tokenizers", "safetensors"):
        found[name] = metadata.version(name) if _installed(name) else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:  # no git on the machine
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_cores": os.cpu_count(),
        **found,
        "miopt_commit": commit.strip() or None,
    }


# ------------------------------------------------------------------------------------------- steps


def step_cuda_tests(out: Path, work: Path, dry: bool, log: Path) -> dict:
    """``pytest -m cuda tests/run/test_cuda.py``; on the dry run the same tests on the CPU."""
    xml = out / "cuda_tests.xml"
    env = child_env()
    if dry:
        env["MIOPT_TEST_DEVICE"] = "cpu"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    command += [str(ROOT / "tests" / "run" / "test_cuda.py"), f"--junitxml={xml}", "-o", "addopts="]
    sys.stdout.flush()
    completed = subprocess.run(command, cwd=ROOT, env=env)  # its output goes straight to the log
    return summarise_junit(xml, completed.returncode)


def summarise_junit(xml: Path, returncode: int) -> dict:
    import xml.etree.ElementTree as ElementTree

    if not xml.is_file():
        return {"status": f"failed: pytest exited {returncode} without a report"}
    cases = list(ElementTree.parse(xml).getroot().iter("testcase"))
    outcome = {}
    for case in cases:
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
    counts = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failure", "error", "skipped")}
    bad = sorted(n for n, v in outcome.items() if v in ("failure", "error"))
    ok = returncode == 0 and counts["passed"] > 0 and not bad
    status = "ok" if ok else f"failed: {len(bad)} failed, {counts['passed']} passed, exit {returncode}"
    return {
        "status": status,
        "passed": counts["passed"],
        "failed": counts["failure"] + counts["error"],
        "skipped": counts["skipped"],
        "failed_tests": bad,
    }


def step_fsdp(out: Path, work: Path, dry: bool, log: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped: needs CUDA (Accelerate enables FSDP only on GPUs)"}
    from gpu_fsdp import compare_fsdp_to_single

    return compare_fsdp_to_single(work / "fsdp", child_env(), log=log)


def step_throughput(out: Path, work: Path, dry: bool, log: Path) -> dict:
    from gpu_throughput import run_throughput

    return run_throughput(work / "throughput", dry=dry, partial=out / "step-throughput.partial.json")


TOY_DEFAULT = (
    "from miopt.experiments.default_run import DefaultTask, run_default; from miopt.training.preference import TrainOptions; "
    "task = DefaultTask(pool_problems=72, validation_problems=8, preference_prompts=64, heldout_problems=8, "
    "max_new_tokens=40); "
    "options = TrainOptions(progress=False, max_steps=2, batch_size=8, logging_steps=1); "
    "run_default(options, explicit={'progress', 'max_steps', 'batch_size', 'logging_steps'}, task=task)"
)
RESULT_LINE = re.compile(r"held-out accuracy \((\d+) problems, greedy")


def step_default_run(out: Path, work: Path, dry: bool, log: Path) -> dict:
    """``miopt train`` with no arguments in a fresh folder and cache; on the dry run a toy-sized task
    through the same pipeline (``run_default``)."""
    folder = work / "default_run"
    if folder.exists():  # a fresh run: no cached SFT start, no earlier output
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(child_env(), MIOPT_CACHE=str(folder / "cache"))
    command = [sys.executable, "-c", TOY_DEFAULT] if dry else [sys.executable, "-m", "miopt", "train"]
    start = time.perf_counter()
    sys.stdout.flush()
    # progress (stderr) goes straight to the log; the printed result (stdout) is kept to be read
    completed = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    print(completed.stdout)
    result = {"command": "miopt train" if not dry else "run_default(toy DefaultTask)", "wall_seconds": wall}
    match = RESULT_LINE.search(completed.stdout)
    # the printed table: from its first line to the end
    result["printed"] = completed.stdout[match.start() if match else 0 :].strip().splitlines()[-12:]
    comparison_file = folder / "runs" / "default" / "comparison.json"
    if completed.returncode != 0 or not match or not comparison_file.is_file():
        return {**result, "status": f"failed: exit {completed.returncode}, result line found: {bool(match)}"}
    comparison = json.loads(comparison_file.read_text())
    result.update(
        status="ok",
        heldout_problems=int(match.group(1)),
        pairs=comparison["pairs"],
        accuracy={name: row["heldout_accuracy"] for name, row in comparison.items() if isinstance(row, dict)},
    )
    return result


STEP_FUNCTIONS = {
    "cuda_tests": step_cuda_tests,
    "fsdp": step_fsdp,
    "throughput": step_throughput,
    "default_run": step_default_run,
}


# ------------------------------------------------------------------------------------------ driver


def run_step(name: str, out: Path, work: Path, dry: bool, budget: float, log: Path) -> dict:
    """Run step ``name`` in a child process under ``budget`` seconds; its result, or why there is none."""
    result_file = out / f"step-{name}.json"
    result_file.unlink(missing_ok=True)
    (out / f"step-{name}.partial.json").unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), str(out), "--step", name, "--log", str(log)]
    command += ["--work-dir", str(work)]
    command += ["--cpu-dry-run"] if dry else []
    code, wall = run_logged(command, log, budget, cwd=ROOT, env=child_env())
    partial = out / f"step-{name}.partial.json"
    if code is None:
        result = {"status": f"timeout: stopped after its budget of {budget:.0f} s"}
        if partial.is_file():  # what the step had finished (the throughput step writes one per side)
            result["partial"] = json.loads(partial.read_text())
    elif result_file.is_file():
        result = json.loads(result_file.read_text())
        partial.unlink(missing_ok=True)
    else:
        result = {"status": f"failed: exited {code} (traceback in the log)"}
    return {**result, "seconds": round(wall, 1), "budget_seconds": budget}


def child_main(name: str, out: Path, work: Path, dry: bool, log: Path) -> int:
    from miopt.run.atomic_io import atomic_write_json

    print(f"== step {name} ({'cpu dry run' if dry else 'gpu'}) ==", flush=True)
    result = STEP_FUNCTIONS[name](out, work, dry, log)
    atomic_write_json(out / f"step-{name}.json", result)
    print(f"== step {name}: {result['status']} ==", flush=True)
    return 0


def describe(name: str, result: dict) -> str:
    line = f"{name:12s} {result['status']}  ({result['seconds']:.0f} s of {result['budget_seconds']:.0f})"
    if name == "cuda_tests" and "passed" in result:
        line += f"\n    {result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
    if name == "fsdp" and "max_loss_difference" in result:
        line += f"\n    max loss difference {result['max_loss_difference']:.2e}, weights {result['max_weight_difference']:.2e}"
    if name == "throughput" and "sides" in result:
        for side, figures in result["sides"].items():
            line += f"\n    {side}: {figures.get('status', 'ok')}"
            if "pairs_per_second" in figures:
                memory = figures["peak_memory_mb"]
                line += f", {figures['pairs_per_second']:.2f} pairs/s, peak {memory:.0f} MB, MFU {figures['mfu']:.1%}"
    if name == "default_run" and "accuracy" in result:
        accuracies = ", ".join(f"{arm} {value:.1%}" for arm, value in result["accuracy"].items())
        line += f"\n    {accuracies}; wall {result['wall_seconds']:.0f} s"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="Folder for report.json and gpu_check.log (created).")
    parser.add_argument("--cpu-dry-run", action="store_true", help="The same steps at toy sizes on the CPU.")
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"Comma-separated subset of {', '.join(STEPS)}."
    )
    parser.add_argument(
        "--wheels", default=str(WHEELS), help="Wheels to install where missing (default wheels/)."
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Steps run at once (CPU dry run only: on the GPU they would share the device).",
    )
    parser.add_argument(
        "--work-dir",
        help="Models, checkpoints and caches of the steps (gigabytes on the GPU), kept out of "
        "OUTPUT_DIR so that the report folder stays small (default: a new temporary folder).",
    )
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out, dry = Path(args.output_dir).resolve(), args.cpu_dry_run
    if args.step:  # a step's child: the parent names the work folder and the log
        return child_main(args.step, out, Path(args.work_dir), dry, Path(args.log))
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.jobs < 1 or (args.jobs > 1 and not dry):
        parser.error(f"--jobs must be 1, or 1 to {len(STEPS)} with --cpu-dry-run, got {args.jobs}")
    import torch

    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device found: run with --cpu-dry-run for the CPU rehearsal")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="miopt-gpu-check-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text(
        f"gpu_check {'cpu dry run' if dry else 'gpu'} started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
    )
    started = time.perf_counter()
    report = {
        "mode": "cpu-dry-run" if dry else "gpu",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wheels": install_wheels(Path(args.wheels), log),
        "miopt_install": install_miopt(Path(args.wheels), log),
        "work_dir": str(work),
    }
    report["versions"] = versions()
    report["steps"] = {}
    from miopt.run.atomic_io import atomic_write_json

    budgets = DRY_BUDGETS if dry else BUDGETS
    print(f"gpu_check ({report['mode']}): {report['versions']['gpu'] or 'cpu'}; log {log}", flush=True)
    logs = {name: log if args.jobs == 1 else out / f"gpu_check.{name}.log" for name in steps}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_step, n, out, work, dry, budgets[n], logs[n]): n for n in steps}
        for future in as_completed(futures):
            report["steps"][futures[future]] = future.result()
            print(describe(futures[future], future.result()), flush=True)
            atomic_write_json(out / "report.json", report)  # a partial report survives a killed check
    report["steps"] = {name: report["steps"][name] for name in steps}
    for step_log in logs.values():  # steps run at once: their logs one after the other
        if step_log != log:
            with log.open("a") as stream:
                stream.write(step_log.read_text())
            step_log.unlink()
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(r["status"].startswith(("ok", "skipped")) for r in report["steps"].values())
    atomic_write_json(out / "report.json", report)
    print(f"total {report['total_seconds']:.0f} s; {'all steps ok' if report['ok'] else 'SOME STEPS FAILED'}")
    print(f"report: {out / 'report.json'}\nlog:    {log}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

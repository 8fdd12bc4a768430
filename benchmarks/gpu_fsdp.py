"""The FSDP step of ``gpu_check.py``: ``miopt train`` under Accelerate FSDP2 with one process against the
same run without FSDP.

Launched as ``tests/test_distributed.py`` launches its runs (``accelerate launch --config_file ...
-m miopt train``), with ``examples/accelerate/fsdp.yaml`` changed in two fields only: one process,
and ``FULL_STATE_DICT`` (checkpoints hold the whole model, gathered). Runs, each 4 steps with a
checkpoint at step 2, float32:

* ``single``: no FSDP, ``--logprob-chunk 0`` (the full-logits path FSDP takes, docs/distributed.md);
* ``fsdp``: the same under FSDP (wrapping is proven by miopt's note that FSDP shards the weights);
* ``fsdp-resumed``: the ``fsdp`` run cut after its step-2 checkpoint and resumed under FSDP.

Per-step loss, ``logps/*`` and ``grad_norm`` (relative where above 1) and the saved weights must agree:
FSDP vs single within 1e-4, the resume within 1e-5.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--learning-rate", "3e-4", "--logging-steps", "1", "--progress", "false", "--beta", "0.5",
    "--max-steps", "4", "--save-steps", "2", "--batch-size", "4", "--objective", "mio",
]  # fmt: skip
LOSS_TOLERANCE, WEIGHT_TOLERANCE, RESUME_TOLERANCE = 1e-4, 1e-4, 1e-5
KEYS = ("loss", "logps/chosen", "logps/rejected", "grad_norm")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_process_config(target: Path) -> Path:
    """``examples/accelerate/fsdp.yaml`` for one process with full state dicts."""
    import yaml

    config = yaml.safe_load((ROOT / "examples" / "accelerate" / "fsdp.yaml").read_text())
    config["num_processes"] = 1
    config["fsdp_config"]["fsdp_state_dict_type"] = "FULL_STATE_DICT"
    target.write_text(yaml.safe_dump(config))
    return target


def _assets(work: Path) -> tuple[Path, Path]:
    from bench_vs_trl import _tiny_pairs

    from miopt.builtin import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model_dir, data = work / "model", work / "pairs.jsonl"
    build_model(tokenizer, hidden_size=256, num_layers=4, num_heads=4, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.write_text("".join(json.dumps(p) + "\n" for p in _tiny_pairs(24, seed=0)))
    return model_dir, data


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _max_difference(a: list[dict], b: list[dict], keys=KEYS) -> float:
    """Largest difference over steps and ``keys``, relative to the value where that is above 1
    (summed log-probs are tens of nats)."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return float("inf")
    return max(abs(x[k] - y[k]) / max(1.0, abs(x[k])) for x, y in zip(a, b) for k in keys)


def _weights_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if first.keys() != second.keys():
        return float("inf")
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def compare_fsdp_to_single(work: Path, env: dict, log: Path) -> dict:
    from gpu_check import run_logged

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    model_dir, data = _assets(work)
    config = one_process_config(work / "fsdp_one_process.yaml")

    def train(output: str, *extra: str, launcher: list[str] | None = None) -> int | None:
        args = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(work / output)]
        args += ["--cache-dir", str(work / f"cache-{output}"), *COMMON, *extra]
        command = [sys.executable, *(launcher or []), "-m", "miopt", *args]
        code, _ = run_logged(command, log, timeout=240, cwd=ROOT, env=env)
        return code

    launch = ["-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1"]
    result = {"config": "examples/accelerate/fsdp.yaml, num_processes 1, FULL_STATE_DICT", "runs": {}}
    result["runs"]["single"] = train("single", "--logprob-chunk", "0")
    result["runs"]["fsdp"] = train("fsdp", launcher=[*launch, "--main_process_port", str(_free_port())])
    if result["runs"]["fsdp"] == 0:
        resumed = work / "fsdp-resumed"
        resumed.mkdir()
        shutil.copytree(work / "fsdp" / "checkpoint-0000002", resumed / "checkpoint-0000002")
        rows = [row for row in _metrics(work / "fsdp") if row["step"] <= 2]
        (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        port = ["--main_process_port", str(_free_port())]
        result["runs"]["fsdp-resumed"] = train("fsdp-resumed", "--resume", launcher=[*launch, *port])
    if any(code != 0 for code in result["runs"].values()) or len(result["runs"]) < 3:
        return {**result, "status": f"failed: exit codes {result['runs']} (see the log)"}
    wrapped = "FSDP shards weights" in log.read_text()
    single, fsdp, resumed = (_metrics(work / n) for n in ("single", "fsdp", "fsdp-resumed"))
    result.update(
        wrapped_by_fsdp=wrapped,
        checkpoint_files=sorted(p.name for p in (work / "fsdp" / "checkpoint-0000002").iterdir()),
        losses_single=[r["loss"] for r in single],
        losses_fsdp=[r["loss"] for r in fsdp],
        max_loss_difference=_max_difference(single, fsdp, keys=("loss",)),
        max_metric_difference=_max_difference(single, fsdp),
        max_weight_difference=_weights_difference(work / "single", work / "fsdp"),
        max_resume_difference=_max_difference(fsdp, resumed),
        resume_weight_difference=_weights_difference(work / "fsdp", work / "fsdp-resumed"),
        weights_moved=_weights_difference(model_dir, work / "fsdp"),
    )
    agree = (
        result["max_metric_difference"] <= LOSS_TOLERANCE
        and result["max_weight_difference"] <= WEIGHT_TOLERANCE
        and result["max_resume_difference"] <= RESUME_TOLERANCE
        and result["resume_weight_difference"] <= WEIGHT_TOLERANCE
        and result["weights_moved"] > 1e-4
    )
    result["tolerances"] = {"loss": LOSS_TOLERANCE, "weights": WEIGHT_TOLERANCE, "resume": RESUME_TOLERANCE}
    result["status"] = "ok" if agree and wrapped else "failed: FSDP and single runs differ or no FSDP note"
    return result

"""The FSDP step of ``gpu_check.py``: ``miopt train`` under Accelerate FSDP2 with one process against the
same run without FSDP.

Launched as ``tests/run/test_distributed.py`` launches its runs (``accelerate launch --config_file ...
-m miopt train``), with ``examples/accelerate/fsdp.yaml`` changed to one process, in two variants:
checkpoints as ``FULL_STATE_DICT`` (gathered) and as the shipped ``SHARDED_STATE_DICT``. The final
model is saved from the full state dict in both (miopt gathers it). Runs, each 4 steps with a
checkpoint at step 2, float32:

* ``single``: no FSDP, ``--logprob-chunk 0`` (the full-logits path FSDP takes, docs/distributed.md);
* per variant, ``fsdp-V``: the same under FSDP (wrapping is proven by miopt's note that FSDP shards
  the weights), and ``fsdp-V-resumed``: that run cut after its step-2 checkpoint and resumed.

Per-step loss, ``logps/*`` and ``grad_norm`` (relative where above 1) and the saved weights must agree:
FSDP against the run without it within 1e-4, the resume within 1e-5.
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
# checkpoints gathered whole (the final save always is: miopt gathers the full state dict), and the
# shipped config's sharded checkpoints (torch.distributed.checkpoint)
VARIANTS = {"full": "FULL_STATE_DICT", "sharded": "SHARDED_STATE_DICT"}
KEYS = ("loss", "logps/chosen", "logps/rejected", "grad_norm")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_process_config(target: Path, state_dict_type: str) -> Path:
    """``examples/accelerate/fsdp.yaml`` for one process, with checkpoints of ``state_dict_type``."""
    import yaml

    config = yaml.safe_load((ROOT / "examples" / "accelerate" / "fsdp.yaml").read_text())
    config["num_processes"] = 1
    config["fsdp_config"]["fsdp_state_dict_type"] = state_dict_type
    target.write_text(yaml.safe_dump(config))
    return target


def _assets(work: Path) -> tuple[Path, Path]:
    from bench_assets import tiny_pairs

    from miopt.model.builtin import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model_dir, data = work / "model", work / "pairs.jsonl"
    build_model(tokenizer, hidden_size=256, num_layers=4, num_heads=4, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.write_text("".join(json.dumps(p) + "\n" for p in tiny_pairs(24, seed=0)))
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
    from logged_run import run_logged

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    model_dir, data = _assets(work)

    def train(output: str, *extra: str, launcher: list[str] | None = None) -> tuple[int | None, str]:
        """Exit status and what the run printed (its part of the log)."""
        args = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(work / output)]
        args += ["--cache-dir", str(work / f"cache-{output}"), *COMMON, *extra]
        before = log.stat().st_size if log.exists() else 0
        code, _ = run_logged(
            [sys.executable, *(launcher or []), "-m", "miopt", *args], log, 240, cwd=ROOT, env=env
        )
        with log.open() as stream:
            stream.seek(before)
            return code, stream.read()

    code, _ = train("single", "--logprob-chunk", "0")
    if code != 0:
        return {"status": f"failed: the run without FSDP exited {code} (see the log)"}
    result = {"variants": {}}
    for name, state_dict_type in VARIANTS.items():
        config = one_process_config(work / f"fsdp-{name}.yaml", state_dict_type)
        launch = ["-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1"]
        result["variants"][name] = _variant(work, f"fsdp-{name}", model_dir, launch, train)
        result["variants"][name]["fsdp_state_dict_type"] = state_dict_type
    variants = result["variants"].values()
    if all("max_metric_difference" in v for v in variants):
        for key in ("max_loss_difference", "max_metric_difference", "max_weight_difference"):
            result[key] = max(v[key] for v in variants)
    failed = [f"{n}: {v['status']}" for n, v in result["variants"].items() if v["status"] != "ok"]
    result["status"] = "ok" if not failed else "failed: " + "; ".join(failed)
    return result


def _variant(work: Path, output: str, model_dir: Path, launch: list[str], train) -> dict:
    """One FSDP run, its resume from the step-2 checkpoint, and their differences from ``single``."""
    code, printed = train(output, launcher=[*launch, "--main_process_port", str(_free_port())])
    if code != 0:
        return {"status": f"failed: the FSDP run exited {code} (see the log)"}
    resumed = work / f"{output}-resumed"
    resumed.mkdir()
    shutil.copytree(work / output / "checkpoint-0000002", resumed / "checkpoint-0000002")
    rows = [row for row in _metrics(work / output) if row["step"] <= 2]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = ["--main_process_port", str(_free_port())]
    code, _ = train(resumed.name, "--resume", launcher=[*launch, *port])
    if code != 0:
        return {"status": f"failed: the resumed FSDP run exited {code} (see the log)"}
    single, fsdp, again = (_metrics(work / n) for n in ("single", output, resumed.name))
    result = {
        "wrapped_by_fsdp": "FSDP shards weights" in printed,
        "checkpoint_files": sorted(p.name for p in (work / output / "checkpoint-0000002").iterdir()),
        "losses_single": [r["loss"] for r in single],
        "losses_fsdp": [r["loss"] for r in fsdp],
        "max_loss_difference": _max_difference(single, fsdp, keys=("loss",)),
        "max_metric_difference": _max_difference(single, fsdp),
        "max_weight_difference": _weights_difference(work / "single", work / output),
        "max_resume_difference": _max_difference(fsdp, again),
        "resume_weight_difference": _weights_difference(work / output, resumed),
        "weights_moved": _weights_difference(model_dir, work / output),
    }
    agree = (
        result["max_metric_difference"] <= LOSS_TOLERANCE
        and result["max_weight_difference"] <= WEIGHT_TOLERANCE
        and result["max_resume_difference"] <= RESUME_TOLERANCE
        and result["resume_weight_difference"] <= WEIGHT_TOLERANCE
        and result["weights_moved"] > 1e-4
    )
    result["tolerances"] = {"loss": LOSS_TOLERANCE, "weights": WEIGHT_TOLERANCE, "resume": RESUME_TOLERANCE}
    if not result["wrapped_by_fsdp"]:
        result["status"] = "failed: no FSDP note (the run was not wrapped)"
    else:
        result["status"] = "ok" if agree else "failed: FSDP and the run without it differ"
    return result

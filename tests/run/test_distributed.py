"""Several processes on CPU (gloo): DDP equals one process on the same global batch, the sharded
reference pass equals the single-process one, files are written once, resume works under two
processes and on another process count; FSDP on CPU is refused (Accelerate does not support it);
the shipped Accelerate configs and recipes parse.

The multi-process runs go through the shipped ``examples/accelerate/ddp.yaml`` with
``accelerate launch --num_processes 2`` as a subprocess; they share one set of runs (module fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from miopt.cli import main
from tests.helpers import read_metrics

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = ROOT / "examples" / "accelerate"
RECIPES = ROOT / "examples" / "recipes"

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

# Global batch 4 per micro-step, 2 micro-steps per optimizer step, a checkpoint at step 2 of 4.
COMMON = (
    "--learning-rate", "1e-3", "--logging-steps", "1", "--progress", "false", "--beta", "0.5",
    "--max-steps", "4", "--save-steps", "2", "--gradient-accumulation-steps", "2", "--objective", "mio",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(model_dir, data, output, cache, batch_size, *extra):
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(output),
        "--cache-dir", str(cache), "--batch-size", str(batch_size), *COMMON, *extra,
    ]  # fmt: skip


def _launch(args, config="ddp.yaml", processes=2) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file examples/accelerate/<config> --num_processes N -m miopt ...``."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
        "--num_processes", str(processes), "--main_process_port", str(_free_port()), "-m", "miopt", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _interrupted_copy(source: Path, target: Path, step: int) -> Path:
    """What a run killed after its step-``step`` checkpoint leaves: the checkpoint and the metrics so far."""
    target.mkdir(parents=True)
    name = f"checkpoint-{step:07d}"
    shutil.copytree(source / name, target / name)
    rows = [row for row in read_metrics(source) if row["step"] <= step]
    (target / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run (batch 4), the same run on 2 processes (batch 2 each), a resume of the
    2-process run from its step-2 checkpoint under 2 processes, and one under 1 process."""
    from miopt.model.builtin import build_model, build_tokenizer
    from tests.conftest import write_pairs

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = build_tokenizer()
    model_dir = root / "model"
    build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_pairs(root / "pairs.jsonl")
    folders = SimpleNamespace(root=root, model=model_dir, data=data)

    folders.single = root / "single"
    assert main(_train_args(model_dir, data, folders.single, root / "cache-single", 4)) == 0

    folders.ddp = root / "ddp"
    launched = _launch(_train_args(model_dir, data, folders.ddp, root / "cache-ddp", 2))
    assert launched.returncode == 0, launched.stderr[-4000:]
    folders.ddp_log = launched.stderr

    folders.resumed_ddp = _interrupted_copy(folders.ddp, root / "resumed-ddp", 2)
    args = _train_args(model_dir, data, folders.resumed_ddp, root / "cache-ddp", 2, "--resume")
    launched = _launch(args)
    assert launched.returncode == 0, launched.stderr[-4000:]

    folders.resumed_one = _interrupted_copy(folders.ddp, root / "resumed-one", 2)
    args = _train_args(model_dir, data, folders.resumed_one, root / "cache-ddp", 4, "--resume")
    assert main(args) == 0
    return folders


def _assert_same_run(expected: Path, actual: Path, *, loss_tol: float, weight_tol: float) -> None:
    expected_rows, actual_rows = read_metrics(expected), read_metrics(actual)
    assert [row["step"] for row in actual_rows] == [row["step"] for row in expected_rows] == [1, 2, 3, 4]
    for a, b in zip(expected_rows, actual_rows):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=loss_tol, abs=loss_tol), (a["step"], key)
    expected_weights, actual_weights = (
        load_file(expected / "model.safetensors"),
        load_file(actual / "model.safetensors"),
    )
    assert expected_weights.keys() == actual_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[name], tensor, rtol=0, atol=weight_tol, msg=name)


SFT_COMMON = (
    "--learning-rate", "1e-3", "--logging-steps", "1", "--progress", "false", "--max-steps", "4",
    "--gradient-accumulation-steps", "2",
)  # fmt: skip


def _sft_args(model_dir, data, output, batch_size, *extra):
    return [
        "sft", "--model", str(model_dir), "--data", str(data), "--output-dir", str(output),
        "--batch-size", str(batch_size), *SFT_COMMON, *extra,
    ]  # fmt: skip


def _write_sft_data(pairs: Path, path: Path) -> Path:
    """Prompt/completion records: the chosen solutions of the pairs file."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    path.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows)
    )
    return path


def assert_same_sft_run(model: Path, data: Path, root: Path, config: str, *extra: str) -> None:
    """``miopt sft`` on 2 processes under ``config`` (batch 2 each) equals 1 process (batch 4): per-step
    losses and the saved weights, written once (the summary names the run's step count)."""
    single, launched_dir = root / "sft-single", root / "sft-launched"
    assert main(_sft_args(model, data, single, 4, *extra)) == 0
    launched = _launch(_sft_args(model, data, launched_dir, 2), config=config)
    assert launched.returncode == 0, launched.stderr[-4000:]
    expected_rows, actual_rows = read_metrics(single), read_metrics(launched_dir)
    assert [row["step"] for row in actual_rows] == [row["step"] for row in expected_rows] == [1, 2, 3, 4]
    for a, b in zip(expected_rows, actual_rows):
        for key in ("loss", "logps/completion", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    expected, actual = load_file(single / "model.safetensors"), load_file(launched_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=5e-5, msg=name)
    assert json.loads((launched_dir / "summary.json").read_text())["steps"] == 4


@needs_gloo
def test_ddp_sft_matches_one_process_on_the_same_global_batch(runs, tmp_path):
    data = _write_sft_data(runs.data, tmp_path / "sft.jsonl")
    assert_same_sft_run(runs.model, data, tmp_path, "ddp.yaml")


@needs_gloo
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(runs):
    # Measured here: per-step losses within 1e-6, weights within 1e-5 (float32 reduction order).
    _assert_same_run(runs.single, runs.ddp, loss_tol=1e-5, weight_tol=5e-5)
    summary = json.loads((runs.ddp / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["reference_cached"] is False
    # The weights really moved (otherwise equality would prove nothing).
    start = load_file(runs.model / "model.safetensors")
    final = load_file(runs.ddp / "model.safetensors")
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-4


@needs_gloo
def test_sharded_reference_pass_equals_single_process_and_files_are_written_once(runs):
    single = sorted((runs.root / "cache-single" / "reference").iterdir())
    sharded = sorted((runs.root / "cache-ddp" / "reference").iterdir())
    assert len(single) == len(sharded) == 1 and single[0].name == sharded[0].name
    expected, actual = load_file(single[0]), load_file(sharded[0])
    for key in ("chosen", "rejected"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-4)
    assert not [p for p in sharded[0].parent.iterdir() if p.name.startswith(".")]  # no stray temp file
    # One line per step (not one per process), one checkpoint with one copy of the weights.
    assert len((runs.ddp / "metrics.jsonl").read_text().splitlines()) == 4
    checkpoint = runs.ddp / "checkpoint-0000002"
    assert sorted(p.name for p in runs.ddp.iterdir() if p.name.startswith("checkpoint-")) == [checkpoint.name]
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files.count("model.safetensors") == 1 and "optimizer.bin" in files
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files)
    assert runs.ddp_log.count("reference log-probs: computed and cached") == 1
    assert runs.ddp_log.count("data: 24 records") == 1


@needs_gloo
def test_resume_under_two_processes_continues_exactly(runs):
    _assert_same_run(runs.ddp, runs.resumed_ddp, loss_tol=1e-6, weight_tol=1e-6)
    summary = json.loads((runs.resumed_ddp / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["reference_cached"] is True


@needs_gloo
def test_two_process_checkpoint_resumes_on_one_process(runs):
    _assert_same_run(runs.ddp, runs.resumed_one, loss_tol=1e-5, weight_tol=5e-5)
    assert json.loads((runs.resumed_one / "summary.json").read_text())["resumed_from_step"] == 2


@needs_gloo
def test_fsdp_config_on_cpu_is_refused_not_run_as_ddp(runs, tmp_path):
    """Accelerate enables FSDP only on GPUs; on CPU it would silently run DDP. miopt stops instead."""
    args = _train_args(runs.model, runs.data, tmp_path / "fsdp", tmp_path / "cache", 2)
    launched = _launch(args, config="fsdp.yaml")
    assert launched.returncode != 0
    assert "miopt train: error: FSDP was requested" in launched.stderr
    assert not (tmp_path / "fsdp" / "metrics.jsonl").exists()


def test_sharded_engines_take_the_full_logits_path():
    from accelerate.utils import DistributedType

    from miopt.run.engine import shards_parameters

    def fake(kind, stage=None):
        plugin = SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    assert shards_parameters(fake(DistributedType.FSDP))
    assert shards_parameters(fake(DistributedType.DEEPSPEED, 3))
    assert not shards_parameters(fake(DistributedType.DEEPSPEED, 2))
    assert not shards_parameters(fake(DistributedType.MULTI_GPU))
    assert not shards_parameters(fake(DistributedType.MULTI_CPU))
    assert not shards_parameters(fake(DistributedType.NO))


@pytest.mark.parametrize("name", sorted(p.name for p in ACCELERATE_CONFIGS.glob("*.yaml")))
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert config.mixed_precision == "no"  # miopt's --bf16 decides
    if config.distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] in (2, 3)
        if config.deepspeed_config["zero_stage"] == 3:
            assert config.deepspeed_config["zero3_init_flag"] is False
            assert config.deepspeed_config["zero3_save_16bit_model"] is True
    if config.distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard


def test_shipped_config_set_is_complete():
    names = {p.name for p in ACCELERATE_CONFIGS.glob("*.yaml")}
    assert {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"} <= names
    assert len(list(RECIPES.glob("*.yaml"))) >= 2


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipes_are_valid_train_configs(name):
    from miopt.config import resolve
    from miopt.training.option_checks import check_train_options
    from miopt.training.preference import TrainOptions

    options = resolve(TrainOptions, {"config": str(RECIPES / name)})
    check_train_options(options)
    assert options.model and options.data and options.output_dir

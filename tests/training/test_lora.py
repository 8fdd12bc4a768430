"""LoRA through peft: the reference is the base with adapters disabled, --merge-lora saves base + delta,
4-bit loading fails clearly where bitsandbytes or CUDA is missing, and LoRA runs under DDP."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from miopt.cli import main
from tests.helpers import read_metrics

TARGETS = ("q_proj", "v_proj")


def _train_args(model_dir, data, output, *extra):
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(output),
        "--batch-size", "4", "--learning-rate", "1e-2", "--logging-steps", "1", "--progress", "false",
        "--beta", "0.5", "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", *TARGETS, *extra,
    ]  # fmt: skip


def _examples(tokenizer, pairs_file):
    from miopt.data import load_preference_records
    from miopt.data.tokenize import tokenize_preferences

    records, _ = load_preference_records(str(pairs_file), tokenizer)
    examples, _ = tokenize_preferences(records, tokenizer, max_length=256)
    return examples[:12]


def test_reference_with_adapters_disabled_equals_base_model(tiny_model, tokenizer, pairs_file):
    from miopt.data.tokenize import collate
    from miopt.logprobs.forward import pair_logps
    from miopt.logprobs.reference import compute_reference_logps, on_the_fly_reference
    from miopt.training.preference import TrainOptions, apply_lora

    examples = _examples(tokenizer, pairs_file)
    base = copy.deepcopy(tiny_model).eval()
    policy = apply_lora(tiny_model, TrainOptions(lora_r=4, lora_target_modules=list(TARGETS))).eval()
    with torch.no_grad():  # trained-looking adapters: B is zero at initialisation
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    pad = tokenizer.pad_token_id

    expected = compute_reference_logps(base, examples, pad, batch_size=5, progress=False)
    with policy.disable_adapter():
        disabled = compute_reference_logps(policy, examples, pad, batch_size=5, progress=False)
    enabled = compute_reference_logps(policy, examples, pad, batch_size=5, progress=False)
    torch.testing.assert_close(disabled.chosen, expected.chosen, rtol=0, atol=1e-4)
    torch.testing.assert_close(disabled.rejected, expected.rejected, rtol=0, atol=1e-4)
    assert (enabled.chosen - expected.chosen).abs().max() > 1e-2, "the adapters do not change the model"

    # The on-the-fly reference of LoRA training (policy, adapters off) is the base model too.
    batch = collate(examples[:6], pad)
    chosen, rejected = on_the_fly_reference(policy, None, batch, chunk_tokens=16)
    base_logps = pair_logps(base, batch, chunk_tokens=0)
    torch.testing.assert_close(chosen, base_logps.chosen.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(rejected, base_logps.rejected.detach(), rtol=0, atol=1e-4)
    assert all(not p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)


def test_precomputed_and_on_the_fly_lora_reference_agree(small_model_dir, pairs_file, tmp_path):
    extra = ("--max-steps", "3", "--objective", "dpo")
    assert main(_train_args(small_model_dir, pairs_file, tmp_path / "pre", *extra)) == 0
    fly = ("--reference", "on-the-fly")
    assert main(_train_args(small_model_dir, pairs_file, tmp_path / "fly", *extra, *fly)) == 0
    for a, b in zip(read_metrics(tmp_path / "pre"), read_metrics(tmp_path / "fly")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["logps/chosen_change"] == pytest.approx(b["logps/chosen_change"], abs=1e-4)


def test_merge_lora_saves_base_plus_adapter_delta(small_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    extra = ("--max-steps", "3", "--reference", "on-the-fly")
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert main(_train_args(small_model_dir, pairs_file, adapter_dir, *extra)) == 0
    assert main(_train_args(small_model_dir, pairs_file, merged_dir, *extra, "--merge-lora")) == 0

    assert not (merged_dir / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).state_dict()
    base = AutoModelForCausalLM.from_pretrained(small_model_dir).state_dict()
    assert merged.keys() == base.keys() and not any("lora" in key for key in merged)

    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    scaling = 8 / 4  # lora_alpha / r
    expected = {key: value.clone() for key, value in base.items()}
    modules = {key.split(".lora_")[0] for key in adapter}
    assert len(modules) == 2 * 2  # q_proj and v_proj of 2 layers
    for module in modules:
        a, b = adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"]
        key = module.removeprefix("base_model.model.") + ".weight"
        expected[key] = base[key] + scaling * (b @ a)
        assert (b @ a).abs().max() > 1e-4, "training did not move the adapters"
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, rtol=0, atol=1e-6, msg=key)
    assert json.loads((merged_dir / "summary.json").read_text())["options"]["merge_lora"] is True


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(),
    reason="bitsandbytes and CUDA are present: 4-bit loading is possible here",
)
def test_load_in_4bit_fails_clearly_without_bitsandbytes_or_cuda(
    small_model_dir, pairs_file, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(_train_args(small_model_dir, pairs_file, out, "--max-steps", "1", "--load-in-4bit")) == 2
    error = capsys.readouterr().err
    assert "--load-in-4bit needs bitsandbytes and a CUDA GPU" in error
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in error
    assert not out.exists()


def test_load_in_4bit_needs_lora_and_refuses_merge(small_model_dir, pairs_file, tmp_path, capsys):
    args = ["train", "--model", str(small_model_dir), "--data", str(pairs_file), "--output-dir",
            str(tmp_path / "run"), "--load-in-4bit"]  # fmt: skip
    assert main(args) == 2
    assert "--load-in-4bit needs --lora-r > 0" in capsys.readouterr().err
    assert (
        main(_train_args(small_model_dir, pairs_file, tmp_path / "run", "--load-in-4bit", "--merge-lora"))
        == 2
    )
    assert "--merge-lora with --load-in-4bit" in capsys.readouterr().err


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)
def test_lora_under_two_processes_matches_one_process(small_model_dir, pairs_file, tmp_path):
    """Frozen base under DDP, adapters disabled inside the DDP-wrapped model for the reference."""
    from tests.run.test_distributed import _launch

    extra = ("--max-steps", "2", "--reference", "on-the-fly", "--cache-dir", str(tmp_path / "cache"))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(_train_args(small_model_dir, pairs_file, single, *extra)) == 0
    args = _train_args(small_model_dir, pairs_file, ddp, *extra)
    args[args.index("--batch-size") + 1] = "2"
    launched = _launch(args)
    assert launched.returncode == 0, launched.stderr[-4000:]
    rows_single, rows_ddp = read_metrics(single), read_metrics(ddp)
    assert rows_ddp[0]["loss"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    for a, b in zip(rows_single, rows_ddp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
    expected, actual = (
        load_file(single / "adapter_model.safetensors"),
        load_file(ddp / "adapter_model.safetensors"),
    )
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=5e-5, msg=name)

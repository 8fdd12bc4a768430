"""End to end: ``miopt train`` on a small file, exact resume, the reference cache, LoRA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from miopt.cli import main
from tests.helpers import read_metrics, train_args

METRIC_NAMES = {
    "step",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "mi_bound",
    "grad_weight/chosen",
    "grad_weight/rejected",
    "lr",
    "grad_norm",
    "pairs_per_second",
}


def test_train_writes_a_loadable_checkpoint_metrics_summary_and_curves(small_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert main(train_args(small_model_dir, pairs_file, out, "--max-steps", "4", "--objective", "mio")) == 0
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert METRIC_NAMES <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "mio" and summary["steps"] == 4
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(small_model_dir)
    changed = any(
        not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values())
    )
    assert changed, "training did not change the weights"


def test_mio_first_step_has_log4_loss_and_theory_gradient_weights(small_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(small_model_dir, pairs_file, out, "--max-steps", "1")) == 0
    first = read_metrics(out)[0]
    # At step 1 the policy equals the reference: T = 0, loss log 4, weights 1/4 and 1/4.
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    assert first["grad_weight/chosen"] == pytest.approx(0.25, abs=1e-5)
    assert first["grad_weight/rejected"] == pytest.approx(0.25, abs=1e-5)


def test_resume_continues_exactly(small_model_dir, pairs_file, tmp_path, monkeypatch):
    import miopt.training.preference as train_module

    args = (
        "--max-steps",
        "6",
        "--save-steps",
        "3",
        "--objective",
        "dpo",
        "--gradient-accumulation-steps",
        "2",
    )
    full = tmp_path / "full"
    assert main(train_args(small_model_dir, pairs_file, full, *args)) == 0

    original = train_module.make_step_function
    calls = {"n": 0}

    def interrupted(*a, **k):
        step = original(*a, **k)

        def wrapped(model, indices):
            calls["n"] += 1
            if calls["n"] > 8:  # micro-steps of 4 optimizer steps: killed after the step-3 checkpoint
                raise KeyboardInterrupt
            return step(model, indices)

        return wrapped

    part = tmp_path / "part"
    monkeypatch.setattr(train_module, "make_step_function", interrupted)
    assert main(train_args(small_model_dir, pairs_file, part, *args)) == 130
    monkeypatch.setattr(train_module, "make_step_function", original)
    assert (part / "checkpoint-0000003").is_dir() and not (part / "model.safetensors").exists()
    assert main(train_args(small_model_dir, pairs_file, part, *args, "--resume")) == 0

    full_rows, part_rows = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in part_rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full_rows, part_rows):
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    full_weights, part_weights = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    for name, tensor in full_weights.items():
        torch.testing.assert_close(part_weights[name], tensor, rtol=0, atol=1e-6)


def test_resume_may_raise_max_steps_under_a_constant_schedule(small_model_dir, pairs_file, tmp_path, capsys):
    """A run of 3 steps extended to 6 by --resume equals a run of 6 when the learning rate does not depend
    on --max-steps (constant, no warmup); with a decaying schedule the extension is refused."""
    constant = (
        "--objective",
        "dpo",
        "--save-steps",
        "3",
        "--lr-scheduler",
        "constant",
        "--warmup-ratio",
        "0",
    )
    full, extended = tmp_path / "full", tmp_path / "extended"
    assert main(train_args(small_model_dir, pairs_file, full, *constant, "--max-steps", "6")) == 0
    assert main(train_args(small_model_dir, pairs_file, extended, *constant, "--max-steps", "3")) == 0
    assert (
        main(train_args(small_model_dir, pairs_file, extended, *constant, "--max-steps", "6", "--resume"))
        == 0
    )
    assert json.loads((extended / "run.json").read_text())["max_steps"] == 6
    assert [row["loss"] for row in read_metrics(extended)] == [row["loss"] for row in read_metrics(full)]
    full_weights, extended_weights = (
        load_file(full / "model.safetensors"),
        load_file(extended / "model.safetensors"),
    )
    assert all(torch.equal(extended_weights[name], tensor) for name, tensor in full_weights.items())
    capsys.readouterr()
    # Shrinking it, or growing it under a linear decay, changes the run: refused, with the rule.
    assert (
        main(train_args(small_model_dir, pairs_file, extended, *constant, "--max-steps", "5", "--resume"))
        == 2
    )
    assert "--max-steps 6 -> 5" in capsys.readouterr().err
    decaying = tmp_path / "decaying"
    assert (
        main(train_args(small_model_dir, pairs_file, decaying, "--objective", "dpo", "--max-steps", "3")) == 0
    )
    capsys.readouterr()
    args = train_args(
        small_model_dir, pairs_file, decaying, "--objective", "dpo", "--max-steps", "6", "--resume"
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--max-steps 3 -> 6" in err and "may only grow, under --lr-scheduler constant" in err


def test_checkpoints_of_a_tied_embedding_model_log_no_shared_tensor_warning(
    small_model_dir, pairs_file, tmp_path, caplog
):
    """Accelerate warns at every checkpoint that it left a tied head out of the file; the tie is the
    model's own and resume restores it, so the warning is dropped (and only that one)."""
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(small_model_dir).config.tie_word_embeddings
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        args = train_args(small_model_dir, pairs_file, out, "--max-steps", "2", "--save-steps", "1")
        assert main(args) == 0
    assert list(out.glob("checkpoint-*"))  # written (and the warning would have come with each)
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_second_run_reads_reference_cache_without_loading_reference_model(
    small_model_dir, pairs_file, tmp_path, monkeypatch
):
    import miopt.model.loading as models

    ref_dir = tmp_path / "ref"
    shutil.copytree(small_model_dir, ref_dir)
    loaded = []
    original = models.load_model

    def counting(path, *a, **k):
        loaded.append(str(path))
        return original(path, *a, **k)

    monkeypatch.setattr(models, "load_model", counting)
    args = ("--max-steps", "1", "--ref-model", str(ref_dir))
    assert main(train_args(small_model_dir, pairs_file, tmp_path / "a", *args)) == 0
    assert str(ref_dir) in loaded
    loaded.clear()
    assert main(train_args(small_model_dir, pairs_file, tmp_path / "b", *args)) == 0
    assert str(ref_dir) not in loaded
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["reference_cached"] is True
    first_a, first_b = read_metrics(tmp_path / "a")[0], read_metrics(tmp_path / "b")[0]
    assert first_a["loss"] == pytest.approx(first_b["loss"], rel=1e-6)


def test_on_the_fly_reference_matches_precomputed(small_model_dir, pairs_file, tmp_path):
    base = ("--max-steps", "3", "--objective", "dpo")
    assert main(train_args(small_model_dir, pairs_file, tmp_path / "pre", *base)) == 0
    assert (
        main(train_args(small_model_dir, pairs_file, tmp_path / "fly", *base, "--reference", "on-the-fly"))
        == 0
    )
    for a, b in zip(read_metrics(tmp_path / "pre"), read_metrics(tmp_path / "fly")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_lora_changes_only_adapters_and_reference_is_base(small_model_dir, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    extra = ("--max-steps", "3", "--lora-r", "4", "--lora-target-modules", "q_proj", "v_proj",
             "--reference", "on-the-fly")  # fmt: skip
    assert main(train_args(small_model_dir, pairs_file, out, *extra)) == 0
    first = read_metrics(out)[0]
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    base = AutoModelForCausalLM.from_pretrained(small_model_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, out)
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert adapters and any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)
    merged_base = model.get_base_model().state_dict()
    for name, tensor in reference.items():
        key = name if name in merged_base else name.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(merged_base[key], tensor)


def test_chosen_decline_warning(small_model_dir, pairs_file, tmp_path, capsys):
    extra = (
        "--max-steps",
        "8",
        "--objective",
        "dpo",
        "--learning-rate",
        "2e-2",
        "--chosen-decline-warning",
        "0.5",
    )
    assert main(train_args(small_model_dir, pairs_file, tmp_path / "run", *extra)) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = read_metrics(tmp_path / "run")
    declined = [r["step"] for r in rows if r["logps/chosen_change"] < -0.5]
    assert declined, "the setting did not make the chosen log-prob decline; the test needs a harsher one"
    assert summary["chosen_decline_warning_step"] == declined[0]
    assert "WARNING" in capsys.readouterr().err


def test_several_rejected_per_prompt_and_yaml_config(small_model_dir, tmp_path):
    from tests.conftest import write_pairs

    data = write_pairs(tmp_path / "multi.jsonl", count=12, rejected_per_prompt=3)
    config = tmp_path / "run.yaml"
    config.write_text("objective: dpo\nbeta: 0.3\nmax_steps: 2\nlearning_rate: 1.0e-3\n")
    out = tmp_path / "run"
    args = train_args(small_model_dir, data, out, "--config", str(config), "--beta", "0.7")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["beta"] == 0.7  # flags win over the file
    first = read_metrics(out)[0]
    # K = 3 negatives, T = 0: the listwise DV loss is log(K + 1).
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)

"""``miopt reward``: the Bradley-Terry loss, learning a ranking, exact resume, bad input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from miopt.cli import main
from miopt.objectives.bradley_terry import bradley_terry, pair_accuracy

WORDS = ("alpha", "beta", "gamma", "delta", "omega")


def write_length_pairs(path, count: int = 48, seed: int = 0):
    """Preference pairs whose chosen response is always the longer one (5-7 words against 1-2)."""
    rng = random.Random(seed)
    with path.open("w") as file:
        for i in range(count):
            short = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2)))
            long = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 7)))
            file.write(
                json.dumps({"prompt": f"Q{i}: say something.\n", "chosen": long, "rejected": short}) + "\n"
            )
    return path


def _args(data, output, *extra):
    return [
        "reward", "--model", "builtin", "--data", str(data), "--output-dir", str(output),
        "--batch-size", "8", "--learning-rate", "1e-3", "--logging-steps", "1", "--progress", "false",
        "--max-length", "96", *extra,
    ]  # fmt: skip


def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_margin_averaged_over_real_pairs():
    chosen = torch.tensor([1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([[0.0, 3.0], [2.0, 99.0]])
    mask = torch.tensor([[True, True], [True, False]])
    output = bradley_terry(chosen, rejected, mask)
    expected_first = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(2.0)))) / 2
    expected_second = -math.log(1 / (1 + math.exp(2.0)))
    assert output.losses.tolist() == pytest.approx([expected_first, expected_second], rel=1e-6)
    output.losses.sum().backward()
    # d/dr_w of -log sigmoid(r_w - r_l) = -sigmoid(r_l - r_w)
    first_grad = -(torch.sigmoid(torch.tensor(-1.0)) + torch.sigmoid(torch.tensor(2.0))) / 2
    assert chosen.grad[0].item() == pytest.approx(first_grad.item(), rel=1e-6)
    assert output.metrics()["rewards/accuracies"].item() == pytest.approx((0.5 + 0.0) / 2)
    assert pair_accuracy(chosen.detach(), rejected, mask).item() == pytest.approx(1 / 3)


def test_reward_model_learns_to_rank_the_longer_response(tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = write_length_pairs(tmp_path / "len.jsonl", count=64)
    out = tmp_path / "rm"
    assert main(_args(data, out, "--max-steps", "16", "--eval-fraction", "0.25", "--seed", "3")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_records"] == 16 and summary["heldout_pairs"] == 16
    assert summary["heldout_pair_accuracy"] >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1


def test_reward_resume_continues_exactly(tmp_path, monkeypatch):
    import miopt.training.reward as reward_module

    data = write_length_pairs(tmp_path / "len.jsonl", count=32)
    args = (
        "--max-steps",
        "6",
        "--save-steps",
        "3",
        "--gradient-accumulation-steps",
        "2",
        "--batch-size",
        "4",
    )
    full = tmp_path / "full"
    assert main(_args(data, full, *args)) == 0

    original = reward_module.make_reward_step
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
    monkeypatch.setattr(reward_module, "make_reward_step", interrupted)
    assert main(_args(data, part, *args)) == 130
    monkeypatch.setattr(reward_module, "make_reward_step", original)
    assert (part / "checkpoint-0000003").is_dir() and not (part / "model.safetensors").exists()
    assert main(_args(data, part, *args, "--resume")) == 0

    rows = [
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, part)
    ]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(*rows):
        for key in ("loss", "rewards/margins", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    full_weights, part_weights = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    for name, tensor in full_weights.items():
        torch.testing.assert_close(part_weights[name], tensor, rtol=0, atol=1e-6)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (full, part)]
    assert summaries[1]["resumed_from_step"] == 3
    assert summaries[0]["heldout_pair_accuracy"] == pytest.approx(summaries[1]["heldout_pair_accuracy"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--eval-fraction", "1.5"), "--eval-fraction must be in [0, 1)"),
        (("--data", "./missing.jsonl"), "missing.jsonl"),
    ],
)
def test_reward_bad_options_fail_before_anything_is_written(tmp_path, capsys, extra, message):
    data = write_length_pairs(tmp_path / "len.jsonl", count=8)
    out = tmp_path / "rm"
    assert main([*_args(data, out, "--max-steps", "1"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_reward_bad_record_names_the_line(tmp_path, capsys):
    data = write_length_pairs(tmp_path / "len.jsonl", count=4)
    with data.open("a") as file:
        file.write(json.dumps({"prompt": "Q", "chosen": "a"}) + "\n")
    assert main(_args(data, tmp_path / "rm", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "len.jsonl:5" in err and not (tmp_path / "rm").exists()

"""``miopt sft``: completion-only NLL, a loadable result, prompts masked out of the loss."""

from __future__ import annotations

import json

import pytest
import torch

from miopt.cli import main
from miopt.data.tokenize import collate, tokenize_examples
from miopt.training.sft import make_sft_step


def test_sft_loss_is_mean_completion_nll(tiny_model, tokenizer):
    examples, _ = tokenize_examples(
        ["Q: 1+1=?\n", "ab"], [("2",), ("cdef",)], ["a", "b"], tokenizer, max_length=32
    )
    step = make_sft_step(examples, pad_token_id=tokenizer.pad_token_id, chunk_tokens=1024)
    loss, metrics = step(tiny_model, [0, 1])
    batch = collate(examples, tokenizer.pad_token_id)
    logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.response_mask[:, 1:]
    expected = -(logps * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["tokens"].item() == mask.sum().item() == (1 + 1) + (4 + 1)  # completions + EOS each


def test_sft_cli_learns_and_saves_loadable_model(small_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": " yes"}) + "\n" for i in range(16)))
    out = tmp_path / "sft"
    args = ["sft", "--model", str(small_model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "20",
            "--batch-size", "8", "--learning-rate", "1e-2", "--logging-steps", "1", "--progress", "false"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    AutoModelForCausalLM.from_pretrained(out)


def test_completion_tokens_counts_what_the_loss_scores(tiny_model, tokenizer):
    from miopt.training.sft import completion_tokens

    examples, _ = tokenize_examples(
        ["Q: 1+1=?\n", ""], [("2",), ("cdef",)], ["a", "b"], tokenizer, max_length=32
    )
    step = make_sft_step(examples, pad_token_id=tokenizer.pad_token_id, chunk_tokens=1024)
    for index, example in enumerate(examples):
        _, metrics = step(tiny_model, [index])
        assert completion_tokens(example) == metrics["tokens"].item()


def test_accumulated_sft_step_is_the_mean_over_all_its_completion_tokens(small_model_dir, tmp_path):
    """Completions of very different lengths: 1 x batch 4 and 2 micro-steps x batch 2 take the same
    optimizer steps only if each step is normalised by the tokens of the whole step."""
    from safetensors.torch import load_file

    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Q{i}:", "completion": " yes" * (1 + 5 * (i % 3))} for i in range(16)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["sft", "--model", str(small_model_dir), "--data", str(data), "--max-steps", "3", "--learning-rate",
              "1e-2", "--logging-steps", "1", "--progress", "false"]  # fmt: skip
    assert main([*common, "--output-dir", str(tmp_path / "a"), "--batch-size", "4"]) == 0
    args = ["--output-dir", str(tmp_path / "b"), "--batch-size", "2", "--gradient-accumulation-steps", "2"]
    assert main([*common, *args]) == 0
    for name in ("a", "b"):
        assert (tmp_path / name / "metrics.jsonl").is_file()
    one = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    expected, actual = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-5, msg=name)

"""``miopt sft``: completion-only NLL, a loadable result, prompts masked out of the loss."""

from __future__ import annotations

import json

import pytest
import torch

from miopt.cli import main
from miopt.data.tokenize import collate, tokenize_examples
from miopt.sft import make_sft_step


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

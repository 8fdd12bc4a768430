"""bf16/fp16 on CPU: every matmul and attention kernel sees lengths rounded up to SHAPE_MULTIPLE
(oneDNN keeps a compiled kernel per distinct shape, so varying lengths would grow memory without bound;
docs/performance.md), and the rounding changes no log-prob or gradient. float32 keeps exact lengths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miopt.data.packed import PACKINGS
from miopt.data.tokenize import tokenize_examples
from miopt.logprobs import forward as logprobs
from miopt.logprobs import packing
from miopt.logprobs.forward import sequence_logps
from miopt.logprobs.packing import make_batch
from miopt.model import attention
from miopt.model.modeling import SHAPE_MULTIPLE


def _examples(tokenizer):
    examples, _ = tokenize_examples(
        ["Q: 1+2=?\n", "Q: 30+4-5=?\n", "", "Q: 12+34-5=?\n"],
        [
            ("1+2=3. A: 3", "1+2=4. A: 4"),
            ("30+4=34. 34-5=29. A: 29", "x", "30+4=35. A: 30"),
            ("hello", "hello there", "help"),
            ("12+34=46. 46-5=41. A: 41", "12+34=47. 47-5=42. A: 42"),
        ],
        ["a", "b", "c", "d"],
        tokenizer,
        max_length=64,
    )
    return examples


def _model(tokenizer, impl):
    from miopt.model.builtin import build_model

    model = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model.set_attn_implementation(impl)
    return model


@pytest.fixture
def kernel_shapes(monkeypatch):
    """Lengths reaching the kernels: rows of every linear layer's input, and the query/key lengths of
    every attention call."""
    seen = {"linear": [], "attention": []}
    linear, attention = F.linear, F.scaled_dot_product_attention

    def spy_linear(x, weight, bias=None):
        seen["linear"].append(x.reshape(-1, x.shape[-1]).shape[0])
        return linear(x, weight, bias)

    def spy_attention(query, key, value, *args, **kwargs):
        seen["attention"] += [query.shape[-2], key.shape[-2]]
        return attention(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "linear", spy_linear)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_attention)
    return seen


def _logps_and_grads(model, examples, pad, layout):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = make_batch(examples, pad, layout, model)
        result = sequence_logps(model, batch, chunk_tokens=5)
    weights = torch.linspace(0.5, 1.5, result.summed.shape[0])
    (result.summed * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return batch, result, grads


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", PACKINGS)
def test_bf16_on_cpu_rounds_every_kernel_length_and_changes_no_result(
    tokenizer, kernel_shapes, monkeypatch, layout, impl
):
    examples = _examples(tokenizer)
    model = _model(tokenizer, impl)
    batch, rounded, rounded_grads = _logps_and_grads(model, examples, tokenizer.pad_token_id, layout)
    assert batch.input_ids.shape[1] % SHAPE_MULTIPLE == 0
    # the forward's own head runs on one position per row (logits_to_keep=1): a shape fixed by the batch size
    rows = batch.input_ids.shape[0]
    assert kernel_shapes["linear"] and all(
        n % SHAPE_MULTIPLE == 0 or n == rows for n in kernel_shapes["linear"]
    )
    assert all(n % SHAPE_MULTIPLE == 0 for n in kernel_shapes["attention"])
    if impl == "sdpa":
        assert kernel_shapes["attention"]

    # the same computation with exact lengths
    monkeypatch.setattr(packing, "SHAPE_MULTIPLE", 1)
    monkeypatch.setattr(logprobs, "SHAPE_MULTIPLE", 1)
    monkeypatch.setattr(attention, "SHAPE_MULTIPLE", 1)
    kernel_shapes["linear"].clear()
    batch, exact, exact_grads = _logps_and_grads(model, examples, tokenizer.pad_token_id, layout)
    assert any(n % SHAPE_MULTIPLE for n in kernel_shapes["linear"])  # the rounding did change shapes
    assert rounded.token_counts.tolist() == exact.token_counts.tolist()
    torch.testing.assert_close(rounded.summed, exact.summed, atol=0.05, rtol=0.01)
    for name, grad in exact_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(
            rounded_grads[name], grad, atol=0.02 * max(scale, 1e-3), rtol=0.02, msg=name
        )


@pytest.mark.parametrize("layout", PACKINGS)
def test_float32_keeps_exact_lengths_and_bf16_weights_round_without_autocast(tokenizer, layout):
    examples = _examples(tokenizer)
    model = _model(tokenizer, "sdpa")
    exact = make_batch(examples, tokenizer.pad_token_id, layout, model)
    longest = max(len(e.prompt_ids) + len(r) for e in examples for r in (e.chosen_ids, *e.rejected_ids))
    if layout == "padded":
        assert exact.input_ids.shape[1] == longest
    else:
        assert exact.input_ids.shape[1] % SHAPE_MULTIPLE != 0
    rounded = make_batch(examples, tokenizer.pad_token_id, layout, model.to(torch.bfloat16))
    assert rounded.input_ids.shape[1] % SHAPE_MULTIPLE == 0

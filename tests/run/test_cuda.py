"""miopt on a CUDA device: every batch layout against padded in float32 and bf16 (log-probs, losses,
metrics, gradients), the fused chunked head, generation with a KV cache, and ``miopt train --bf16``
end to end with save, resume and reload.

Marked ``cuda`` (``pytest -m cuda``) and skipped without a GPU. ``MIOPT_TEST_DEVICE=cpu`` runs them on
the CPU instead (bf16 by CPU autocast): ``benchmarks/gpu_check.py --cpu-dry-run`` does, so the tests
are known to run before a GPU is at hand.

Tolerances: float32 as tests/logprobs/test_fast_paths.py (the layouts only reorder float32 sums; 1e-4).
bf16 autocast rounds every matmul input to 8 bits of mantissa. Measured with CPU autocast on these
examples (summed log-probs up to 117 nats): per-token error 0.003, summed 0.012, gradients 0.7% (relative
norm). The bf16 bounds below are about ten times those (GPU kernels keep more in bf16), yet far below
what a mix-up of rows or a wrong mask gives (log-probs off by whole nats, gradients by their own size).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from miopt import objectives
from miopt.data.tokenize import collate, tokenize_examples
from miopt.logprobs.forward import chunked_token_logps, sequence_logps
from miopt.logprobs.packing import collate_packed
from miopt.logprobs.reference import compute_reference_logps
from miopt.training.preference import PreferenceData, make_step_function
from tests.helpers import read_metrics

DEVICE = os.environ.get("MIOPT_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (MIOPT_TEST_DEVICE=cpu runs these on the CPU)",
    ),
]
PRECISIONS = ["fp32", "bf16"]
# (atol, rtol) of per-token and summed log-probs, losses and metrics; relative gradient error bound
TOLERANCES = {"fp32": ((1e-4, 1e-5), (1e-4, 1e-5), 1e-4), "bf16": ((0.03, 1e-3), (0.15, 2e-3), 0.05)}
LAYOUTS = [
    ("shared-prompt", "blocks"),
    ("shared-prompt", "mask"),
    ("packed", "blocks"),
    ("packed", "positions"),
]


def autocast(precision: str):
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16")


def _examples(tokenizer):
    """Several rejected responses per prompt, shared response prefixes, an empty prompt, varied lengths."""
    examples, report = tokenize_examples(
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
    assert report.truncated == 0
    return examples


def _model(tokenizer, impl: str = "sdpa", seed: int = 0):
    from miopt.model.builtin import build_model

    model = build_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=seed)
    model.set_attn_implementation(impl)
    return model.to(DEVICE)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(actual: dict, expected: dict, bound: float) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        error = (actual[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error.item() < bound, (name, error.item())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("packing", "attention"), LAYOUTS)
def test_layouts_give_padded_logps_and_gradients(tokenizer, packing, attention, precision):
    (token_tol, summed_tol, grad_bound) = TOLERANCES[precision]
    examples = _examples(tokenizer)
    model = _model(tokenizer)
    padded = collate(examples, tokenizer.pad_token_id).to(DEVICE)
    weights = torch.linspace(0.5, 1.5, padded.input_ids.shape[0], device=DEVICE)
    results = {}
    for name, batch, chunk in (
        ("padded", padded, 0),
        ("layout", collate_packed(examples, tokenizer.pad_token_id, share_prompt=packing == "shared-prompt", attention=attention).to(DEVICE), 3),
    ):  # fmt: skip
        model.zero_grad(set_to_none=True)
        # the padded reference in float32 with the full softmax; the layout in the tested precision
        with autocast("fp32" if name == "padded" else precision):
            result = sequence_logps(model, batch, chunk_tokens=chunk)
            (result.summed * weights).sum().backward()
        results[name] = result, _grads(model)
    (expected, expected_grads), (got, grads) = results["padded"], results["layout"]
    assert got.summed.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(
        got.per_token.float(), expected.per_token, atol=token_tol[0], rtol=token_tol[1]
    )
    torch.testing.assert_close(got.summed.float(), expected.summed, atol=summed_tol[0], rtol=summed_tol[1])
    assert got.token_counts.tolist() == expected.token_counts.tolist()
    _assert_grads_close(grads, expected_grads, grad_bound)
    if precision == "bf16":  # autocast really ran in bf16 (else the bounds above test float32 again)
        assert (got.summed.float() - expected.summed).abs().max().item() > 1e-4


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("objective_name", ["dpo", "mio"])
@pytest.mark.parametrize("packing", ["shared-prompt", "packed"])
def test_training_step_equals_padded(tokenizer, packing, objective_name, precision):
    (_, summed_tol, grad_bound) = TOLERANCES[precision]
    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    reference = compute_reference_logps(_model(tokenizer), examples, pad, chunk_tokens=0, progress=False)
    results = {}
    for layout in ("padded", packing):
        model = _model(tokenizer)
        with torch.no_grad():  # a policy away from the reference, so the log-ratios are not all zero
            generator = torch.Generator().manual_seed(1)
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator).to(DEVICE) * 0.05)
        step = make_step_function(
            objectives.build(objective_name),
            PreferenceData(examples, reference),
            beta=0.5,
            pad_token_id=pad,
            chunk_tokens=0 if layout == "padded" else 4,
            packing=layout,
        )
        with autocast("fp32" if layout == "padded" else precision):
            loss, metrics = step(model, list(range(len(examples))))
            loss.backward()
        results[layout] = loss, metrics, _grads(model)
    (loss, metrics, grads), (expected_loss, expected_metrics, expected_grads) = (
        results[packing],
        results["padded"],
    )
    assert loss.device.type == torch.device(DEVICE).type
    # losses and metrics are functions of summed log-probs (through beta = 0.5)
    torch.testing.assert_close(loss.float(), expected_loss, atol=summed_tol[0], rtol=summed_tol[1])
    assert metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        torch.testing.assert_close(
            metrics[name].float(), value, atol=summed_tol[0], rtol=summed_tol[1], msg=name
        )
    _assert_grads_close(grads, expected_grads, 2 * grad_bound)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_chunked_head_equals_full_softmax(precision, bias):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 1000, bias=bias).to(DEVICE, dtype)
    hidden = torch.randn(37, 64, generator=generator).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, 1000, (37,), generator=generator).to(DEVICE)
    weights = torch.randn(37, generator=generator).to(DEVICE)
    outputs = []
    for chunk in (8, 0):
        hidden.grad = None
        linear.zero_grad(set_to_none=True)
        if chunk:
            out = chunked_token_logps(hidden, targets, linear, chunk)
        else:  # the reference: the same (rounded) inputs, everything in float32
            logits = hidden.float() @ linear.weight.float().T + (linear.bias.float() if bias else 0)
            out = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        (out.float() * weights).sum().backward()
        grads = [hidden.grad.float(), linear.weight.grad.float()] + (
            [linear.bias.grad.float()] if bias else []
        )
        outputs.append((out.detach().float(), grads))
    (got, got_grads), (expected, expected_grads) = outputs
    atol = 1e-4 if precision == "fp32" else 0.05
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-3)
    for grad, reference in zip(got_grads, expected_grads):
        error = (grad - reference).norm() / reference.norm()
        assert error.item() < (1e-4 if precision == "fp32" else 0.02)


def test_generation_with_kv_cache_equals_greedy_without_cache(tokenizer):
    """miopt's batched generation (left padding, KV cache) gives each prompt's greedy continuation as
    recomputed token by token from the whole sequence, without a cache."""
    from miopt.evaluation.generation import generate

    model = _model(tokenizer, seed=3)
    with torch.no_grad():  # sharper logits than at initialisation, so greedy choices are not near-ties
        model.get_input_embeddings().weight.mul_(8.0)
    model.eval()
    prompts = ["Q: 1+2=?\n", "Q: 12+34-5=?\nA", "x"]
    got = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    assert next(model.parameters()).device.type == torch.device(DEVICE).type
    for prompt, (completion,) in zip(prompts, got):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(DEVICE)
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(12):
                token = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
                if token.item() == tokenizer.eos_token_id:
                    break
        assert completion == tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_train_bf16_end_to_end_saves_resumes_and_reloads(small_model_dir, pairs_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from miopt.cli import main

    common = ["--model", str(small_model_dir), "--data", str(pairs_file), "--bf16", "--objective", "dpo"]
    common += ["--batch-size", "4", "--max-steps", "4", "--save-steps", "2", "--learning-rate", "1e-4"]
    common += ["--logging-steps", "1", "--progress", "false", "--cache-dir", str(tmp_path / "cache")]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(["train", *common, "--output-dir", str(full)]) == 0
    rows = read_metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)  # policy = reference at step 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    # resume from the step-2 checkpoint of a copy cut there: steps 3 and 4 again
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-0000002", resumed / "checkpoint-0000002")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert main(["train", *common, "--output-dir", str(resumed), "--resume"]) == 0
    for a, b in zip(rows, read_metrics(resumed)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3), a["step"]
    # reload: float32 weights that moved from the start, and a model that runs on the device
    start, final = load_file(small_model_dir / "model.safetensors"), load_file(full / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in final.values())
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-5
    again = load_file(resumed / "model.safetensors")
    assert max((again[k] - final[k]).abs().max().item() for k in final) < 1e-3
    model = AutoModelForCausalLM.from_pretrained(full).to(DEVICE)
    batch = collate(_examples_of(pairs_file, model.config, small_model_dir), model.config.pad_token_id)
    with torch.no_grad():
        logps = sequence_logps(model, batch.to(DEVICE)).summed
    assert torch.isfinite(logps).all() and (logps < 0).all()


def _examples_of(pairs_file, config, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()[:4]]
    examples, _ = tokenize_examples(
        [r["prompt"] for r in rows],
        [(r["chosen"], r["rejected"]) for r in rows],
        ["p"] * 4,
        tokenizer,
        max_length=128,
    )
    return examples

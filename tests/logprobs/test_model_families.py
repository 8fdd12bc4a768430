"""An architecture zoo: tiny random models of eleven families, each with its config's default dropout.

For each family: every batch layout (``shared-prompt``, ``packed``, ``padded``) gives the same losses,
metrics, log-probs and gradients; the critic is exactly zero at step 1 (dropout off, reference in the
training layout); a LoRA run works with the adapter-disabled reference; the saved model reloads to the
same log-probs. Sliding windows are set below the longest sequence, so Mistral's and Gemma's windows
are exercised. One model per family is built once per module and copied where a test changes it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from miopt import objectives
from miopt.data.tokenize import collate, tokenize_examples
from miopt.logprobs.forward import sequence_logps
from miopt.logprobs.packing import PACKINGS, make_batch
from miopt.logprobs.reference import compute_reference_logps
from miopt.model.modeling import disable_dropout
from miopt.training.preference import PreferenceData, TrainOptions, make_step_function, train_on_examples
from tests.zoo import FAMILIES, zoo_config, zoo_model

ATOL, RTOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def examples(tokenizer):
    """K = 1..3 rejected, shared response prefixes, an empty prompt; sequences up to 27 tokens."""
    examples, _ = tokenize_examples(
        ["Q: 1+2=?\n", "Q: 30+4-5=?\n", ""],
        [
            ("1+2=3. A: 3", "1+2=4. A: 4"),
            ("30+4=34. A: 29", "x", "30+4=35. A: 30"),
            ("hello", "hello there", "help"),
        ],
        ["a", "b", "c"],
        tokenizer,
        max_length=64,
    )
    return examples


@pytest.fixture(scope="module")
def zoo(tokenizer):
    """One model per family, built on first use and shared by the module's tests (copy before changing)."""
    built: dict[str, torch.nn.Module] = {}

    def get(family: str):
        if family not in built:
            built[family] = zoo_model(family, tokenizer)
        return built[family]

    return get


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_gives_the_same_loss_logps_and_gradients(family, zoo, tokenizer, examples):
    base = zoo(family)
    pad = tokenizer.pad_token_id
    reference = compute_reference_logps(base, examples, pad, chunk_tokens=0, progress=False)
    policy = copy.deepcopy(base)
    disable_dropout(policy)
    policy.train()
    with torch.no_grad():  # away from the reference, so that the log-ratios are not all zero
        generator = torch.Generator().manual_seed(1)
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    results = {}
    for packing in PACKINGS:
        step = make_step_function(
            objectives.build("mio"),
            PreferenceData(examples, reference),
            beta=0.5,
            pad_token_id=pad,
            chunk_tokens=0 if packing == "padded" else 5,
            packing=packing,
        )
        policy.zero_grad(set_to_none=True)
        loss, metrics = step(policy, list(range(len(examples))))
        loss.backward()
        batch = make_batch(examples, pad, packing, policy)
        with torch.no_grad():
            per_token = sequence_logps(policy, batch, chunk_tokens=3).per_token
        results[packing] = loss.detach(), metrics, _grads(policy), per_token
    loss, metrics, grads, per_token = results["padded"]
    assert loss.item() != 0 and grads
    for packing in ("shared-prompt", "packed"):
        other_loss, other_metrics, other_grads, other_per_token = results[packing]
        torch.testing.assert_close(other_loss, loss, atol=ATOL, rtol=RTOL, msg=packing)
        torch.testing.assert_close(other_per_token, per_token, atol=ATOL, rtol=RTOL, msg=packing)
        for name, value in metrics.items():
            torch.testing.assert_close(other_metrics[name], value, atol=ATOL, rtol=RTOL, msg=name)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            scale = max(grad.abs().max().item(), 1e-3)
            torch.testing.assert_close(other_grads[name], grad, atol=ATOL * scale, rtol=RTOL, msg=name)


def _options(tmp_path, **overrides) -> TrainOptions:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "objective": "mio",
        "beta": 0.5,
        "batch_size": 3,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "progress": False,
        "cache_dir": str(tmp_path / "cache"),
        "model": "zoo",
        **overrides,
    }
    return TrainOptions(**settings)


def _history(options: TrainOptions) -> list[dict]:
    with open(f"{options.output_dir}/metrics.jsonl") as file:
        return [json.loads(line) for line in file]


@pytest.mark.parametrize("family", FAMILIES)
def test_critic_is_zero_at_step_one_and_the_saved_model_reloads(family, zoo, tokenizer, examples, tmp_path):
    model = copy.deepcopy(zoo(family))
    options = _options(tmp_path)
    train_on_examples(options, model, tokenizer, examples)
    first = _history(options)[0]
    assert first["logps/chosen_change"] == 0.0 and first["logps/rejected_change"] == 0.0
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
    assert model.config._attn_implementation == zoo(family).config._attn_implementation  # switched back
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(options.output_dir)
    batch = collate(examples, tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        trained = sequence_logps(model, batch, chunk_tokens=0).summed
        expected_start = sequence_logps(zoo(family).eval(), batch, chunk_tokens=0).summed
        got = sequence_logps(reloaded, batch, chunk_tokens=0).summed
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained, expected_start, atol=1e-3), "two steps did not change the model"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_run_with_the_adapter_disabled_reference(family, zoo, tokenizer, examples, tmp_path):
    pytest.importorskip("peft")
    model = copy.deepcopy(zoo(family))
    options = _options(
        tmp_path, lora_r=2, lora_alpha=4.0, lora_target_modules=FAMILIES[family][1], reference="on-the-fly"
    )
    train_on_examples(options, model, tokenizer, examples)
    history = _history(options)
    assert history[0]["logps/chosen_change"] == 0.0  # adapters start at zero: the reference is the policy
    assert history[-1]["logps/chosen_change"] != 0.0  # the adapters trained
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history)


@pytest.mark.parametrize(
    ("family", "dropout"),
    [("gpt2", {}), ("llama", {"attention_dropout": 0.1})],  # nn.Dropout modules; the attention's own
)
def test_dropout_is_off_by_default_and_kept_on_request(family, dropout, tokenizer, examples, tmp_path):
    config = zoo_config(family, tokenizer)
    for key, value in dropout.items():
        setattr(config, key, value)
    assert max(getattr(config, k) for k in ("attn_pdrop", "attention_dropout") if hasattr(config, k)) == 0.1
    changes = {}
    for disable in (True, False):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
        options = _options(tmp_path / str(disable), max_steps=1, disable_dropout=disable)
        train_on_examples(options, model, tokenizer, examples)
        changes[disable] = _history(options)[0]["logps/chosen_change"]
        saved = json.loads((tmp_path / str(disable) / "run" / "config.json").read_text())
        assert (
            saved.get("attn_pdrop", saved.get("attention_dropout")) == 0.1
        )  # the saved config keeps its own
    assert changes[True] == 0.0
    assert changes[False] != 0.0  # dropout on: the policy's log-probs differ from the reference's

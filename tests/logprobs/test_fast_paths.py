"""The fast paths equal the plain padded path: packed and prefix-tree (shared-prompt) layouts, chunked
log-softmax, with several rejected responses per prompt, on tiny models.

The reference is the padded batch with the model's own full logits and a full float32 log-softmax
(``chunk_tokens=0``); every fast path must give the same summed and per-token log-probs, the same
token counts, the same losses and metrics of a real training step, and the same gradient with respect
to every weight (float32 tolerance: the layouts only change the order of floating-point sums).
"""

from __future__ import annotations

import pytest
import torch

from miopt import objectives
from miopt.data.packed import PACKINGS, collate_packed
from miopt.data.tokenize import SequenceBatch, collate, tokenize_examples
from miopt.logprobs.forward import pair_logps, sequence_logps
from miopt.logprobs.packing import make_batch, resolve_packing
from miopt.logprobs.reference import compute_reference_logps
from miopt.training.preference import PreferenceData, TrainOptions, make_step_function

ATOL, RTOL = 1e-4, 1e-5
# (layout, how units are kept apart, attention implementation): every combination the code can take
LAYOUTS = [
    ("shared-prompt", "blocks", "sdpa"),
    ("shared-prompt", "mask", "sdpa"),
    ("shared-prompt", "mask", "eager"),
    ("packed", "blocks", "sdpa"),
    ("packed", "mask", "sdpa"),
    ("packed", "mask", "eager"),
    ("packed", "positions", "sdpa"),
    ("packed", "positions", "eager"),
]


def _examples(tokenizer):
    """Several rejected per prompt (K = 1..3), responses sharing prefixes with each other, a response
    that is a prefix of another, a duplicated rejected response, an empty prompt, varied lengths."""
    examples, report = tokenize_examples(
        ["Q: 1+2=?\n", "Q: 30+4-5=?\n", "Q: 7-1=?\n", "", "Q: 12+34-5=?\n"],
        [
            ("1+2=3. A: 3", "1+2=4. A: 4"),
            ("30+4=34. 34-5=29. A: 29", "x", "30+4=35. A: 30", "30+4=34. 34-5=28. A: 28"),
            ("6", "A: 5"),
            ("hello", "hello there", "help"),
            ("12+34=46. 46-5=41. A: 41", "12+34=47. 47-5=42. A: 42", "12+34=47. 47-5=42. A: 42"),
        ],
        ["a", "b", "c", "d", "e"],
        tokenizer,
        max_length=64,
    )
    assert report.truncated == 0
    return examples


def _model(tokenizer, impl="sdpa", family="llama"):
    """Llama (rotary positions) or GPT-2 (learned absolute positions: a wrong position id changes its
    log-probs, where rotary attention only sees differences of positions)."""
    from miopt.model.builtin import build_model

    if family == "llama":
        model = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    else:
        from miopt.model.modeling import disable_dropout
        from tests.zoo import zoo_model

        model = zoo_model(family, tokenizer)
        disable_dropout(model)
    model.set_attn_implementation(impl)
    return model


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _logps_and_grads(model, batch, chunk, weights):
    model.zero_grad(set_to_none=True)
    result = sequence_logps(model, batch, chunk_tokens=chunk)
    # a loss that weighs every sequence differently, so a mix-up of rows would show in the gradient
    (result.summed * weights).sum().backward()
    return result, _grads(model)


def _assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(actual[name], grad, rtol=RTOL, atol=ATOL * max(scale, 1e-3), msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [0, 3, 1024])
@pytest.mark.parametrize(("packing", "attention", "impl"), LAYOUTS)
def test_fast_layouts_give_padded_logps_and_gradients(tokenizer, packing, attention, impl, chunk, family):
    examples = _examples(tokenizer)
    model = _model(tokenizer, impl, family)
    padded = collate(examples, tokenizer.pad_token_id)
    weights = torch.linspace(0.5, 1.5, padded.input_ids.shape[0])
    expected, expected_grads = _logps_and_grads(model, padded, 0, weights)
    batch = collate_packed(
        examples, tokenizer.pad_token_id, share_prompt=packing == "shared-prompt", attention=attention
    )
    assert batch.layout == packing
    result, grads = _logps_and_grads(model, batch, chunk, weights)
    torch.testing.assert_close(result.summed, expected.summed, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(result.per_token, expected.per_token, atol=ATOL, rtol=RTOL)
    assert result.token_counts.tolist() == expected.token_counts.tolist()
    _assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize(("family", "shift_changes"), [("gpt2", True), ("llama", False)])
def test_shifted_position_ids_change_an_absolute_position_model(tokenizer, family, shift_changes):
    """Every packed position id one too high: rotary attention (Llama) cannot see it, so the equality
    tests above need GPT-2 to catch a position bug."""
    examples = _examples(tokenizer)
    model = _model(tokenizer, "sdpa", family)
    expected = sequence_logps(model, collate(examples, tokenizer.pad_token_id), chunk_tokens=0).summed
    for attention in ("blocks", "mask"):
        batch = collate_packed(examples, tokenizer.pad_token_id, share_prompt=False, attention=attention)
        torch.testing.assert_close(sequence_logps(model, batch).summed, expected, atol=ATOL, rtol=RTOL)
        batch.position_ids += 1
        shifted = sequence_logps(model, batch).summed
        assert (not torch.allclose(shifted, expected, atol=ATOL, rtol=RTOL)) == shift_changes


def test_block_attention_is_registered_and_leaves_other_models_alone(tokenizer):
    """The block attention has its own name; the model is switched to it only while miopt runs it, and a
    second model in the process keeps transformers' own sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from miopt.model.attention import ATTENTION_NAME, block_attention

    examples = _examples(tokenizer)
    model, other = _model(tokenizer), _model(tokenizer)
    batch = make_batch(examples, tokenizer.pad_token_id, "shared-prompt", model)
    assert batch.attention_blocks is not None
    sequence_logps(model, batch)
    assert batch.attention_blocks.calls > 0
    assert model.config._attn_implementation == other.config._attn_implementation == "sdpa"
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward  # nothing wrapped or replaced
    assert ATTENTION_NAME in ALL_ATTENTION_FUNCTIONS.valid_keys()
    padded = collate(examples, tokenizer.pad_token_id)
    with block_attention(model):
        assert model.config._attn_implementation == ATTENTION_NAME
        assert other.config._attn_implementation == "sdpa"
        # without blocks the registered attention is plain sdpa: same results as the other model
        torch.testing.assert_close(
            sequence_logps(model, padded, chunk_tokens=0).summed,
            sequence_logps(other, padded, chunk_tokens=0).summed,
            atol=0,
            rtol=0,
        )
    assert model.config._attn_implementation == "sdpa"


def test_model_that_cannot_take_the_block_attention_gets_rows_with_a_mask(tokenizer):
    """A model whose attention bypasses transformers' attention interface keeps its attention when
    ``set_attn_implementation`` is called (transformers warns and changes nothing): it falls back to rows
    with a 4D mask, with the same log-probs."""
    from miopt.logprobs.packing import plan

    model = _model(tokenizer)

    class Unswitchable(type(model)):
        def set_attn_implementation(self, attn_implementation, **kwargs):
            pass

    model.__class__ = Unswitchable
    assert plan(model, "shared-prompt") == ("shared-prompt", "mask")
    examples = _examples(tokenizer)
    expected = sequence_logps(model, collate(examples, tokenizer.pad_token_id), chunk_tokens=0).summed
    batch = make_batch(examples, tokenizer.pad_token_id, "shared-prompt", model)
    assert batch.attention_blocks is None and batch.attention_mask is not None
    torch.testing.assert_close(sequence_logps(model, batch).summed, expected, atol=ATOL, rtol=RTOL)


def test_blocks_ignored_by_the_attention_fail_loudly(tokenizer):
    examples = _examples(tokenizer)
    model = _model(tokenizer, "eager")  # eager attention does not run the blocks
    batch = collate_packed(examples, tokenizer.pad_token_id, attention="blocks")
    with pytest.raises(RuntimeError, match="ignored miopt's attention blocks"):
        sequence_logps(model, batch)


def test_make_batch_picks_the_form_the_attention_takes(tokenizer):
    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    model = _model(tokenizer, "sdpa")
    batch = make_batch(examples, pad, "shared-prompt", model)
    assert batch.attention_blocks is not None and batch.input_ids.shape[0] == 1  # one row, no padding
    assert batch.computed_tokens == sum(b - a for a, b, _ in batch.attention_blocks)
    model.set_attn_implementation("eager")
    batch = make_batch(examples, pad, "shared-prompt", model)
    assert batch.attention_blocks is None and batch.attention_mask is not None
    assert isinstance(make_batch(examples, pad, "padded", model), SequenceBatch)


def test_chunked_padded_path_equals_full_softmax_with_several_rejected(tokenizer):
    examples = _examples(tokenizer)
    model = _model(tokenizer)
    padded = collate(examples, tokenizer.pad_token_id)
    weights = torch.linspace(1.5, 0.5, padded.input_ids.shape[0])
    expected, expected_grads = _logps_and_grads(model, padded, 0, weights)
    for chunk in (1, 7, 1024):
        result, grads = _logps_and_grads(model, padded, chunk, weights)
        torch.testing.assert_close(result.summed, expected.summed, atol=ATOL, rtol=RTOL)
        _assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize("row_length", [None, 64, 1000])
def test_several_trees_per_row_are_independent(tokenizer, row_length):
    examples = _examples(tokenizer)
    model = _model(tokenizer)
    expected = sequence_logps(model, collate(examples, tokenizer.pad_token_id), chunk_tokens=0).summed
    batch = collate_packed(examples, tokenizer.pad_token_id, row_length=row_length)
    assert batch.attention_mask is not None
    if row_length == 1000:
        assert batch.input_ids.shape[0] == 1  # everything in one row, block-diagonal mask
    torch.testing.assert_close(sequence_logps(model, batch).summed, expected, atol=ATOL, rtol=RTOL)


def test_prefix_tree_layout_computes_each_shared_token_once(tokenizer):
    examples = _examples(tokenizer)
    padded = collate(examples, tokenizer.pad_token_id)
    packed = collate_packed(examples, tokenizer.pad_token_id, share_prompt=False)
    tree = collate_packed(examples, tokenizer.pad_token_id)
    real_tokens = int(padded.attention_mask.sum())
    assert int((packed.input_ids != tokenizer.pad_token_id).sum()) == real_tokens
    # the tree holds each prompt once plus the distinct response branches: fewer tokens than the sequences
    distinct = sum(
        len({(*e.prompt_ids, *r[: i + 1]) for r in (e.chosen_ids, *e.rejected_ids) for i in range(len(r))})
        + len(e.prompt_ids)
        for e in examples
    )
    assert int((tree.position_ids >= 0).sum()) >= distinct
    assert tree.targets.numel() < int(padded.response_mask[:, 1:].sum())  # shared prefixes scored once
    assert tree.computed_tokens < packed.computed_tokens < padded.input_ids.numel()
    # a token attends to its ancestors only: each row of the mask holds (depth + 1) entries
    mask = tree.attention_mask[:, 0]
    real = tree.input_ids != tokenizer.pad_token_id
    counts = mask.sum(-1)
    assert torch.equal(counts[real], tree.position_ids[real] + 1)


def test_packed_layout_matches_with_identical_responses_and_single_token_responses(tokenizer):
    examples, _ = tokenize_examples(
        ["Q: 2+2=?\n", "Say: "], [("4", "4", "5"), ("a", "b")], ["x", "y"], tokenizer, max_length=32
    )
    model = _model(tokenizer)
    expected = sequence_logps(model, collate(examples, tokenizer.pad_token_id), chunk_tokens=0).summed
    for packing in ("shared-prompt", "packed"):
        got = sequence_logps(model, make_batch(examples, tokenizer.pad_token_id, packing, model)).summed
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert expected[2].item() == pytest.approx(expected[0].item(), abs=1e-6)  # the two identical responses


@pytest.mark.parametrize("objective_name", ["dpo", "mio", "nwj", "ipo", "simpo"])
@pytest.mark.parametrize("packing", ["shared-prompt", "packed"])
def test_training_step_losses_metrics_and_gradients_equal_padded(tokenizer, objective_name, packing):
    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    reference_model = _model(tokenizer)
    reference = compute_reference_logps(reference_model, examples, pad, chunk_tokens=0, progress=False)
    results = {}
    for layout in ("padded", packing):
        model = _model(tokenizer)
        with torch.no_grad():  # a policy away from the reference, so the log-ratios are not all zero
            generator = torch.Generator().manual_seed(1)
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        step = make_step_function(
            objectives.build(objective_name),
            PreferenceData(examples, reference),
            beta=0.5,
            pad_token_id=pad,
            chunk_tokens=0 if layout == "padded" else 4,
            packing=layout,
        )
        loss, metrics = step(model, list(range(len(examples))))
        loss.backward()
        results[layout] = loss, metrics, _grads(model)
    loss, metrics, grads = results[packing]
    expected_loss, expected_metrics, expected_grads = results["padded"]
    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=RTOL)
    assert metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        torch.testing.assert_close(metrics[name], value, atol=ATOL, rtol=RTOL, msg=name)
    _assert_grads_close(grads, expected_grads)


def test_gradient_checkpointing_and_bf16_autocast_run_on_the_prefix_tree_layout(tokenizer):
    from miopt.model.attention import block_attention

    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    model = _model(tokenizer)
    padded = collate(examples, pad)
    weights = torch.linspace(0.5, 1.5, padded.input_ids.shape[0])
    expected, expected_grads = _logps_and_grads(model, padded, 0, weights)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = make_batch(examples, pad, "shared-prompt", model)
    assert batch.attention_blocks is not None
    with pytest.raises(RuntimeError, match="block_attention"):  # the backward's rerun would miss the blocks
        sequence_logps(model, batch)
    with block_attention(model):  # forward and the backward's recomputation both run the blocks
        got, grads = _logps_and_grads(model, batch, 1024, weights)
    torch.testing.assert_close(got.summed, expected.summed, atol=ATOL, rtol=RTOL)
    _assert_grads_close(grads, expected_grads)
    with torch.autocast("cpu", dtype=torch.bfloat16), block_attention(model):
        low = pair_logps(model, make_batch(examples, pad, "shared-prompt", model))
    chosen, _ = padded.split_rows(expected.summed)
    torch.testing.assert_close(low.chosen.float(), chosen, atol=0.5, rtol=0.05)


def test_layout_falls_back_to_plain_packing_without_4d_mask_attention(tokenizer):
    model = _model(tokenizer)
    assert resolve_packing(model, "shared-prompt") == "shared-prompt"
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask: position ids only
    assert resolve_packing(model, "shared-prompt") == "packed"
    assert resolve_packing(model, "padded") == "padded"
    with pytest.raises(ValueError, match="unknown packing"):
        resolve_packing(model, "zigzag")


def test_train_option_defaults_to_the_prefix_tree_layout():
    assert TrainOptions().packing == "shared-prompt"
    assert set(PACKINGS) == {"shared-prompt", "packed", "padded"}


def test_end_to_end_training_runs_equal_across_layouts(tokenizer, tmp_path):
    """Three optimizer steps of ``train_on_examples`` per layout: the same logged losses and metrics."""
    from miopt.training.preference import train_on_examples

    examples = _examples(tokenizer)
    histories = {}
    for packing in PACKINGS:
        model = _model(tokenizer)
        options = TrainOptions(
            output_dir=str(tmp_path / packing),
            objective="mio",
            beta=0.5,
            batch_size=3,
            max_steps=3,
            learning_rate=1e-3,
            logging_steps=1,
            progress=False,
            packing=packing,
            cache_dir=str(tmp_path / "cache"),
            model="tiny-fast-paths-test",
        )
        summary = train_on_examples(options, model, tokenizer, examples)
        histories[packing] = summary
    expected = histories["padded"]["final"]
    for packing in ("shared-prompt", "packed"):
        final = histories[packing]["final"]
        for name in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
            assert final[name] == pytest.approx(expected[name], abs=1e-4, rel=1e-4), (packing, name)


class _Head(torch.nn.Module):
    """A head that is not a plain ``nn.Linear`` (takes the generic checkpointed path)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden):
        return self.linear(hidden)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_head_equals_checkpointed_head_and_full_softmax(bias):
    from miopt.logprobs.forward import chunked_token_logps

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(23, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=generator)
    weights = torch.randn(23, generator=generator)
    results = []
    for head, chunk in ((linear, 5), (_Head(linear), 5), (linear, 0)):
        hidden.grad = None
        linear.zero_grad(set_to_none=True)
        if chunk:
            out = chunked_token_logps(hidden, targets, head, chunk)
        else:
            out = torch.log_softmax(linear(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
        (out * weights).sum().backward()
        grads = [hidden.grad.clone(), linear.weight.grad.clone()] + (
            [linear.bias.grad.clone()] if bias else []
        )
        results.append((out.detach(), grads))
    for out, grads in results[:2]:
        torch.testing.assert_close(out, results[2][0], atol=1e-5, rtol=1e-5)
        for grad, expected in zip(grads, results[2][1]):
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_forward_without_extra_keyword_arguments_gets_rows_with_a_mask(tokenizer):
    from miopt.logprobs.packing import plan

    class Strict(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    model = _model(tokenizer, "sdpa")
    assert plan(model, "shared-prompt") == ("shared-prompt", "blocks")
    assert plan(Strict(model), "shared-prompt") == ("shared-prompt", "mask")

"""Training on unpaired (prompt, completion, label) examples, for KTO: the step function.

The batch is the paired layout with one "rejected" slot per row holding the row's mismatched
completion (:class:`miopt.data.unpaired.UnpairedExample`), so one forward (prompt shared by both
completions) gives the completion's and the mismatched pair's log-probs, and the reference cache
works unchanged. Metrics follow TRL's KTOTrainer (``kl``, ``rewards/chosen`` over desirable rows,
``rewards/rejected`` over undesirable rows); ``logps/chosen_change`` is the desirable completions'
change against the reference and ``logps/rejected_change`` the undesirable ones'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from miopt.data.tokenize import TokenizedExample
from miopt.data.unpaired import (
    UnpairedExample,
    load_unpaired_records,
    split_pairs,
    tokenize_unpaired,
    with_mismatched_completions,
)
from miopt.logprobs.forward import pair_logps
from miopt.logprobs.packing import make_batch
from miopt.logprobs.reference import on_the_fly_reference
from miopt.model.modeling import unwrap


def unpaired_loaders():
    """``(load_records, tokenize)`` for unpaired data (``miopt.training.preference.load_examples``'s arguments)."""
    return load_unpaired_records, tokenize_unpaired


def as_unpaired(examples: Sequence[TokenizedExample], options) -> list[UnpairedExample]:
    """Unpaired examples with their mismatched completions; paired examples are split first.

    The mismatched pairs are formed within blocks of ``max(options.batch_size, 2)`` examples, after a
    shuffle seeded by ``options.seed`` (TRL's KTOTrainer forms them within each batch of
    ``per_device_train_batch_size``); mismatched completions are cut to ``options.max_length``."""
    unpaired = [e for e in examples if isinstance(e, UnpairedExample)]
    if len(unpaired) != len(examples):
        unpaired = split_pairs(examples)
    if len(unpaired) < 2:
        raise ValueError(
            "KTO needs at least 2 examples (the KL estimate pairs each prompt with another completion)"
        )
    block = max(options.batch_size, 2)
    return with_mismatched_completions(
        unpaired, block=block, max_length=options.max_length, seed=options.seed
    )


def _side_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1)


def make_unpaired_step_function(
    objective,
    data,
    *,
    beta: float,
    pad_token_id: int,
    chunk_tokens: int,
    reference_model=None,
    packing: str = "shared-prompt",
):
    """The training step on unpaired examples (``data.examples`` of :class:`UnpairedExample`)."""

    def step(model, indices: Sequence[int]):
        examples = [data.examples[i] for i in indices]
        device = next(unwrap(model).parameters()).device
        batch = make_batch(examples, pad_token_id, packing, model).to(device)
        policy = pair_logps(model, batch, chunk_tokens=chunk_tokens)
        if data.reference is not None:
            ref_completion, ref_mismatched = data.reference.select(indices, 1)
            ref_completion, ref_mismatched = ref_completion.to(device), ref_mismatched.to(device)
        else:
            ref_completion, ref_mismatched = on_the_fly_reference(model, reference_model, batch, chunk_tokens)
        labels = torch.tensor([e.label for e in examples], dtype=torch.bool, device=device)
        output = objective(
            policy.chosen,
            policy.rejected,
            ref_completion,
            ref_mismatched,
            beta=beta,
            rejected_mask=policy.rejected_mask,
            labels=labels,
        )
        metrics = output.metrics()
        logps = policy.chosen.detach()
        change = logps - ref_completion.to(logps.dtype)
        desirable = labels.to(logps.dtype)
        metrics["logps/chosen"] = _side_mean(logps, desirable)
        metrics["logps/rejected"] = _side_mean(logps, 1 - desirable)
        metrics["logps/chosen_change"] = _side_mean(change, desirable)
        metrics["logps/rejected_change"] = _side_mean(change, 1 - desirable)
        return output.losses.mean(), metrics

    return step

"""The paired training step: the one place where log-probs meet an objective.

One forward over chosen and rejected rows, the reference log-probs from the cache (or a reference
forward), TRL's log-prob modifiers (LD-DPO's ``ld_alpha``: :mod:`miopt.logprobs.length_desensitised`; WPO's
``use_weighting``: :mod:`miopt.logprobs.weighted_pairs`), the objective, and the metrics under TRL's names.
The maths lives in :mod:`miopt.objectives` and :mod:`miopt.logprobs.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from miopt.data.tokenize import TokenizedExample
from miopt.logprobs.forward import as_pairs, pair_logps, sequence_logps
from miopt.logprobs.length_desensitised import ld_as_pairs, ld_pair_logps
from miopt.logprobs.packing import make_batch
from miopt.logprobs.reference import ReferenceLogps, on_the_fly_reference
from miopt.logprobs.weighted_pairs import wpo_inputs
from miopt.model.modeling import unwrap
from miopt.objectives.base import masked_mean
from miopt.objectives.modifiers import WPO_INPUTS


@dataclass
class PreferenceData:
    examples: list[TokenizedExample]
    reference: ReferenceLogps | None


def make_step_function(
    objective,
    data: PreferenceData,
    *,
    beta: float,
    pad_token_id: int,
    chunk_tokens: int,
    reference_model=None,
    packing: str = "shared-prompt",
    ld_alpha: float | None = None,
):
    """The training step ``step(model, indices) -> (loss, metrics)`` of ``objective`` on ``data``.

    ``ld_alpha``: LD-DPO log-probs for policy and reference. A WPO-weighted objective (one that reads
    :data:`~miopt.objectives.modifiers.WPO_INPUTS`) gets its per-response inputs from the same pass."""
    use_weighting = bool(objective.inputs & WPO_INPUTS)
    reference_free = objective.reference_free
    reference_pairs = pair_logps if ld_alpha is None else partial(ld_pair_logps, ld_alpha=ld_alpha)

    def step(model, indices: Sequence[int]):
        examples = [data.examples[i] for i in indices]
        device = next(unwrap(model).parameters()).device
        batch = make_batch(examples, pad_token_id, packing, model).to(device)
        result = sequence_logps(model, batch, chunk_tokens=chunk_tokens, with_log_sum_sq=use_weighting)
        policy = as_pairs(result, batch) if ld_alpha is None else ld_as_pairs(result, batch, ld_alpha)
        ref_chosen = ref_rejected = None
        if not reference_free:
            if data.reference is not None:
                ref_chosen, ref_rejected = data.reference.select(indices, batch.rejected_shape[1], ld_alpha)
                ref_chosen, ref_rejected = ref_chosen.to(device), ref_rejected.to(device)
            else:
                ref_chosen, ref_rejected = on_the_fly_reference(
                    model, reference_model, batch, chunk_tokens, reference_pairs
                )
        output = objective(
            policy.chosen,
            policy.rejected,
            ref_chosen,
            ref_rejected,
            beta=beta,
            rejected_mask=policy.rejected_mask,
            chosen_lengths=policy.chosen_lengths,
            rejected_lengths=policy.rejected_lengths,
            **(wpo_inputs(result, batch) if use_weighting else {}),
        )
        metrics = output.metrics()
        rejected = policy.rejected.detach()
        metrics["logps/chosen"] = policy.chosen.detach().mean()
        metrics["logps/rejected"] = masked_mean(rejected, policy.rejected_mask).mean()
        if ref_chosen is not None:
            metrics["logps/chosen_change"] = (policy.chosen.detach() - ref_chosen).mean()
            metrics["logps/rejected_change"] = masked_mean(
                rejected - ref_rejected, policy.rejected_mask
            ).mean()
        return output.losses.mean(), metrics

    return step

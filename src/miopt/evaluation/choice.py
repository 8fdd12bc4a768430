"""Multiple-choice scoring by log-likelihood.

Each choice is scored by ``log p(continuation | context)``, the sum of its tokens' log
probabilities; the prediction is the choice with the highest score (raw), or with the highest score
per character of the continuation (length-normalised, the ``acc_norm`` of EleutherAI's
lm-evaluation-harness, Gao et al. 2021, https://github.com/EleutherAI/lm-evaluation-harness).
Context and continuation are tokenised together and split where the context's own tokens end,
with the context's trailing whitespace moved to the continuation, as lm-evaluation-harness does
(``_encode_pair``), so a choice is scored with the tokens the model would see in running text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ChoiceScores:
    """Per choice: summed log-likelihood, number of continuation tokens and characters."""

    loglikelihoods: list[float]
    num_tokens: list[int]
    num_chars: list[int]

    @property
    def normalised(self) -> list[float]:
        """Log-likelihood per character of the continuation."""
        return [ll / max(1, chars) for ll, chars in zip(self.loglikelihoods, self.num_chars)]

    @property
    def best(self) -> int:
        return max(range(len(self.loglikelihoods)), key=lambda index: self.loglikelihoods[index])

    @property
    def best_normalised(self) -> int:
        scores = self.normalised
        return max(range(len(scores)), key=lambda index: scores[index])


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split from the encoding of their concatenation."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context = stripped
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    if whole[: len(context_ids)] != context_ids:
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return context_ids, continuation_ids
    return context_ids, whole[len(context_ids) :]


def loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """For each (context, continuation): (sum of the continuation's token log-probabilities,
    number of continuation tokens). Batches are right-padded; padding is masked."""

    encoded = [
        encode_pair(tokenizer, context, continuation, add_special_tokens)
        for context, continuation in requests
    ]
    for index, (context_ids, continuation_ids) in enumerate(encoded):
        if not context_ids:
            raise ValueError(f"request {index}: the context encodes to no tokens; give a non-empty prompt")
        if not continuation_ids:
            raise ValueError(f"request {index}: the continuation encodes to no tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda index: -sum(map(len, encoded[index])))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="score choices", unit="batch", disable=not progress, leave=False):
                batch = order[start : start + batch_size]
                sequences = [encoded[index][0] + encoded[index][1] for index in batch]
                width = max(map(len, sequences))
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, sequence in enumerate(sequences):
                    ids[row, : len(sequence)] = torch.tensor(sequence)
                    mask[row, : len(sequence)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, index in enumerate(batch):
                    context_ids, continuation_ids = encoded[index]
                    first = len(context_ids)
                    # the token at position t is predicted by the logits at position t - 1; only those
                    # rows go through log_softmax (a full batch x length x vocab copy can be gigabytes)
                    window = logits[row, first - 1 : first - 1 + len(continuation_ids)].float()
                    targets = torch.tensor(continuation_ids, device=window.device).unsqueeze(-1)
                    picked = torch.log_softmax(window, dim=-1).gather(-1, targets)
                    results[index] = (float(picked.sum()), len(continuation_ids))
    finally:
        model.train(was_training)
    return results


def score_choices(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, Sequence[str]]],
    *,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    progress: bool = False,
) -> list[ChoiceScores]:
    """Score each (context, choices) item: one :class:`ChoiceScores` per item, the continuations
    being the choices as given (callers add a separating space; see :func:`continuation`)."""
    requests = [(context, choice) for context, choices in items for choice in choices]
    flat = loglikelihoods(
        model,
        tokenizer,
        requests,
        batch_size=batch_size,
        add_special_tokens=add_special_tokens,
        progress=progress,
    )
    scores, position = [], 0
    for _, choices in items:
        chunk = flat[position : position + len(choices)]
        position += len(choices)
        scores.append(
            ChoiceScores(
                loglikelihoods=[ll for ll, _ in chunk],
                num_tokens=[count for _, count in chunk],
                num_chars=[len(choice) for choice in choices],
            )
        )
    return scores


def continuation(context: str, choice: str) -> str:
    """The choice as a continuation of ``context``: a space in between unless one is there."""
    if not context or context[-1].isspace() or choice[:1].isspace():
        return choice
    return " " + choice

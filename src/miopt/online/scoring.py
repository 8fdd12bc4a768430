"""Scoring one round's samples: a verifier, a reward model, or both (``miopt online``).

A scorer is anything with ``score(records, samples) -> [len(records)][K]`` floats: a
:class:`miopt.online.verifiers.Verifier` (rewards, e.g. 1.0 / 0.0 for a correct answer) or a
:class:`RewardModelScorer` (reward-model scores). :func:`pair_round` turns them into the round's
examples by the rules of :mod:`miopt.online.pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from miopt.data.tokenize import collate, tokenize_examples
from miopt.evaluation.tasks import EvalRecord
from miopt.model.loading import load_tokenizer
from miopt.online.pairs import Pair, PairStats, build_pairs, build_pairs_by_score
from miopt.training.reward import load_reward_model, sequence_scores


class Scorer(Protocol):
    def score(self, records: Sequence[EvalRecord], samples: Sequence[Sequence[str]]) -> list[list[float]]: ...


class RewardModelScorer:
    """Scores ``prompt + completion`` with a one-output sequence classifier (``miopt reward``'s model),
    in batches of ``batch_size`` samples on ``device`` (the policy's), under the truncation rule of
    training (:mod:`miopt.data.tokenize`, ``max_length``)."""

    def __init__(
        self, path: str, *, device: Any = "cpu", batch_size: int = 64, max_length: int = 1024
    ) -> None:

        self.name = path
        self.tokenizer = load_tokenizer(path)
        self.model = load_reward_model(path, self.tokenizer).to(device).eval().requires_grad_(False)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.no_grad()
    def score(self, records: Sequence[EvalRecord], samples: Sequence[Sequence[str]]) -> list[list[float]]:

        prompts = [record.prompt for record, texts in zip(records, samples) for _ in texts]
        completions = [(text,) for texts in samples for text in texts]
        examples, _ = tokenize_examples(
            prompts, completions, [""] * len(prompts), self.tokenizer, max_length=self.max_length
        )
        flat: list[float] = []
        for start in range(0, len(examples), self.batch_size):
            batch = collate(examples[start : start + self.batch_size], self.tokenizer.pad_token_id)
            flat.extend(sequence_scores(self.model, batch.to(self.device)).tolist())
        result, position = [], 0
        for texts in samples:
            result.append(flat[position : position + len(texts)])
            position += len(texts)
        return result


@dataclass
class RoundScores:
    """One round's verdicts: verifier rewards and/or reward-model scores, ``[prompts][K]`` each."""

    rewards: list[list[float]] | None
    scores: list[list[float]] | None


class RoundScorer:
    """The round's scoring: a verifier (``None`` = none), a reward model (``None`` = none), or both."""

    def __init__(self, verifier: Scorer | None, reward_model: Scorer | None) -> None:
        if verifier is None and reward_model is None:
            raise ValueError("a round needs a verifier or a reward model")
        self.verifier, self.reward_model = verifier, reward_model

    @property
    def name(self) -> str:
        parts = []
        if self.verifier is not None:
            parts.append(
                f"verifier {getattr(self.verifier, 'name', '?')!r}" + (" (gate)" if self.reward_model else "")
            )
        if self.reward_model is not None:
            parts.append(f"reward model {getattr(self.reward_model, 'name', '?')!r}")
        return " + ".join(parts)

    def score(self, records: Sequence[EvalRecord], samples: Sequence[Sequence[str]]) -> RoundScores:
        rewards = self.verifier.score(records, samples) if self.verifier is not None else None
        scores = self.reward_model.score(records, samples) if self.reward_model is not None else None
        return RoundScores(rewards, scores)


def pair_round(
    records: Sequence[EvalRecord],
    samples: Sequence[Sequence[str]],
    scored: RoundScores,
    *,
    threshold: float,
    margin: float,
    inject_reference: bool,
) -> tuple[list[Pair], PairStats]:
    """Pairs by score when reward-model scores exist (the verifier, if any, as the gate), else by
    verifier (:mod:`miopt.online.pairs`)."""
    if scored.scores is None:
        return build_pairs(
            records, samples, scored.rewards, threshold=threshold, inject_reference=inject_reference
        )
    gate = None
    if scored.rewards is not None:
        gate = [[value >= threshold for value in values] for values in scored.rewards]
    return build_pairs_by_score(
        records, samples, scored.scores, margin=margin, gate=gate, inject_reference=inject_reference
    )

"""Pure parts of ``miopt online``: prompt selection, pairing (by verifier or by score), metrics.

Two pairing rules, one example per prompt (a chosen response and a list of rejected ones):

* **by verifier** (:func:`build_pairs`): chosen = the first correct sample (``reward >= threshold``),
  rejected = every incorrect sample.
* **by score** (:func:`build_pairs_by_score`, ``--reward-model``): chosen = the sample with the
  highest reward-model score (the first on ties) among the *eligible* samples, rejected = every other
  sample whose score is below the chosen score by more than ``margin``
  (``s_k < s_best - margin``; ties and near-ties are neither). With a verifier *gate* only correct
  samples are eligible and every incorrect sample is rejected whatever its score: the verifier
  decides what may be preferred, the reward model ranks the rest.

In both, a prompt without an eligible sample can take its reference solution as the chosen response
(``inject_reference``; then every sample is rejected), and a prompt left with no rejected response
gives no contrast and is left out (counted in ``all_correct``).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from miopt.evaluation.metrics import pass_at_k
from miopt.evaluation.tasks import EvalRecord


@dataclass(frozen=True)
class Pair:
    """One prompt's training example: a chosen response and every rejected sample."""

    prompt: str
    chosen: str
    rejected: tuple[str, ...]
    source: str
    injected: bool


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    injected: int = 0
    no_correct: int = 0  # prompts none of whose samples is correct (eligible)
    all_correct: int = 0  # prompts with no rejected sample (no contrast; left out)
    no_positive: int = 0  # prompts left out for want of a positive


def round_prompts(pool_size: int, per_round: int, round_index: int, seed: int) -> list[int]:
    """Indices of round ``round_index``'s prompts (1-based rounds): consecutive slices of one seeded
    shuffle of the pool, wrapping around; the same on every run and after a resume."""
    if pool_size < 1:
        return []
    order = list(range(pool_size))
    random.Random(seed).shuffle(order)
    count = min(per_round, pool_size)
    start = (round_index - 1) * count
    return [order[(start + offset) % pool_size] for offset in range(count)]


def _finish(
    record: EvalRecord,
    chosen: str | None,
    negatives: tuple[str, ...],
    inject_reference: bool,
    stats: PairStats,
    pairs: list[Pair],
) -> None:
    """Shared end of both rules: no contrast, injection, no positive."""
    if chosen is None:
        stats.no_correct += 1
    if not negatives:
        stats.all_correct += 1
        return
    injected = False
    if chosen is None:
        if not (inject_reference and record.solution):
            stats.no_positive += 1
            return
        chosen, injected = record.solution, True
    pairs.append(Pair(record.prompt, chosen, negatives, record.source, injected))
    stats.injected += injected


def build_pairs(
    records: Sequence[EvalRecord],
    samples: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    *,
    threshold: float = 0.5,
    inject_reference: bool = False,
) -> tuple[list[Pair], PairStats]:
    """Pairing by verifier (module docstring): the first correct sample against every incorrect one."""
    pairs: list[Pair] = []
    stats = PairStats()
    for record, texts, scores in zip(records, samples, rewards):
        stats.prompts += 1
        if len(texts) != len(scores):
            raise ValueError(f"{record.source}: {len(texts)} samples but {len(scores)} rewards")
        correct = [score >= threshold for score in scores]
        positives = [text for text, flag in zip(texts, correct) if flag]
        negatives = tuple(text for text, flag in zip(texts, correct) if not flag)
        _finish(record, positives[0] if positives else None, negatives, inject_reference, stats, pairs)
    stats.pairs = len(pairs)
    return pairs, stats


def build_pairs_by_score(
    records: Sequence[EvalRecord],
    samples: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    margin: float = 0.0,
    gate: Sequence[Sequence[bool]] | None = None,
    inject_reference: bool = False,
) -> tuple[list[Pair], PairStats]:
    """Pairing by score (module docstring): the best eligible sample against those scored more than
    ``margin`` below it; with ``gate`` (per-sample verifier verdicts) only correct samples are
    eligible and every incorrect one is rejected."""
    pairs: list[Pair] = []
    stats = PairStats()
    for index, (record, texts, values) in enumerate(zip(records, samples, scores)):
        stats.prompts += 1
        if len(texts) != len(values):
            raise ValueError(f"{record.source}: {len(texts)} samples but {len(values)} scores")
        passed = list(gate[index]) if gate is not None else [True] * len(texts)
        eligible = [k for k, ok in enumerate(passed) if ok]
        if eligible:
            best = max(eligible, key=lambda k: (values[k], -k))
            negatives = tuple(
                text
                for k, text in enumerate(texts)
                if k != best and (not passed[k] or values[k] < values[best] - margin)
            )
            _finish(record, texts[best], negatives, inject_reference, stats, pairs)
        else:
            _finish(record, None, tuple(texts), inject_reference, stats, pairs)
    stats.pairs = len(pairs)
    return pairs, stats


def sample_metrics(rewards: Sequence[Sequence[float]], threshold: float = 0.5) -> dict[str, float]:
    """pass@1 and pass@K on the sampled prompts (Chen et al. 2021, eq. 1, with ``n = k_max = K``),
    the fraction of prompts with no correct sample and the mean reward."""

    if not rewards:
        return {"pass@1": 0.0, "pass@K": 0.0, "no_correct_fraction": 0.0, "reward_mean": 0.0}
    counts = [(len(values), sum(value >= threshold for value in values)) for values in rewards]
    flat = [value for values in rewards for value in values]
    return {
        "pass@1": sum(pass_at_k(n, c, 1) for n, c in counts) / len(counts),
        "pass@K": sum(pass_at_k(n, c, n) for n, c in counts) / len(counts),
        "no_correct_fraction": sum(c == 0 for _, c in counts) / len(counts),
        "reward_mean": sum(flat) / len(flat),
    }


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def score_distribution(scores: Sequence[Sequence[float]], prefix: str = "rm_score") -> dict[str, float]:
    """Mean, standard deviation and quantiles (min, 10%, 50%, 90%, max) of one round's sample
    scores, and the mean within-prompt spread (best minus worst), under ``prefix/``."""
    flat = sorted(value for values in scores for value in values)
    if not flat:
        return {}
    spreads = [max(values) - min(values) for values in scores if values]
    return {
        f"{prefix}/mean": statistics.fmean(flat),
        f"{prefix}/std": statistics.pstdev(flat),
        f"{prefix}/min": flat[0],
        f"{prefix}/p10": _quantile(flat, 0.1),
        f"{prefix}/median": _quantile(flat, 0.5),
        f"{prefix}/p90": _quantile(flat, 0.9),
        f"{prefix}/max": flat[-1],
        f"{prefix}/prompt_spread": statistics.fmean(spreads),
    }

"""Accuracy, its 95% confidence interval, pass@k and majority voting."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def accuracy(correct: Sequence[bool]) -> float:
    """The fraction of ``True``; 0.0 for no items."""
    return sum(bool(flag) for flag in correct) / len(correct) if correct else 0.0


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927, "Probable inference, the
    law of succession, and statistical inference", JASA 22(158); recommended over the normal
    approximation by Brown, Cai and DasGupta 2001, Statistical Science 16(2)). It stays inside
    [0, 1] and is sensible at 0% and 100%. Returns (0.0, 1.0) for ``total == 0``."""
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= total else min(1.0, centre + half)
    return low, high


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from ``n`` samples of which ``c`` are correct:
    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code", eq. 1), computed as a stable product."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n (k={k}, n={n})")
    if not 0 <= c <= n:
        raise ValueError(f"correct count {c} outside 0..{n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def majority_vote(answers: Sequence[T | None], same: Callable[[T, T], bool] | None = None) -> T | None:
    """The most frequent answer, ``None`` (no answer extracted) never voting; ties go to the answer
    seen first. ``same`` groups equivalent answers (default: equality). This is self-consistency
    decoding (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in Language
    Models")."""
    groups: list[tuple[T, int]] = []
    for answer in answers:
        if answer is None:
            continue
        for index, (representative, count) in enumerate(groups):
            if answer == representative or (same is not None and same(representative, answer)):
                groups[index] = (representative, count + 1)
                break
        else:
            groups.append((answer, 1))
    if not groups:
        return None
    best = max(count for _, count in groups)
    return next(representative for representative, count in groups if count == best)

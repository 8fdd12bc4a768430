"""Settings chosen per arm on the validation split, before anything is scored on the held-out set.

A preset's ``settings_grid`` lists candidates, each a tuple of ``(TrainOptions field, value)``
overrides of its shared preference options. Every arm trains once per candidate with seed 0; each
final model is scored greedily on the task's validation split (problems disjoint from the held-out
ones). The candidate with the highest validation accuracy, the first listed on a tie, becomes the
arm's setting for every seed; the seed-0 run of that candidate is the arm's seed-0 run, so the
selection costs one extra training per further candidate. Each method gets its own tuned setting,
chosen on data that is not the test set, so no arm is judged at another's best setting. The scores
and the choice are kept in :data:`SELECTION_FILE`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

SELECTION_FILE = "settings.json"
Candidate = tuple[tuple[str, Any], ...]
# Short names in run folder names: runs/<objective>-<tag>-seed<S>
_ABBREVIATIONS = {"learning_rate": "lr", "beta": "beta", "max_steps": "steps", "batch_size": "bs"}


def candidate_tag(candidate: Candidate) -> str:
    """A folder-safe name of a candidate, e.g. ``lr3e-05`` or ``lr1e-05-beta0.3``."""
    return "-".join(f"{_ABBREVIATIONS.get(name, name)}{value:g}" for name, value in candidate) or "base"


def apply_candidate(preference: dict[str, Any], candidate: Candidate) -> dict[str, Any]:
    return {**preference, **dict(candidate)}


def pick(scores: Sequence[tuple[Candidate, float]]) -> Candidate:
    """The candidate of the highest score; the earliest listed on a tie."""
    if not scores:
        raise ValueError("no candidates to choose from")
    best = max(score for _, score in scores)
    return next(candidate for candidate, score in scores if score == best)


def select_settings(
    objectives: Sequence[str],
    grid: Sequence[Candidate],
    validation_accuracy: Callable[[str, Candidate], float],
) -> dict[str, Any]:
    """For each objective, ``validation_accuracy(objective, candidate)`` of every candidate and the
    chosen one. Returns the record written to :data:`SELECTION_FILE` (without its key)."""
    record: dict[str, Any] = {}
    for objective in objectives:
        scores = [(candidate, validation_accuracy(objective, candidate)) for candidate in grid]
        chosen = pick(scores)
        record[objective] = {
            "candidates": [
                {"settings": dict(candidate), "validation_accuracy": score} for candidate, score in scores
            ],
            "chosen": dict(chosen),
            "chosen_tag": candidate_tag(chosen),
        }
    return record

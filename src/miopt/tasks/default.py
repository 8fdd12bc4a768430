"""The built-in task's splits, shared by the default run, ``miopt compare --preset arith``,
``miopt online --data arithmetic`` and the shipped start's recipe.

One stream (:func:`miopt.tasks.arithmetic.generate_splits`, seeded) gives a training pool of
``pool_problems`` distinct problems and the ``heldout_problems`` after them (the held-out set, the
same 1,000 problems as every earlier measurement). The pool is carved into a validation split (its
first ``validation_problems``, for choosing settings) and the preference prompts (its last
``preference_prompts``). The shipped start trains on fresh problems from a second stream
(:func:`start_problems`) that excludes the whole pool and the held-out set, so the start has seen
neither a held-out, a validation nor a preference problem.
"""

from __future__ import annotations

from dataclasses import dataclass

from miopt.tasks import arithmetic


@dataclass(frozen=True)
class DefaultTask:
    """Sizes of the built-in task's splits (docs/experiments.md)."""

    seed: int = 0
    pool_problems: int = 24800
    validation_problems: int = 1000
    preference_prompts: int = 4800
    heldout_problems: int = 1000
    max_length: int = 128
    max_new_tokens: int = 64
    difficulty: arithmetic.Difficulty = arithmetic.STANDARD

    def __post_init__(self) -> None:
        if self.validation_problems + self.preference_prompts > self.pool_problems:
            raise ValueError("validation_problems + preference_prompts must fit in pool_problems")


@dataclass(frozen=True)
class Splits:
    validation: list[arithmetic.Problem]
    preference: list[arithmetic.Problem]
    heldout: list[arithmetic.Problem]


def task_splits(task: DefaultTask) -> Splits:
    """Validation, preference-prompt and held-out problems (pairwise disjoint)."""
    pool, heldout = arithmetic.generate_splits(
        task.pool_problems, task.heldout_problems, seed=task.seed, difficulty=task.difficulty
    )
    return Splits(
        validation=pool[: task.validation_problems],
        preference=pool[task.pool_problems - task.preference_prompts :],
        heldout=heldout,
    )


def reserved_questions(task: DefaultTask) -> set[str]:
    """Every question of the pool and the held-out set: what the start's data never contains."""
    pool, heldout = arithmetic.generate_splits(
        task.pool_problems, task.heldout_problems, seed=task.seed, difficulty=task.difficulty
    )
    return {problem.expression for problem in pool + heldout}


def start_problems(count: int, seed: int, task: DefaultTask | None = None) -> list[arithmetic.Problem]:
    """The shipped start's training problems: ``count`` fresh ones, none reserved by ``task``."""
    task = task or DefaultTask()
    return arithmetic.fresh_problems(
        count, seed, exclude=reserved_questions(task), difficulty=task.difficulty
    )

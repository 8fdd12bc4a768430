"""The built-in multi-step arithmetic task.

Problems ``Q: a+b-c(+d)=?`` with operands 1-99 and no negative intermediate result; the worked
solution writes one step per operation and ends ``A: <answer>`` (``a+b=x. x-c=y. A: y``). Generation
is deterministic by seed; the train and held-out splits never share a question. :class:`Difficulty`
makes it harder (larger operands, more of them) for stronger models; its default is the task above.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from dataclasses import dataclass

ANSWER_PATTERN = re.compile(r"A:\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    operators: tuple[str, ...]  # one fewer than operands, each "+" or "-"

    @property
    def expression(self) -> str:
        text = str(self.operands[0])
        for operator, operand in zip(self.operators, self.operands[1:]):
            text += f"{operator}{operand}"
        return text

    @property
    def prompt(self) -> str:
        return f"Q: {self.expression}=?\n"

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, operator, right, result) for each operation, left to right."""
        rows, value = [], self.operands[0]
        for operator, operand in zip(self.operators, self.operands[1:]):
            result = value + operand if operator == "+" else value - operand
            rows.append((value, operator, operand, result))
            value = result
        return rows

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    @property
    def solution(self) -> str:
        return render_steps(self.steps())


def render_steps(steps: list[tuple[int, str, int, int]]) -> str:
    """``a+b=x. x-c=y. A: y``; the answer is the last step's result."""
    body = " ".join(f"{left}{operator}{right}={result}." for left, operator, right, result in steps)
    return f"{body} A: {steps[-1][3]}"


@dataclass(frozen=True)
class Difficulty:
    """Operands are drawn from 1..``max_operand``; a problem has one of ``operand_counts`` of them."""

    max_operand: int = 99
    operand_counts: tuple[int, ...] = (3, 4)


STANDARD = Difficulty()


def random_problem(rng: random.Random, difficulty: Difficulty = STANDARD) -> Problem:
    while True:
        count = rng.choice(difficulty.operand_counts)
        operands = tuple(rng.randint(1, difficulty.max_operand) for _ in range(count))
        operators = tuple(rng.choice("+-") for _ in range(count - 1))
        problem = Problem(operands, operators)
        if all(step[3] >= 0 for step in problem.steps()):
            return problem


def generate_splits(
    n_train: int, n_heldout: int, seed: int = 0, difficulty: Difficulty = STANDARD
) -> tuple[list[Problem], list[Problem]]:
    """Distinct problems: ``n_train`` for training, ``n_heldout`` held out (no shared question)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < n_train + n_heldout:
        problem = random_problem(rng, difficulty)
        if problem.expression not in seen:
            seen.add(problem.expression)
            problems.append(problem)
    return problems[:n_train], problems[n_train:]


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong worked solution: one step's result is off by 1, 2 or 10, and the error
    carries through the later steps."""
    steps = problem.steps()
    broken = rng.randrange(len(steps))
    rows, value = [], problem.operands[0]
    for index, (_, operator, operand, _) in enumerate(steps):
        result = value + operand if operator == "+" else value - operand
        if index == broken:
            result += rng.choice((-10, -2, -1, 1, 2, 10))
        rows.append((value, operator, operand, result))
        value = result
    return render_steps(rows)


def extract_answer(text: str) -> int | None:
    """The integer after the first ``A:`` in a generated solution, else None."""
    match = ANSWER_PATTERN.search(text)
    return int(match.group(1)) if match else None


def is_correct(text: str, answer: int) -> bool:
    return extract_answer(text) == answer


def fresh_problems(
    count: int, seed: int, exclude: Collection[str] = (), difficulty: Difficulty = STANDARD
) -> list[Problem]:
    """``count`` distinct problems from their own seeded stream (``Random("fresh:<seed>")``, apart
    from :func:`generate_splits`' stream), none of whose question is in ``exclude``."""
    rng = random.Random(f"fresh:{seed}")
    seen = set(exclude)
    problems: list[Problem] = []
    while len(problems) < count:
        problem = random_problem(rng, difficulty)
        if problem.expression not in seen:
            seen.add(problem.expression)
            problems.append(problem)
    return problems

"""Verifiers: the reward of one sampled response, for online training (``miopt online``).

A verifier scores a completion of an :class:`~miopt.evaluation.tasks.EvalRecord`. Two kinds:

* **built in** -- the answer checking of the evaluation harness (:func:`miopt.evaluation.answers.check`):
  ``builtin`` checks each record by its own answer type (GSM8K numbers, MATH by math-verify, the
  arithmetic task, exact strings); ``number``, ``math``, ``arithmetic`` or ``exact`` force one type.
  The reward is 1.0 for a correct final answer, else 0.0.
* **pluggable** -- ``module:function`` (or ``path/to/file.py:function``; ``function`` may be
  dotted, ``module:Class.method``) naming a Python callable called as
  ``function(prompt, completion, answer)`` with three strings (the prompt as given to the model,
  the sampled completion without the prompt, the record's gold answer) that returns a bool or a
  real number.

Every failure -- a module or function that cannot be found, a call that raises, a return value
that is neither a bool nor a finite number -- is a :class:`VerifierError` naming the spec (and,
for a call, the record and sample).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from miopt.errors import OptionError
from miopt.evaluation import answers
from miopt.evaluation.tasks import EvalRecord

BUILTIN = "builtin"
BUILTIN_NAMES = (BUILTIN, *answers.ANSWER_TYPES)

RewardFunction = Callable[[str, str, str], Any]
"""The user's callable: ``(prompt, completion, answer) -> bool | float``."""


class VerifierError(OptionError):
    """A verifier that cannot be loaded, raises, or returns something that is not a reward."""


class Verifier:
    """Scores completions; ``verifier(record, completion) -> float``.

    ``name`` is the spec it was loaded from (shown in errors and logs).
    """

    def __init__(self, name: str, function: RewardFunction, *, builtin_type: str | None = None) -> None:
        self.name = name
        self.function = function
        self.builtin_type = builtin_type
        self.is_builtin = function is _check_builtin

    def __call__(self, record: EvalRecord, completion: str, *, sample: int | None = None) -> float:
        where = f"record {record.source or '?'}" + (f", sample {sample}" if sample is not None else "")
        try:
            if self.is_builtin:
                value = _check_builtin(record, completion, self.builtin_type)
            else:
                value = self.function(record.prompt, completion, record.gold)
        except VerifierError:
            raise
        except Exception as error:
            raise VerifierError(
                f"verifier {self.name!r} raised {type(error).__name__}: {error} ({where})"
            ) from error
        return as_reward(value, self.name, where)

    def score(self, records: Sequence[EvalRecord], samples: Sequence[Sequence[str]]) -> list[list[float]]:
        """Rewards ``[len(records)][K]`` of each record's samples."""
        return [
            [self(record, text, sample=k) for k, text in enumerate(texts)]
            for record, texts in zip(records, samples)
        ]


def as_reward(value: Any, name: str, where: str = "") -> float:
    """A verifier's return value as a float: a bool is 1.0 / 0.0, a real number itself."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, numbers.Real):
        reward = float(value)
        if math.isfinite(reward):
            return reward
    else:
        item = getattr(value, "item", None)  # numpy / torch scalars
        if callable(item) and getattr(value, "shape", None) in ((), None):
            try:
                return as_reward(item(), name, where)
            except (TypeError, ValueError):
                pass
    suffix = f" ({where})" if where else ""
    raise VerifierError(
        f"verifier {name!r} returned {value!r} ({type(value).__name__}); expected a bool or a finite number"
        + suffix
    )


def _check_builtin(record: EvalRecord, completion: str, answer_type: str | None) -> bool:
    kind = answer_type or record.answer_type
    if kind not in answers.ANSWER_TYPES:
        raise VerifierError(
            f"verifier {BUILTIN!r} cannot check {kind!r} records ({record.source}); online training needs "
            f"generation records ({', '.join(answers.ANSWER_TYPES)})"
        )
    return answers.check(kind, completion, record.gold).correct


def _import_module(module_name: str, spec: str):
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise VerifierError(f"verifier {spec!r}: file {module_name!r} not found")
        unique = f"miopt_verifier_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(unique, path)
        if module_spec is None or module_spec.loader is None:
            raise VerifierError(f"verifier {spec!r}: cannot import {module_name!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[unique] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            sys.modules.pop(unique, None)
            raise VerifierError(
                f"verifier {spec!r}: importing {module_name!r} raised {type(error).__name__}: {error}"
            ) from error
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise VerifierError(
                f"verifier {spec!r}: module {module_name!r} not found (is it installed or on PYTHONPATH?)"
            ) from error
        raise VerifierError(f"verifier {spec!r}: importing module {module_name!r} failed: {error}") from error
    except Exception as error:
        raise VerifierError(
            f"verifier {spec!r}: importing module {module_name!r} raised {type(error).__name__}: {error}"
        ) from error


def load_verifier(spec: str) -> Verifier:
    """The verifier named by ``spec``: ``builtin``, an answer type, or ``module:function``."""
    spec = (spec or "").strip()
    if spec in BUILTIN_NAMES:
        return Verifier(spec, _check_builtin, builtin_type=None if spec == BUILTIN else spec)
    module_name, colon, attribute = spec.rpartition(":")
    if not colon or not module_name or not attribute:
        raise VerifierError(
            f"verifier {spec!r}: expected {', '.join(BUILTIN_NAMES)} or module:function "
            "(a Python callable (prompt, completion, answer) -> bool | float)"
        )
    target: Any = _import_module(module_name, spec)
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise VerifierError(f"verifier {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise VerifierError(f"verifier {spec!r}: {attribute!r} is a {type(target).__name__}, not callable")
    return Verifier(spec, target)


__all__ = ["BUILTIN_NAMES", "RewardFunction", "Verifier", "VerifierError", "as_reward", "load_verifier"]

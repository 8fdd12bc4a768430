"""Answer extraction and checking: GSM8K-style numbers, MATH-style ``\\boxed{}`` answers, the
built-in arithmetic task and exact strings.

Rules (docs/evaluation.md):

* **number** (GSM8K). The reference answer is the number after the last ``####`` (GSM8K's own
  format, Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"). A prediction's
  answer is, in order of preference: the number after the last ``####``; the number after the last
  final-answer phrase (``A:``, ``Answer:``, ``the answer is``); the content of the last
  ``\\boxed{...}``; else the last number in the text (calculator annotations ``<<...>>`` ignored).
  Numbers are read with ``$``, thousands commas, a leading sign, units and trailing periods
  handled, and compared exactly as rationals (``18 == 18.00 == $18``; ``9.999 != 10``).
* **math** (MATH, Hendrycks et al. 2021). Gold and prediction are parsed and compared for
  mathematical equivalence by math-verify (Hugging Face, https://github.com/huggingface/Math-Verify),
  which prefers the last ``\\boxed{}`` answer.
* **arithmetic**: the integer after ``A:``, as in :mod:`miopt.tasks.arithmetic`.
* **exact**: whitespace-trimmed, case-folded string equality.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from miopt.tasks import arithmetic

ANSWER_TYPES = ("number", "math", "arithmetic", "exact")

# A number: optional sign and dollar sign, digits with optional thousands commas, an optional
# decimal part, an optional denominator (``3/4``); or a bare decimal (``.5``).
_NUMBER = (
    r"[-\u2212]?\$?[ \t]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:[ \t]?/[ \t]?\d+(?![\d.]))?"
)
NUMBER_RE = re.compile(r"(?<![\w.,])" + _NUMBER)
_NUMBER_AT = re.compile(r"\s*(" + _NUMBER + r")")
_FINAL_MARKERS = re.compile(r"(?:(?<![\w])A\s*:|\banswer\s*(?:is)?\s*:|\banswer\s+is\b)", re.IGNORECASE)
_HASHES = re.compile(r"####")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class Verdict:
    """The extracted answer (None when none was found) and whether it matches the gold answer."""

    extracted: str | None
    correct: bool


def _value(text: str) -> Fraction | None:
    """A matched number's value: ``$``, spaces and commas dropped, ``a/b`` divided."""
    text = text.replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "").replace("\t", "")
    numerator, _, denominator = text.partition("/")
    if denominator:
        if int(denominator) == 0:
            return None
        return Fraction(numerator) / int(denominator)
    return Fraction(numerator)


def is_number(text: str) -> bool:
    """Whether ``text`` is one number and nothing else (``"1,234"``, ``"$5"``, ``"-0.5"``)."""
    return re.fullmatch(r"\s*(?:" + _NUMBER + r")\s*", text) is not None


def parse_number(text: str) -> Fraction | None:
    """The number at the start of ``text`` (after whitespace, ``$``, a sign), else None.

    ``"$1,234.50 dollars."`` -> 2469/2; ``"-3"`` -> -3; ``"1/2"`` -> 1/2; ``"many"`` -> None.
    """
    match = _NUMBER_AT.match(text)
    return None if match is None else _value(match.group(1))


def format_number(value: Fraction) -> str:
    """Canonical text of a number: ``18``, ``-0.5``, ``1/3`` (a repeating decimal stays a fraction)."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator, places = value.denominator, 0
    while denominator % 10 == 0 or denominator % 2 == 0 or denominator % 5 == 0:
        denominator //= 10 if denominator % 10 == 0 else 2 if denominator % 2 == 0 else 5
        places += 1
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
    return ("-" if value < 0 else "") + text


def last_number(text: str) -> Fraction | None:
    """The last number in ``text``, calculator annotations ``<<...>>`` removed; a minus sign that
    follows a number (``20 - 5``) is read as subtraction, not as a sign."""
    text = _CALCULATOR.sub(" ", text)
    for match in reversed(list(NUMBER_RE.finditer(text))):
        candidate = match.group(0)
        if candidate[0] in "-\u2212" and re.search(r"[\d)]\s*$", text[: match.start()]):
            candidate = candidate[1:]
        value = _value(candidate)
        if value is not None:
            return value
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index]
    return None


def _strip_latex_number(text: str) -> str:
    text = text.replace("\\$", "$").replace("\\!", "").replace("{,}", ",").replace("\\,", "")
    text = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", text)
    return re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", text)


def extract_number(text: str) -> Fraction | None:
    """The final numeric answer of a solution (module docstring, rule **number**)."""
    for pattern in (_HASHES, _FINAL_MARKERS):
        for match in reversed(list(pattern.finditer(text))):
            value = parse_number(text[match.end() :])
            if value is not None:
                return value
    boxed = extract_boxed(text)
    if boxed is not None:
        value = parse_number(_strip_latex_number(boxed))
        if value is not None:
            return value
    return last_number(text)


def gsm8k_reference(answer: str) -> Fraction | None:
    """The gold number of a GSM8K reference solution: the number after its last ``####``
    (or its final ``A:`` line, as in example_model_solutions.jsonl's ``ground_truth``)."""
    for pattern in (_HASHES, _FINAL_MARKERS):
        matches = list(pattern.finditer(answer))
        if matches:
            return parse_number(answer[matches[-1].end() :])
    return None


def check_number(output: str, gold: str | int | float | Fraction) -> Verdict:
    """GSM8K checking: the prediction's final number equals the gold number exactly."""
    gold_value = gold if isinstance(gold, Fraction) else parse_number(str(gold))
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    value = extract_number(output)
    if value is None:
        return Verdict(None, False)
    return Verdict(format_number(value), value == gold_value)


def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _math_parse(text: str, *, gold: bool) -> list:
    from math_verify import parse

    if gold and "$" not in text and "\\boxed" not in text and "\\(" not in text and "\\[" not in text:
        text = f"${text}$"
    return parse(text, parsing_timeout=_timeout())


def check_math(output: str, gold: str) -> Verdict:
    """MATH-style checking by math-verify: the prediction's final (preferably boxed) answer is
    mathematically equivalent to ``gold`` (a bare answer such as ``\\frac{1}{2}``, or a solution
    with a ``\\boxed{}`` answer)."""
    from math_verify import verify

    gold_parsed = _math_parse(str(gold), gold=True)
    predicted = _math_parse(output, gold=False)
    if not predicted:
        return Verdict(None, False)
    extracted = str(predicted[-1]) if isinstance(predicted[-1], str) else str(predicted[0])
    if not gold_parsed:
        return Verdict(extracted, False)
    return Verdict(extracted, bool(verify(gold_parsed, predicted, timeout_seconds=_timeout())))


def check_arithmetic(output: str, gold: str | int) -> Verdict:
    """The built-in task: the integer after ``A:`` equals the answer."""
    value = arithmetic.extract_answer(output)
    if value is None:
        return Verdict(None, False)
    return Verdict(str(value), value == int(gold))


def check_exact(output: str, gold: str) -> Verdict:
    extracted = output.strip()
    return Verdict(extracted, extracted.casefold() == str(gold).strip().casefold())


def check(answer_type: str, output: str, gold: str) -> Verdict:
    """Dispatch on ``answer_type`` (one of :data:`ANSWER_TYPES`)."""
    if answer_type == "number":
        return check_number(output, gold)
    if answer_type == "math":
        return check_math(output, gold)
    if answer_type == "arithmetic":
        return check_arithmetic(output, gold)
    if answer_type == "exact":
        return check_exact(output, gold)
    raise ValueError(f"unknown answer type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)}")


def equivalent(answer_type: str, first: str, second: str) -> bool:
    """Whether two extracted answers are the same (for majority voting)."""
    if answer_type == "math":
        from math_verify import verify

        try:
            return bool(
                verify(
                    _math_parse(first, gold=True), _math_parse(second, gold=True), timeout_seconds=_timeout()
                )
            )
        except Exception:  # math-verify can raise on odd input: treat the answers as different
            return first == second
    return first == second

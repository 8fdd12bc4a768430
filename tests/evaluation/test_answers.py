"""Answer extraction/checking, metrics and record loading (no model needed)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from itertools import combinations

import pytest

from miopt.errors import DataError
from miopt.evaluation import answers
from miopt.evaluation.metrics import accuracy, majority_vote, pass_at_k, wilson_interval
from miopt.evaluation.tasks import few_shot_prefix, load_records, parse_record


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("so the total is 1,234.\n#### 1,234", "1234"),
        ("Steps...\nA: 18", "18"),
        ("Steps...\nA: $1,050.50.", "1050.5"),
        ("The answer is 42 apples.", "42"),
        ("The answer is: -7", "-7"),
        ("Final Answer: 3/4", "0.75"),
        ("blah 16 - 3 = <<16-3=13>>13 eggs.", "13"),
        ("It costs 20 - 5", "5"),
        ("x = -5", "-5"),
        ("The final answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),
        ("So we get \\boxed{1{,}000}", "1000"),
        ("A: 9.999999999999999", "9.999999999999999"),
        ("A: 1/3", "1/3"),
        ("He has 3,000 dollars left.", "3000"),
        ("no number here", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    value = answers.extract_number(text)
    assert (None if value is None else answers.format_number(value)) == expected


def test_later_final_answer_wins_over_earlier_and_over_last_number() -> None:
    text = "A: 3 is wrong.\nLet me redo it: 4+5=9, so A: 9 (that is 9 of 20)"
    assert answers.extract_number(text) == 9
    assert answers.extract_number("#### 12\nA: 13 extra 99") == 12  # '####' is preferred


def test_check_number_is_exact_and_format_tolerant() -> None:
    assert answers.check_number("A: $18.00", "18").correct
    assert answers.check_number("#### 1,000", "1000").correct
    assert not answers.check_number("A: 9.999999", "10").correct
    assert answers.check_number("nothing", "3") == answers.Verdict(None, False)
    with pytest.raises(ValueError):
        answers.check_number("A: 3", "three")


def test_gsm8k_reference() -> None:
    assert answers.gsm8k_reference("a\nb\n#### 5,000") == 5000
    assert answers.gsm8k_reference("steps\nA: 18") == 18
    assert answers.gsm8k_reference("no final line 12") is None


def test_extract_boxed_nested() -> None:
    assert answers.extract_boxed("x \\boxed{1} then \\boxed{\\frac{a}{b}}.") == "\\frac{a}{b}"
    assert answers.extract_boxed("\\boxed{unclosed") is None
    assert answers.extract_boxed("none") is None


def test_check_math_uses_equivalence() -> None:
    assert answers.check_math("so $\\boxed{\\frac{1}{2}}$", "0.5").correct
    assert answers.check_math("thus \\boxed{\\frac{2}{4}}", "\\frac12").correct
    assert answers.check_math("giving \\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}").correct
    assert not answers.check_math("giving \\boxed{3}", "4").correct
    assert answers.check_math("no answer at all", "4").extracted is None


def test_check_arithmetic_and_exact() -> None:
    assert answers.check_arithmetic("3+4=7. 7-2=5. A: 5", 5) == answers.Verdict("5", True)
    assert not answers.check_arithmetic("3+4=7. A: 6", "7").correct
    assert answers.check("exact", "  Paris ", "paris").correct
    with pytest.raises(ValueError):
        answers.check("nope", "a", "b")


def test_wilson_interval() -> None:
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert accuracy([True, False, True, True]) == 0.75


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 5, 2), (4, 4, 4), (7, 3, 7)])
def test_pass_at_k_matches_brute_force(n: int, c: int, k: int) -> None:
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    expected = sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_majority_vote() -> None:
    assert majority_vote(["3", "4", "4", None, None, None]) == "4"
    assert majority_vote(["3", "4"]) == "3"  # tie: first seen
    assert majority_vote([None, None]) is None
    assert majority_vote(["0.5", "1/2", "3"], same=lambda a, b: Fraction(a) == Fraction(b)) == "0.5"


def _write(path, rows) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def test_load_all_formats(tmp_path) -> None:
    file = tmp_path / "mixed.jsonl"
    _write(
        file,
        [
            {"question": "How many?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
            {"question": "Q2", "ground_truth": "1+1=2\nA: 2"},
            {"problem": "Half?", "solution": "It is $\\boxed{\\frac12}$."},
            {"question": "Sky?", "choices": {"text": ["red", "blue"], "label": ["A", "B"]}, "answerKey": "B"},
            {"question": "One?", "choices": ["1", "2", "3"], "answer": 0},
            {"prompt": "2+3=", "answer": "5"},
            {"prompt": "Capital of France:", "answer": "Paris", "answer_type": "exact"},
            {"prompt": "Pick:", "choices": ["x", "y"], "answer": "y"},
            {"prompt": "Simplify 2/4", "answer": "\\frac{1}{2}"},
        ],
    )
    records = load_records(file)
    assert [r.answer_type for r in records] == [
        "number", "number", "math", "choice", "choice", "number", "exact", "choice", "math",
    ]  # fmt: skip
    assert records[0].prompt == "Question: How many?\nAnswer:\n" and records[0].gold == "4"
    assert records[1].gold == "2"
    assert records[2].gold == "\\frac12"
    assert records[3].gold_index == 1 and records[3].gold == "blue"
    assert records[3].prompt == "Question: Sky?\nAnswer:"
    assert records[7].gold_index == 1
    assert records[0].source == f"{file}:1"
    assert len(load_records(file, limit=2)) == 2
    prefix = few_shot_prefix(records[:2])
    assert (
        prefix
        == "Question: How many?\nAnswer:\n2+2=<<2+2=4>>4\n#### 4\n\nQuestion: Q2\nAnswer:\n1+1=2\nA: 2\n\n"
    )


def test_builtin_arithmetic_records() -> None:
    from miopt.tasks.arithmetic import generate_splits

    records = load_records("arithmetic:n_train=50,n_heldout=20,seed=3", limit=5)
    _, heldout = generate_splits(50, 20, seed=3)
    assert [r.prompt for r in records] == [p.prompt for p in heldout[:5]]
    assert [r.gold for r in records] == [str(p.answer) for p in heldout[:5]]
    with pytest.raises(DataError, match="n_train=N"):
        load_records("arithmetic:bogus=1")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"question": "a", "answer": "#### 1"}', "{not json"], r"bad\.jsonl:2: malformed JSON"),
        (
            [{"question": "a", "answer": "#### 1"}, {"question": "b"}],
            r"bad\.jsonl:2: field 'answer': missing",
        ),
        ([{"text": "a"}], r"bad\.jsonl:1: unrecognised record \(fields: text\)"),
        ([{"problem": "a"}], r"bad\.jsonl:1: field 'solution': missing"),
        ([{"prompt": "a"}], r"bad\.jsonl:1: field 'answer': missing"),
        ([{"question": "a", "answer": "no final number"}], r"bad\.jsonl:1: field 'answer': no final answer"),
        ([{"question": "a", "choices": ["x", "y"], "answer": 5}], r"bad\.jsonl:1: field 'answer': index 5"),
        (
            [{"question": "a", "choices": ["x"], "answer": 0}],
            r"field 'choices': expected a list of at least two",
        ),
        ([{"prompt": "a", "answer": "1", "answer_type": "fuzzy"}], r"field 'answer_type'"),
        (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_input_names_file_line_field(tmp_path, rows, message) -> None:
    file = tmp_path / "bad.jsonl"
    _write(file, rows)
    with pytest.raises(DataError, match=message):
        load_records(file)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="nowhere.jsonl: file not found"):
        load_records(tmp_path / "nowhere.jsonl")


def test_parse_record_generic_number_detection() -> None:
    assert parse_record({"prompt": "p", "answer": "$1,000"}, "x").answer_type == "number"
    assert parse_record({"prompt": "p", "answer": 7}, "x").answer_type == "number"
    assert parse_record({"prompt": "p", "answer": "x^2"}, "x").answer_type == "math"

"""The answer checker and the pairs converter on the real GSM8K files in ../shared/data/gsm8k."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from miopt.errors import DataError
from miopt.evaluation.answers import check_number, format_number, gsm8k_reference
from miopt.evaluation.gsm8k_pairs import (
    EVAL_FILE,
    HELDOUT_FILE,
    MANIFEST_FILE,
    TRAIN_FILE,
    convert_gsm8k_pairs,
)
from miopt.evaluation.tasks import load_records
from miopt.tasks.gsm8k import gsm8k_prompt

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
SAMPLE_FIELDS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


@pytest.fixture(scope="module")
def gsm8k() -> Path:
    if not DATA.is_dir():
        message = (
            f"GSM8K data folder {DATA} is absent (expected at ../shared/data/gsm8k beside the repository)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return DATA


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_every_test_gold_checks_against_itself(gsm8k: Path) -> None:
    raw = _rows(gsm8k / "test.jsonl")
    records = load_records(gsm8k / "test.jsonl")
    assert len(records) == len(raw) == 1319
    failures = [
        (record.source, record.gold)
        for record, row in zip(records, raw)
        if not check_number(row["answer"], record.gold).correct
    ]
    assert not failures, f"{len(failures)} gold answers fail against themselves: {failures[:20]}"
    assert sum(record.gold.replace("-", "").isdigit() for record in records) == 1319  # integers, commas gone


def test_checker_agrees_with_sample_labels(gsm8k: Path) -> None:
    test = _rows(gsm8k / "test.jsonl")
    samples = _rows(gsm8k / "example_model_solutions.jsonl")
    assert [row["question"] for row in samples] == [row["question"] for row in test]
    total, disagreements = 0, []
    for number, (row, reference) in enumerate(zip(samples, test), start=1):
        gold = format_number(gsm8k_reference(reference["answer"]))
        assert format_number(gsm8k_reference(row["ground_truth"])) == gold, f"line {number}: ground_truth"
        for field in SAMPLE_FIELDS:
            sample = row[field]
            verdict = check_number(sample["solution"], gold)
            total += 1
            if verdict.correct != sample["is_correct"]:
                disagreements.append(
                    f"line {number} {field}: label {sample['is_correct']}, checker {verdict.correct} "
                    f"(extracted {verdict.extracted!r}, gold {gold!r}, ends {sample['solution'][-60:]!r})"
                )
    assert total == 5276
    agreement = 1 - len(disagreements) / total
    assert agreement >= 0.999, f"agreement {agreement:.4%}; disagreements:\n" + "\n".join(disagreements)


def test_pairs_converter_counts_and_split(gsm8k: Path, tmp_path: Path, capsys) -> None:
    from miopt.commands import data as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(
        [
            "gsm8k-pairs",
            "--input",
            str(gsm8k / "example_model_solutions.jsonl"),
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert command.run(args) == 0
    printed = capsys.readouterr().out
    counts = json.loads((tmp_path / MANIFEST_FILE).read_text())["counts"]
    train, heldout = _rows(tmp_path / TRAIN_FILE), _rows(tmp_path / HELDOUT_FILE)
    evaluation = _rows(tmp_path / EVAL_FILE)

    # the files hold the counts it reports (printed and in the manifest)
    assert f"wrote {len(train)} pairs to" in printed and f"wrote {len(heldout)} pairs to" in printed
    assert f"wrote {len(evaluation)} GSM8K-format records" in printed
    assert (counts["train_pairs"], counts["heldout_pairs"], counts["heldout_eval_records"]) == (
        len(train),
        len(heldout),
        len(evaluation),
    )
    assert counts["questions"] == 1319 == counts["train_questions"] + counts["heldout_questions"]
    assert counts["heldout_questions"] == round(0.2 * 1319) == len(evaluation)
    assert counts["correct_samples"] + counts["incorrect_samples"] == 5276
    assert counts["correct_samples"] == 2001

    # the preference format, negatives as a list when there are several
    for row in train + heldout:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert isinstance(row["chosen"], str) and row["chosen"]
        rejected = row["rejected"]
        assert isinstance(rejected, str) or (isinstance(rejected, list) and len(rejected) >= 2)
    assert any(isinstance(row["rejected"], list) for row in train)

    # no question in both splits; the eval file holds exactly the held-out questions
    train_prompts = {row["prompt"] for row in train}
    heldout_prompts = {row["prompt"] for row in heldout}
    eval_prompts = {gsm8k_prompt(row["question"]) for row in evaluation}
    assert not train_prompts & heldout_prompts and not train_prompts & eval_prompts
    assert heldout_prompts <= eval_prompts
    assert len(train_prompts) + counts["questions_without_negatives"] >= counts["train_questions"]

    # the eval file is GSM8K format with the same gold answers as test.jsonl
    gold_by_question = {
        row["question"]: gsm8k_reference(row["answer"]) for row in _rows(gsm8k / "test.jsonl")
    }
    records = load_records(tmp_path / EVAL_FILE)
    assert all(row["answer"].rstrip().splitlines()[-1].startswith("#### ") for row in evaluation)
    for row, record in zip(evaluation, records):
        assert record.gold == format_number(gold_by_question[row["question"]])

    # deterministic for a seed
    again = convert_gsm8k_pairs(gsm8k / "example_model_solutions.jsonl", tmp_path / "again")
    assert again == counts
    assert (tmp_path / "again" / TRAIN_FILE).read_text() == (tmp_path / TRAIN_FILE).read_text()


def test_pairs_converter_small_file_and_errors(tmp_path: Path) -> None:
    sample = {"is_correct": False, "solution": "2+2=5\nA: 5"}
    rows = [
        {
            "question": "What is 2+2?",
            "ground_truth": "2+2=<<2+2=4>>4\nA: 4",
            "m1": {"is_correct": True, "solution": "2+2=4\nA: 4"},
            "m2": sample,
            "m3": {"is_correct": False, "solution": "A: 3"},
        },
        {"question": "What is 1+1?", "ground_truth": "A: 2", "m1": {"is_correct": True, "solution": "A: 2"}},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    counts = convert_gsm8k_pairs(source, tmp_path / "out", heldout_fraction=0.0)
    assert (
        counts["train_pairs"] == 2
        and counts["heldout_pairs"] == 0
        and counts["questions_without_negatives"] == 1
    )
    pairs = _rows(tmp_path / "out" / TRAIN_FILE)
    assert [pair["chosen"] for pair in pairs] == ["2+2=<<2+2=4>>4\nA: 4", "2+2=4\nA: 4"]
    assert pairs[0]["rejected"] == ["2+2=5\nA: 5", "A: 3"]
    assert pairs[0]["prompt"] == "Question: What is 2+2?\nAnswer:\n"

    source.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "x", "m1": sample}) + "\n")
    with pytest.raises(DataError, match=r"in\.jsonl:2: field 'ground_truth': missing"):
        convert_gsm8k_pairs(source, tmp_path / "bad")
    source.write_text(
        json.dumps({"question": "x", "ground_truth": "A: 1", "m1": {"solution": "A: 1"}}) + "\n"
    )
    with pytest.raises(DataError, match=r"in\.jsonl:1: field 'm1'"):
        convert_gsm8k_pairs(source, tmp_path / "bad")

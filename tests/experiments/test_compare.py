"""``miopt compare`` on a tiny budget: table columns with finite numbers, the plots, the SFT control."""

from __future__ import annotations

import json
import math

import pytest

from miopt.errors import OptionError
from miopt.experiments.compare import (
    COLUMNS,
    PLOTS,
    TABLE_JSON,
    TABLE_MD,
    ArithPreset,
    CompareOptions,
    run_compare,
)
from miopt.tasks.default import DefaultTask

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_preset() -> ArithPreset:
    """The shipped start, a few dozen problems and 3 preference steps."""
    task = DefaultTask(pool_problems=120, validation_problems=0, preference_prompts=64, heldout_problems=48)
    return ArithPreset(task=task, seeds=1, logging_steps=1, overrides=(("max_steps", 3), ("batch_size", 8)))


def test_compare_writes_table_with_documented_columns_and_plots(tmp_path):
    output = tmp_path / "compare"
    # One thread: on a loaded 2-core machine two torch threads are often much slower.
    options = CompareOptions(
        output_dir=str(output), objectives=["dpo", "mio", "sft"], seeds=1, threads=1, progress=False
    )
    table = run_compare(options, preset=tiny_preset())

    rows = json.loads((output / TABLE_JSON).read_text())["rows"]
    assert [row["objective"] for row in rows] == ["dpo", "mio", "sft"]
    for row in rows:
        assert row["seeds"] == [0]
        for key, *_ in COLUMNS:
            assert math.isfinite(row[key]["mean"]) and math.isfinite(row[key]["std"]), (row["objective"], key)
    assert table["rows"][0]["final_accuracy"]["mean"] >= 0.0
    markdown = (output / TABLE_MD).read_text()
    for _, header, *_ in COLUMNS:
        assert header in markdown
    assert "| dpo |" in markdown and "| mio |" in markdown and "| sft |" in markdown
    for name in PLOTS.values():
        assert (output / name).read_bytes()[:8] == PNG
    for objective in ("dpo", "mio", "sft"):
        run = output / "runs" / f"{objective}-seed0"
        assert (run / "metrics.jsonl").is_file() and (run / "config.json").is_file()
    summary = json.loads((output / "runs" / "mio-seed0" / "summary.json").read_text())
    assert summary["objective"] == "mio" and summary["steps"] == 3
    control = json.loads((output / "runs" / "sft-seed0" / "summary.json").read_text())
    assert control["objective"] == "sft" and control["steps"] == 3

    # A second call reuses the finished runs (same key) instead of training again.
    before = (output / "runs" / "dpo-seed0" / "metrics.jsonl").stat().st_mtime_ns
    run_compare(options, preset=tiny_preset())
    assert (output / "runs" / "dpo-seed0" / "metrics.jsonl").stat().st_mtime_ns == before


def test_compare_rejects_unknown_objectives_before_any_work(tmp_path):
    options = CompareOptions(output_dir=str(tmp_path / "x"), objectives=["dpo", "nope"])
    with pytest.raises(OptionError, match="nope"):
        run_compare(options, preset=tiny_preset())
    assert not (tmp_path / "x").exists()


def test_gsm8k_sft_text_matches_the_pairs_format_and_the_local_bpe_round_trips(tmp_path):
    from transformers import AutoTokenizer

    from miopt.evaluation.answers import check_number
    from miopt.experiments.gsm8k_model import read_train, solution_text, train_tokenizer
    from miopt.tasks.gsm8k import gsm8k_prompt

    answer = "She sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72.\n#### 72"
    text = solution_text(answer)
    assert text == "She sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72.\nA: 72"
    assert check_number(text, "72").correct
    tokenizer = train_tokenizer([text, "Question: How many clips?\nAnswer:\n" + text] * 20, vocab_size=300)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("4872")["input_ids"]) == ["4", "8", "7", "2"]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids and reloaded.pad_token == "<pad>"

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": " How many clips? ", "answer": answer}) + "\n")
    assert read_train(train) == [(gsm8k_prompt("How many clips?"), text)]


def test_cli_compare_reports_a_bad_objective_and_exits_2(tmp_path, capsys):
    from miopt.cli import main

    assert main(["compare", "--output-dir", str(tmp_path / "c"), "--objectives", "dpo", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()

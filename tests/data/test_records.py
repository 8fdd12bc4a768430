"""Record loading and validation (miopt.data.records / sources): formats, sources, and bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from miopt.data import (
    PreferenceRecord,
    SFTRecord,
    load_preference_records,
    load_sft_records,
)
from miopt.errors import DataError
from miopt.model.builtin import build_tokenizer

GOOD = {"prompt": "Q: 2+2?\n", "chosen": "A: 4", "rejected": "A: 5"}
USER = {"role": "user", "content": "Capital of France?"}
PARIS = {"role": "assistant", "content": "Paris."}
LYON = {"role": "assistant", "content": "Lyon."}
NICE = {"role": "assistant", "content": "Nice."}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def bad_line_3(tmp_path: Path, row: Any) -> Path:
    """A JSONL file whose third line is ``row`` (the first two are valid)."""
    return write_jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, row])


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------- sources


def test_jsonl_standard(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "Hi", "chosen": " there", "rejected": " you"}])
    records, report = load_preference_records(path)
    assert records == [
        PreferenceRecord("Q: 2+2?\n", "A: 4", ("A: 5",), f"{path}:1"),
        PreferenceRecord("Hi", " there", (" you",), f"{path}:2"),
    ]
    assert (report.path, report.total, report.kept, report.skipped) == (str(path), 2, 2, 0)


def test_jsonl_blank_lines_and_bom_are_ignored(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\n  \n" + json.dumps(GOOD).encode())
    records, _ = load_preference_records(path)
    assert [record.source for record in records] == [f"{path}:1", f"{path}:4"]


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_and_data_object(tmp_path, wrap):
    rows = [GOOD, {"prompt": "P", "chosen": "c", "rejected": ["r1", "r2"]}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"data": rows} if wrap else rows), encoding="utf-8")
    records, _ = load_preference_records(path)
    assert records == [
        PreferenceRecord("Q: 2+2?\n", "A: 4", ("A: 5",), f"{path}:record 0"),
        PreferenceRecord("P", "c", ("r1", "r2"), f"{path}:record 1"),
    ]


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.json", [GOOD, GOOD])  # what Dataset.to_json writes
    records, _ = load_preference_records(path)
    assert [record.source for record in records] == [f"{path}:1", f"{path}:2"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "P", "chosen": "c", "rejected": "r"}]), path)
    records, _ = load_preference_records(path)
    assert records == [
        PreferenceRecord("Q: 2+2?\n", "A: 4", ("A: 5",), f"{path}:record 0"),
        PreferenceRecord("P", "c", ("r",), f"{path}:record 1"),
    ]


def test_csv_with_json_list_rejected(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(["Q: 2+2?\n", "A: 4", "A: 5"])
        writer.writerow(["P", "[not json", json.dumps(["r1", "r2"])])
    records, _ = load_preference_records(path)
    assert records == [
        PreferenceRecord("Q: 2+2?\n", "A: 4", ("A: 5",), f"{path}:record 0"),
        PreferenceRecord("P", "[not json", ("r1", "r2"), f"{path}:record 1"),
    ]


def test_csv_conversational_cells(tmp_path, tokenizer):
    path = tmp_path / "c.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow([json.dumps([USER]), json.dumps([PARIS]), json.dumps([[LYON], [NICE]])])
    (record,), _ = load_preference_records(path, tokenizer)
    assert record == PreferenceRecord(
        "user: Capital of France?\nassistant: ", "Paris.\n", ("Lyon.\n", "Nice.\n"), f"{path}:record 0"
    )


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "single"))
    records, _ = load_preference_records(tmp_path / "single")
    assert records == [PreferenceRecord("Q: 2+2?\n", "A: 4", ("A: 5",), f"{tmp_path / 'single'}:record 0")]

    other = {"prompt": "P", "chosen": "c", "rejected": "r"}
    DatasetDict({"train": Dataset.from_list([GOOD]), "test": Dataset.from_list([other])}).save_to_disk(
        str(tmp_path / "dict")
    )
    records, _ = load_preference_records(tmp_path / "dict", split="test")
    assert records == [PreferenceRecord("P", "c", ("r",), f"{tmp_path / 'dict'}:record 0")]
    message = error_of(load_preference_records, tmp_path / "dict", split="validation")
    assert "dict" in message and "'validation'" in message and "train" in message


def test_missing_local_file(tmp_path):
    message = error_of(load_preference_records, tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and "no such file" in message


def test_hub_id_unreachable(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = error_of(load_preference_records, "someone/no-such-dataset-here")
    assert "someone/no-such-dataset-here" in message
    assert "no such file or folder here" in message and "Hub could not be reached" in message


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello", encoding="utf-8")
    assert "unsupported file type '.txt'" in error_of(load_preference_records, path)


# ------------------------------------------------------------------------------------------- formats


def test_conversational_rendering(tmp_path, tokenizer):
    row = {"prompt": [USER], "chosen": [PARIS], "rejected": [LYON]}
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    (record,), _ = load_preference_records(path, tokenizer)
    prompt = tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    full_chosen = tokenizer.apply_chat_template([USER, PARIS], tokenize=False)
    full_rejected = tokenizer.apply_chat_template([USER, LYON], tokenize=False)
    assert record.prompt == prompt == "user: Capital of France?\nassistant: "
    assert record.prompt + record.chosen == full_chosen
    assert record.prompt + record.rejected[0] == full_rejected
    assert (record.chosen, record.rejected) == ("Paris.\n", ("Lyon.\n",))


def test_implicit_conversational_prompt(tmp_path, tokenizer):
    rows = [
        {"chosen": [USER, PARIS], "rejected": [USER, LYON]},
        # TRL: a string prompt beside whole conversations is ignored and the prompt extracted.
        {"prompt": "Capital of France?", "chosen": [USER, PARIS], "rejected": [USER, LYON]},
    ]
    records, _ = load_preference_records(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer)
    for record in records:
        assert (record.prompt, record.chosen, record.rejected) == (
            "user: Capital of France?\nassistant: ",
            "Paris.\n",
            ("Lyon.\n",),
        )


def test_implicit_string_prompt_cut_at_last_whitespace(tmp_path):
    rows = [
        {"chosen": "Q: 2+2?\nA: 4", "rejected": "Q: 2+2?\nA: 5"},
        {"chosen": "Say hi: hello", "rejected": "Say hi: help"},
    ]
    records, _ = load_preference_records(write_jsonl(tmp_path / "i.jsonl", rows))
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
        ("Q: 2+2?\nA:", " 4", (" 5",)),
        ("Say hi:", " hello", (" help",)),
    ]


def test_multiple_rejected_standard_and_conversational(tmp_path, tokenizer):
    rows = [
        {"prompt": "P", "chosen": "c", "rejected": ["r1", "r2", "r3"]},
        {"prompt": [USER], "chosen": [PARIS], "rejected": [[LYON], [NICE]]},
        {"chosen": [USER, PARIS], "rejected": [[USER, LYON], [USER, NICE]]},
    ]
    records, _ = load_preference_records(write_jsonl(tmp_path / "m.jsonl", rows), tokenizer)
    assert records[0].rejected == ("r1", "r2", "r3")
    for record in records[1:]:
        assert record.prompt == "user: Capital of France?\nassistant: "
        assert (record.chosen, record.rejected) == ("Paris.\n", ("Lyon.\n", "Nice.\n"))


def test_sft_formats(tmp_path, tokenizer):
    rows = [
        {"prompt": "Q: 1+1=?\n", "completion": "A: 2"},
        {"messages": [{"role": "system", "content": "Be brief."}, USER, PARIS]},
        {"prompt": [USER], "completion": [PARIS]},
        {"question": " How many? ", "answer": "2+2=4\n#### 4 "},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    records, report = load_sft_records(path, tokenizer)
    assert records == [
        SFTRecord("Q: 1+1=?\n", "A: 2", f"{path}:1"),
        SFTRecord("system: Be brief.\nuser: Capital of France?\nassistant: ", "Paris.\n", f"{path}:2"),
        SFTRecord("user: Capital of France?\nassistant: ", "Paris.\n", f"{path}:3"),
        SFTRecord("Question: How many?\nAnswer:\n", "2+2=4\n#### 4", f"{path}:4"),
    ]
    assert report.kept == 4


def test_sft_messages_must_end_with_assistant(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [USER, PARIS, USER]}])
    message = error_of(load_sft_records, path, tokenizer)
    assert f"{path}:1" in message and "field 'messages[2].role'" in message and "'user'" in message


def test_sft_missing_completion(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "P", "completion": "c"}, {"prompt": "P"}])
    message = error_of(load_sft_records, path)
    assert f"{path}:2" in message and "field 'completion'" in message and "missing" in message


# ------------------------------------------------------------------------------------------ bad input


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    for skip in (False, True):
        message = error_of(load_preference_records, path, skip_invalid=skip)
        assert str(path) in message and "empty" in message


def test_empty_json_list_and_header_only_csv(tmp_path):
    (tmp_path / "e.json").write_text("[]", encoding="utf-8")
    (tmp_path / "e.csv").write_text("prompt,chosen,rejected\n", encoding="utf-8")
    for name in ("e.json", "e.csv"):
        message = error_of(load_preference_records, tmp_path / name)
        assert name in message and "empty" in message


def test_malformed_json_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        json.dumps(GOOD) + "\n" + json.dumps(GOOD) + '\n{"prompt": "x", "chosen": \n', encoding="utf-8"
    )
    message = error_of(load_preference_records, path)
    assert f"{path}:3:" in message and "malformed JSON" in message


def test_malformed_json_file(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('[\n{"prompt": "a",\n "chosen": }\n]', encoding="utf-8")
    message = error_of(load_preference_records, path, skip_invalid=True)
    assert f"{path}:3:" in message and "malformed JSON" in message


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(
        (json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n").encode()
        + b'{"prompt": "caf\xe9", "chosen": "a"}\n'
    )
    for skip in (False, True):
        message = error_of(load_preference_records, path, skip_invalid=skip)
        assert f"{path}:3:" in message and "UTF-8" in message and "0xe9" in message


def test_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_bytes(b"prompt,chosen,rejected\nP,c,r\nP,caf\xe9,r\n")
    assert f"{path}:3:" in error_of(load_preference_records, path)


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_missing_field(tmp_path, missing):
    row = {key: value for key, value in GOOD.items() if key != missing}
    path = bad_line_3(tmp_path, row)
    message = error_of(load_preference_records, path)
    assert f"{path}:3:" in message and f"field {missing!r}" in message and "missing" in message


def test_chosen_is_a_number(tmp_path):
    path = bad_line_3(tmp_path, {"prompt": "P", "chosen": 7, "rejected": "r"})
    message = error_of(load_preference_records, path)
    assert f"{path}:3:" in message and "field 'chosen'" in message and "number" in message


def test_rejected_list_with_a_non_string(tmp_path):
    path = bad_line_3(tmp_path, {"prompt": "P", "chosen": "c", "rejected": ["r", 3]})
    message = error_of(load_preference_records, path)
    assert f"{path}:3:" in message and "field 'rejected[1]'" in message and "must be a string" in message


def test_null_field_in_parquet_names_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "P", "chosen": None, "rejected": "r"}]), path)
    message = error_of(load_preference_records, path)
    assert f"{path}:record 1:" in message and "field 'chosen'" in message and "null" in message


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "P", "chosen": "  \n", "rejected": "r"}, "chosen"),
        ({"prompt": "P", "chosen": "c", "rejected": ""}, "rejected"),
        ({"prompt": "P", "chosen": "c", "rejected": ["r", " "]}, "rejected[1]"),
    ],
)
def test_empty_response(tmp_path, row, field):
    path = bad_line_3(tmp_path, row)
    message = error_of(load_preference_records, path)
    assert f"{path}:3:" in message and f"field {field!r}" in message and "is empty" in message


def test_empty_conversational_response(tmp_path, tokenizer):
    path = bad_line_3(
        tmp_path, {"prompt": [USER], "chosen": [{"role": "assistant", "content": " "}], "rejected": [LYON]}
    )
    message = error_of(load_preference_records, path, tokenizer)
    assert f"{path}:3:" in message and "field 'chosen'" in message and "empty" in message


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "P", "chosen": "same", "rejected": "same "}, "rejected"),
        ({"prompt": "P", "chosen": "same", "rejected": ["other", "same"]}, "rejected[1]"),
        ({"prompt": [USER], "chosen": [PARIS], "rejected": [PARIS]}, "rejected"),
    ],
)
def test_chosen_identical_to_rejected(tmp_path, tokenizer, row, field):
    path = bad_line_3(tmp_path, row)
    message = error_of(load_preference_records, path, tokenizer)
    assert f"{path}:3:" in message and f"field {field!r}" in message and "identical" in message


def test_conversational_without_tokenizer_is_not_skippable(tmp_path):
    path = bad_line_3(tmp_path, {"prompt": [USER], "chosen": [PARIS], "rejected": [LYON]})
    message = error_of(load_preference_records, path, None, skip_invalid=True)
    assert f"{path}:3:" in message and "field 'chosen'" in message and "needs a tokenizer" in message


def test_tokenizer_without_chat_template(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    path = bad_line_3(tmp_path, {"prompt": [USER], "chosen": [PARIS], "rejected": [LYON]})
    message = error_of(load_preference_records, path, tokenizer, skip_invalid=True)
    assert f"{path}:3:" in message and "field 'chosen'" in message and "no chat template" in message


@pytest.mark.parametrize(
    ("message_dict", "field"),
    [
        ({"content": "Capital?"}, "prompt[0].role"),
        ({"role": "user"}, "prompt[0].content"),
        ({"role": "user", "content": 5}, "prompt[0].content"),
    ],
)
def test_message_without_role_or_content(tmp_path, tokenizer, message_dict, field):
    path = bad_line_3(tmp_path, {"prompt": [message_dict], "chosen": [PARIS], "rejected": [LYON]})
    message = error_of(load_preference_records, path, tokenizer)
    assert f"{path}:3:" in message and f"field {field!r}" in message


def test_template_not_prefix_consistent(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = bad_line_3(tmp_path, {"prompt": [USER], "chosen": [PARIS], "rejected": [LYON]})
    message = error_of(load_preference_records, path, tokenizer)
    assert f"{path}:3:" in message and "field 'chosen'" in message and "prefix-consistent" in message


def test_mixed_formats_rejected(tmp_path, tokenizer):
    path = bad_line_3(tmp_path, {"prompt": [USER], "chosen": [PARIS], "rejected": "Lyon."})
    message = error_of(load_preference_records, path, tokenizer)
    assert f"{path}:3:" in message and "field 'rejected'" in message and "same format" in message


def test_implicit_prompt_without_shared_prefix(tmp_path):
    path = bad_line_3(tmp_path, {"chosen": "yes", "rejected": "no"})
    message = error_of(load_preference_records, path)
    assert f"{path}:3:" in message and "field 'prompt'" in message


# ----------------------------------------------------------------------------------------- skipping


def test_skip_invalid_counts(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({"prompt": "P", "chosen": 1, "rejected": "r"}),
        json.dumps(GOOD),
        json.dumps({"prompt": "P", "chosen": "c", "rejected": "c"}),
        "[1, 2]",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert f"{path}:2:" in error_of(load_preference_records, path)
    records, report = load_preference_records(path, skip_invalid=True)
    assert [record.source for record in records] == [f"{path}:1", f"{path}:4"]
    assert (report.total, report.kept, report.skipped) == (6, 2, 4)
    assert len(report.skipped_reasons) == 4
    assert (
        report.skipped_reasons[0].startswith(f"{path}:2:") and "malformed JSON" in report.skipped_reasons[0]
    )
    assert "field 'chosen'" in report.skipped_reasons[1] and "identical" in report.skipped_reasons[2]
    assert "expected a JSON object" in report.skipped_reasons[3]
    assert report.summary().startswith(f"kept 2 of 6 records from {path} (skipped 4; first: {path}:2:")


def test_skip_invalid_with_nothing_left_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "P", "chosen": "", "rejected": "r"}] * 2)
    message = error_of(load_preference_records, path, skip_invalid=True)
    assert str(path) in message and "no valid records" in message and "field 'chosen'" in message

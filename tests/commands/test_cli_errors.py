"""The bad-input catalogue: one clear message naming file, line or record, and field; a non-zero
exit; and no output folder, for each kind of bad input."""

from __future__ import annotations

import json

import pytest

from miopt.cli import main

GOOD = {"prompt": "Q: 1+2=?\n", "chosen": "1+2=3. A: 3", "rejected": "1+2=4. A: 4"}


def _run(data, tmp_path, capsys, *extra):
    out = tmp_path / "out"
    code = main(["train", "--model", "builtin", "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--progress", "false", *extra])  # fmt: skip
    return code, capsys.readouterr().err, out


def _jsonl(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _row(**changes):
    row = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            row.pop(key)
        else:
            row[key] = value
    return json.dumps(row)


CASES = {
    "malformed JSON line": ([json.dumps(GOOD), '{"prompt": "x", "chosen": '], "data.jsonl:2", None),
    "missing field": ([json.dumps(GOOD), _row(rejected=...)], "data.jsonl:2", "rejected"),
    "wrong type": ([_row(chosen=5)], "data.jsonl:1", "chosen"),
    "empty chosen": ([_row(chosen="  ")], "data.jsonl:1", "chosen"),
    "empty rejected": ([json.dumps(GOOD), _row(rejected="")], "data.jsonl:2", "rejected"),
    "chosen identical to rejected": ([_row(rejected=GOOD["chosen"])], "data.jsonl:1", "rejected"),
    "prompt longer than max_length": ([json.dumps(GOOD), _row(prompt="Q" * 300)], "data.jsonl:2", "prompt"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_names_file_line_and_field(case, tmp_path, capsys):
    lines, where, field = CASES[case]
    code, err, out = _run(_jsonl(tmp_path, lines), tmp_path, capsys, "--max-length", "64")
    assert code != 0
    assert where in err, err
    if field:
        assert f"'{field}'" in err, err
    assert err.count("error:") == 1
    assert not out.exists(), "an output folder was created for bad input"


def test_empty_file(tmp_path, capsys):
    code, err, out = _run(_jsonl(tmp_path, []), tmp_path, capsys)
    assert code != 0 and "data.jsonl" in err and "empty" in err.lower()
    assert not out.exists()


def test_non_utf8_bytes_name_the_line(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    code, err, out = _run(path, tmp_path, capsys)
    assert code != 0 and "data.jsonl:2" in err and "UTF-8" in err
    assert not out.exists()


def test_unknown_objective_lists_valid_ones(tmp_path, capsys):
    code, err, out = _run(_jsonl(tmp_path, [json.dumps(GOOD)]), tmp_path, capsys, "--objective", "nope")
    assert code != 0 and "'nope'" in err and "mio" in err and "dpo" in err
    assert not out.exists()


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(_jsonl(tmp_path, [json.dumps(GOOD)])),
                 "--output-dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "no-such-model" in err and "does not exist" in err
    assert not out.exists()


def test_missing_data_file(tmp_path, capsys):
    code, err, out = _run(tmp_path / "nope.jsonl", tmp_path, capsys)
    assert code != 0 and "nope.jsonl" in err
    assert not out.exists()


def test_skip_invalid_skips_and_counts(tmp_path, capsys):
    lines = [json.dumps(GOOD)] * 4 + [_row(chosen=5), "{broken", _row(rejected=GOOD["chosen"])]
    code, err, out = _run(_jsonl(tmp_path, lines), tmp_path, capsys, "--skip-invalid", "--batch-size", "2")
    assert code == 0, err
    assert "3 skipped" in err
    assert json.loads((out / "summary.json").read_text())["skipped_records"] == 3


def test_failed_run_does_not_touch_an_existing_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"keep": true}')
    code, _, _ = _run(_jsonl(tmp_path, [_row(chosen=5)]), tmp_path, capsys)
    assert code != 0
    assert json.loads((out / "summary.json").read_text()) == {"keep": True}

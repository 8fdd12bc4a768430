"""``--report-to``: tracker names, the missing-package error, and each tracker's local files holding
the metrics of ``metrics.jsonl`` under the same names (runs where the package is installed)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys

import pytest

from miopt.cli import main
from miopt.errors import OptionError
from miopt.run.trackers import tracker_names

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
CHECKED = ("loss", "rewards/accuracies", "logps/chosen", "lr", "grad_norm")


def test_tracker_names_accept_lists_commas_and_none():
    assert tracker_names(["none"]) == []
    assert tracker_names(["wandb", "trackio,tensorboard", "wandb"]) == ["wandb", "trackio", "tensorboard"]
    assert tracker_names("TensorBoard") == ["tensorboard"]
    with pytest.raises(OptionError, match="unknown tracker 'mlflow'"):
        tracker_names(["mlflow"])


def test_a_missing_tracker_package_names_the_install_before_anything_is_loaded(
    small_model_dir, pairs_file, tmp_path, capsys, monkeypatch
):
    import miopt.run.trackers as trackers

    # tensorboard present (whether installed here or not), wandb missing
    real = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util,
        "find_spec",
        lambda name: None if name == "wandb" else (object() if name == "tensorboard" else real(name)),
    )
    out = tmp_path / "run"
    args = ["train", "--model", str(small_model_dir), "--data", str(pairs_file), "--output-dir", str(out)]
    assert main([*args, "--report-to", "tensorboard", "wandb", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb needs the wandb package: pip install 'miopt[wandb]'" in err
    assert not out.exists()


def _train(small_model_dir, pairs_file, out, tracker, env_extra):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **env_extra}
    command = [
        sys.executable, "-m", "miopt", "train", "--model", str(small_model_dir), "--data", str(pairs_file),
        "--output-dir", str(out), "--max-steps", "3", "--logging-steps", "1", "--batch-size", "4",
        "--learning-rate", "1e-3", "--progress", "false", "--report-to", tracker,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same(expected_rows, logged: dict[int, dict]):
    assert sorted(logged) == [row["step"] for row in expected_rows]
    for row in expected_rows:
        for key in CHECKED:
            assert logged[row["step"]][key] == pytest.approx(row[key], rel=1e-5, abs=1e-7), (row["step"], key)


def test_tensorboard_receives_the_metrics(small_model_dir, pairs_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rows = _train(small_model_dir, pairs_file, out, "tensorboard", {})
    events = EventAccumulator(str(out / "tensorboard" / "miopt"))
    events.Reload()
    logged: dict[int, dict] = {}
    for key in CHECKED:
        for event in events.Scalars(key):
            logged.setdefault(event.step, {})[key] = event.value
    _assert_same(rows, logged)


def _wandb_records(path: str) -> tuple[list[dict], dict]:
    """(history rows, config) of an offline ``.wandb`` file: a 7-byte header, then LevelDB-log records
    (32 KiB blocks; each chunk has a 7-byte header: crc32, length, type) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    position, block, rows, config, pending = 7, 32768, [], {}, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            kind_name = record.WhichOneof("record_type")
            if kind_name == "history":
                items = record.history.item
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                )
            elif kind_name == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return rows, config


def test_wandb_offline_receives_the_metrics_and_the_options(small_model_dir, pairs_file, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    rows = _train(
        small_model_dir, pairs_file, out, "wandb", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    )
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = _wandb_records(path)
    _assert_same(rows, {int(row["_step"]): row for row in history})
    assert config["max_steps"] == 3 and config["objective"] == "mio"


def test_trackio_local_receives_the_metrics_and_the_options(small_model_dir, pairs_file, tmp_path):
    pytest.importorskip("trackio")
    out, store = tmp_path / "run", tmp_path / "trackio"
    rows = _train(small_model_dir, pairs_file, out, "trackio", {"TRACKIO_DIR": str(store)})
    with sqlite3.connect(store / "miopt.db") as db:
        logged = {
            step: json.loads(metrics) for step, metrics in db.execute("select step, metrics from metrics")
        }
        (config,) = [json.loads(text) for (text,) in db.execute("select config from configs")]
    _assert_same(rows, logged)
    assert config["max_steps"] == 3 and config["objective"] == "mio" and config["report_to"] == "['trackio']"

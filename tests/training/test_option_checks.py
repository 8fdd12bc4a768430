"""Every option checked before any work: one clean line naming the flag and what it accepts, before
the tokenizer or model is loaded and before the output folder is touched; non-UTF-8 input and an
``--output-dir`` that is a file, for every command; the help texts."""

from __future__ import annotations

import json

import pytest

from miopt.cli import main

# (command, extra flags, text the error must contain); "{file}" stands for an existing file.
CATALOGUE = [
    ("train", ["--adam-beta1", "2"], "--adam-beta1 must be in [0, 1), got 2.0"),
    ("train", ["--adam-beta2", "-1"], "--adam-beta2 must be in [0, 1)"),
    ("train", ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    ("train", ["--lora-r", "-1"], "--lora-r must be >= 0"),
    ("train", ["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    ("train", ["--negatives", "foo"], "--negatives: negatives must be one of marginal, rejected, got 'foo'"),
    (
        "train",
        ["--objective", "robust", "--label-smoothing", "0.5"],
        "--label-smoothing: label_smoothing must be a number in [0, 0.5), got 0.5",
    ),
    ("train", ["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    ("train", ["--max-steps", "-1", "--epochs", "nan"], "--epochs: expected a finite number, got 'nan'"),
    ("train", ["--dtype", "foo"], "--dtype must be one of float32, bfloat16, float16"),
    ("train", ["--beta", "nan"], "--beta: expected a finite number"),
    ("train", ["--beta", "inf"], "--beta: expected a finite number"),
    ("train", ["--learning-rate", "inf"], "--learning-rate: expected a finite number"),
    ("train", ["--learning-rate", "0"], "--learning-rate must be > 0"),
    ("train", ["--warmup-ratio=-inf"], "--warmup-ratio: expected a finite number"),
    ("train", ["--max-prompt-length", "-3"], "--max-prompt-length must be in [1, --max-length - 1"),
    ("train", ["--max-prompt-length", "0"], "--max-prompt-length must be in [1,"),
    ("train", ["--save-steps", "-1"], "--save-steps must be >= 0"),
    ("train", ["--save-total-limit", "-1"], "--save-total-limit must be >= 0 (0 keeps all)"),
    ("train", ["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
    ("train", ["--max-steps", "-5"], "--max-steps must be -1 (use --epochs) or >= 1"),
    ("train", ["--logprob-chunk", "-1"], "--logprob-chunk must be >= 0"),
    ("train", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("train", ["--sft-weight", "-1"], "--sft-weight must be >= 0"),
    ("train", ["--chosen-decline-warning", "-1"], "--chosen-decline-warning must be >= 0"),
    ("train", ["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    ("train", ["--output-dir", "{file}"], "is a file, not a folder"),
    ("train", ["--output-dir", "{file}/run"], "which is a file"),
    ("train", ["--config", "{nan_yaml}"], "--beta must be a finite number, got nan"),
    ("sft", ["--seed", "-1"], "--seed must be in [0,"),
    ("sft", ["--max-prompt-length", "0"], "--max-prompt-length must be in [1,"),
    ("sft", ["--output-dir", "{file}"], "is a file, not a folder"),
]


def _code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own refusals (a non-number, NaN, a wrong choice)
        return int(stop.code)


@pytest.mark.parametrize(
    ("command", "flags", "message"), CATALOGUE, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_values_are_refused_before_the_model_is_loaded(
    command, flags, message, tmp_path, monkeypatch, capsys
):
    import miopt.model.loading as models

    def never(*args, **kwargs):
        raise AssertionError("a tokenizer or model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", never)
    monkeypatch.setattr(models, "load_tokenizer", never)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    nan_yaml = tmp_path / "nan.yaml"
    nan_yaml.write_text("beta: .nan\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Q:", "chosen": "a", "rejected": "b", "completion": "a"}) + "\n")
    out = tmp_path / "out"
    flags = [f.format(file=a_file, nan_yaml=nan_yaml) for f in flags]
    argv = [command, "--model", "builtin", "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
            "--progress", "false", *flags]  # fmt: skip
    assert _code(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not out.exists()


def test_non_utf8_input_and_an_output_file_are_clean_errors_for_every_command(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        json.dumps({"question": "1+1?", "ground_truth": "1+1=2. A: 2"}).encode()
        + b"\n"
        + b'{"question": "\xff"}\n'
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    runs = {
        "eval non-UTF-8": (
            ["eval", "--model", "builtin", "--data", str(bad), "--progress", "false"],
            "bad.jsonl:2",
        ),
        "eval output file": (
            ["eval", "--model", "builtin", "--data", "arithmetic", "--output-dir", str(a_file)],
            "is a file, not a folder",
        ),
        "pairs non-UTF-8": (
            ["data", "gsm8k-pairs", "--input", str(bad), "--output-dir", str(tmp_path / "pairs")],
            "bad.jsonl:2",
        ),
        "compare output file": (["compare", "--output-dir", str(a_file)], "is a file, not a folder"),
        "toy output file": (["toy", "--output-dir", str(a_file)], "is a file, not a folder"),
        "pairs output file": (
            ["data", "gsm8k-pairs", "--input", str(bad), "--output-dir", str(a_file)],
            "is a file, not a folder",
        ),
    }
    for name, (argv, message) in runs.items():
        assert _code(argv) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("error:") == 1, (name, err)
        if "non-UTF-8" in name:
            assert "UTF-8" in err, err
    assert not (tmp_path / "pairs").exists()


def test_a_truncated_weight_file_given_as_model_is_a_clean_error(small_model_dir, tmp_path, capsys):
    import shutil

    model = shutil.copytree(small_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1=?\n", "chosen": "2", "rejected": "3"}) + "\n")
    argv = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "out"),
            "--max-steps", "1", "--progress", "false"]  # fmt: skip
    assert _code(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot load model '{model}'" in err and "damaged" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "sft", "eval"])
def test_help_shows_plain_percent_signs_and_readable_group_titles(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "%%" not in text
    assert "Options(" not in text  # no raw dataclass signature as a section title
    if command == "eval":
        assert "95% CI" in text


@pytest.mark.parametrize(("objective", "suggests_mio"), [("mio", False), ("dpo", True)])
def test_the_decline_warning_suggests_mio_only_when_it_is_not_the_objective(objective, suggests_mio, capsys):
    from miopt.training.preference import ChosenDeclineMonitor

    ChosenDeclineMonitor(0.5, objective=objective)({"step": 3, "logps/chosen_change": -2.0})
    err = capsys.readouterr().err
    assert "WARNING: step 3" in err
    assert ("Consider --objective mio" in err) is suggests_mio

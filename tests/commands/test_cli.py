"""The ``miopt`` command line: every help screen renders and lists every option with its default."""

from __future__ import annotations

import dataclasses

import pytest

from miopt.cli import COMMANDS, main


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: miopt" in capsys.readouterr().out


def test_train_help_lists_every_option_with_its_default(capsys):
    from miopt.training.preference import TrainOptions

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainOptions):
        assert "--" + field.name.replace("_", "-") in text
    assert "Default: 'mio'" in text and "Default: 0.1" in text


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out

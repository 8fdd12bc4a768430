"""One option layering for every command: built-in defaults < preset < YAML file < flags."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from miopt.cli import main
from miopt.config import ConfigError, Preset, option, resolve


@dataclass
class _Options:
    a: int = option(1, "a")
    b: int = option(1, "b")
    c: int = option(1, "c")
    d: float = option(1.0, "d")


def test_defaults_then_preset_then_yaml_then_flags(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("c: 3\nb: 3\n")
    preset = Preset(_Options, b=2, c=2, d=2)
    options = resolve(_Options, {"config": str(config), "c": 4}, preset=preset)
    assert (options.a, options.b, options.c, options.d) == (1, 3, 4, 2.0)
    assert isinstance(options.d, float)  # the preset's int was read as the field's type


def test_preset_is_checked_against_its_schema():
    with pytest.raises(ConfigError, match="unknown option.*bogus"):
        Preset(_Options, bogus=1)
    with pytest.raises(ConfigError, match="option 'a'.*as int"):
        Preset(_Options, a="many")

    @dataclass
    class Other:
        a: int = option(1, "a")

    with pytest.raises(TypeError, match="cannot set"):
        resolve(Other, {}, preset=Preset(_Options, a=2))


class _Trained(Exception):
    """Raised where the default pipeline would start preference training."""


def test_train_yaml_survives_without_model_and_data(tmp_path, monkeypatch):
    """``miopt train --config x.yaml`` with neither --model nor --data runs the default pipeline with the
    YAML's values over the default run's preset (which only fills what the YAML leaves out). The options
    are caught where the pipeline hands them to training (its other stages stubbed out)."""
    import miopt.evaluation as evaluation
    import miopt.experiments.default_run as default_run
    import miopt.model.loading as models

    seen = []

    def train_on_examples(options, *args, **kwargs):
        seen.append(options)
        raise _Trained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: torch.nn.Module())  # a model stand-in
    monkeypatch.setattr(models, "load_tokenizer", lambda *args, **kwargs: None)
    monkeypatch.setattr(evaluation, "evaluate_arithmetic", lambda *args, **kwargs: 0.0)
    monkeypatch.setattr(default_run, "on_policy_pairs", lambda *args, **kwargs: ["a pair"])
    monkeypatch.setattr(default_run, "train_on_examples", train_on_examples)
    config = tmp_path / "run.yaml"
    config.write_text("beta: 0.3\nmax_steps: 7\noutput_dir: somewhere\n")
    for extra in ([], ["--beta", "0.2"]):
        with pytest.raises(_Trained):
            main(["train", "--config", str(config), *extra])
    yaml_only, with_flag = seen
    assert (yaml_only.beta, yaml_only.max_steps, yaml_only.output_dir) == (0.3, 7, "somewhere")
    preset = default_run.DEFAULT_PREFERENCE_OPTIONS
    assert yaml_only.learning_rate == preset["learning_rate"] and yaml_only.batch_size == preset["batch_size"]
    assert (with_flag.beta, with_flag.max_steps) == (0.2, 7)  # a flag wins over the YAML


def test_online_yaml_survives_on_the_builtin_task(tmp_path, monkeypatch):
    import miopt.online.rounds as online

    seen = []
    summary = {"heldout_before": None, "heldout_after": None, "final_model": "x"}
    monkeypatch.setattr(online, "run_online", lambda options: seen.append(options) or summary)
    config = tmp_path / "online.yaml"
    config.write_text("beta: 0.25\nbatch_size: 4\n")
    assert main(["online", "--config", str(config), "--learning-rate", "0.001"]) == 0
    (options,) = seen
    assert (options.beta, options.batch_size, options.learning_rate) == (0.25, 4, 0.001)
    assert options.logging_steps == online.BUILTIN_DEFAULTS["logging_steps"]  # the preset fills the rest

"""The optimisation loop's schedule and its option checks, on a one-parameter model."""

from __future__ import annotations

import math
import re

import pytest
import torch

from miopt.errors import OptionError
from miopt.run.loop import LoopOptions, check_loop_options, run_loop


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(1.0))


def _step(model, indices):
    loss = (model.weight - 3.0) ** 2 * len(indices)
    return loss, {}


def _lrs(tmp_path, **options) -> list[float]:
    settings = dict(output_dir=str(tmp_path), max_steps=20, batch_size=2, learning_rate=0.1, logging_steps=1,
                    progress=False, warmup_ratio=0.1)  # fmt: skip
    settings.update(options)
    result = run_loop(LoopOptions(**settings), model=_Scalar(), num_examples=8, step_fn=_step)
    return [row["lr"] for row in result.history]


def test_cosine_decays_to_the_min_lr_ratio_of_the_peak(tmp_path):
    floored = _lrs(tmp_path / "a", lr_scheduler="cosine", min_lr_ratio=0.1)
    plain = _lrs(tmp_path / "b", lr_scheduler="cosine")
    # warmup 2 steps, then half a cosine over 18 steps from 0.1 down to 0.01 (or 0)
    assert floored[1] == pytest.approx(0.1) == plain[1]
    for step in range(2, 20):
        progress = (step + 1 - 2) / 18
        shape = 0.5 * (1 + math.cos(math.pi * progress))
        assert plain[step] == pytest.approx(0.1 * shape, abs=1e-9)
        assert floored[step] == pytest.approx(0.01 + 0.09 * shape, abs=1e-9)
    assert floored[-1] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr_scheduler": "linear", "min_lr_ratio": 0.1}, "--min-lr-ratio applies to --lr-scheduler cosine"),
        ({"lr_scheduler": "cosine", "min_lr_ratio": 1.0}, "--min-lr-ratio must be in [0, 1)"),
    ],
)
def test_min_lr_ratio_is_checked_before_training(tmp_path, options, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        check_loop_options(LoopOptions(output_dir=str(tmp_path), **options))

"""The discrete toy's mechanism (docs/theory.md sections 2-3), pinned on CPU with a fixed seed and budget."""

from __future__ import annotations

import json
import math

import pytest
import torch

from miopt.experiments import toy

STEPS = toy.DEFAULT_STEPS
SEED = 0


@pytest.fixture(scope="module")
def offline() -> dict[str, toy.OfflineCurve]:
    return {name: toy.run_offline(name, steps=STEPS) for name in ("dpo", "mio")}


@pytest.fixture(scope="module")
def onpolicy() -> dict[tuple[str, bool], toy.OnPolicyCurve]:
    return {
        (name, inject): toy.run_onpolicy(name, inject=inject, steps=STEPS, seed=SEED)
        for name in ("dpo", "mio")
        for inject in (False, True)
    }


def test_offline_problem_couples_chosen_and_rejected() -> None:
    """The pair shares a feature on which the rejected loads more: the margin direction lowers the chosen."""
    problem = toy.offline_problem()
    phi = problem.features[0]
    chosen, rejected = phi[toy.OFFLINE_CHOSEN], phi[toy.OFFLINE_REJECTED]
    assert float(chosen @ rejected) > 0
    assert float(chosen @ (chosen - rejected)) < 0


def test_dpo_chosen_logp_ends_below_start_while_margin_grows(offline: dict[str, toy.OfflineCurve]) -> None:
    curve = offline["dpo"]
    assert curve.diverged_at is None
    assert len(curve.chosen_logps) == STEPS + 1
    assert curve.chosen_end < curve.chosen_start - 1.0
    assert curve.margins[-1] > curve.margins[0] + 1.0
    assert curve.rejected_end < curve.chosen_end


def test_mio_chosen_logp_does_not_end_below_start(offline: dict[str, toy.OfflineCurve]) -> None:
    curve = offline["mio"]
    assert curve.diverged_at is None
    assert curve.chosen_end >= curve.chosen_start
    assert curve.rejected_end < curve.rejected_start - 1.0
    assert curve.margins[-1] > 0


def test_onpolicy_hard_correct_starts_below_1e_minus_6() -> None:
    logps = toy.onpolicy_problem().log_probs(toy.onpolicy_problem().initial_theta())
    hard = toy.ONPOLICY_PROMPTS.index("hard")
    easy = toy.ONPOLICY_PROMPTS.index("easy")
    assert math.exp(float(logps[hard, toy.ONPOLICY_CORRECT])) < 1e-6
    assert math.exp(float(logps[easy, toy.ONPOLICY_CORRECT])) == pytest.approx(toy.EASY_START_PROB)


@pytest.mark.parametrize("name", ["dpo", "mio"])
def test_onpolicy_without_injection_never_samples_nor_learns_hard_correct(
    onpolicy: dict[tuple[str, bool], toy.OnPolicyCurve], name: str
) -> None:
    curve = onpolicy[(name, False)]
    hard = curve.correct_logps["hard"]
    assert curve.correct_sampled["hard"] == 0
    assert curve.first_sampled["hard"] is None
    assert curve.injections == 0
    assert max(hard) <= hard[0]
    # The same runs do learn what they sample: the easy prompt's correct response takes over.
    assert curve.correct_logps["easy"][-1] > math.log(0.9)


@pytest.mark.parametrize("name", ["dpo", "mio"])
def test_onpolicy_with_injection_learns_hard_correct(
    onpolicy: dict[tuple[str, bool], toy.OnPolicyCurve], name: str
) -> None:
    curve = onpolicy[(name, True)]
    hard = curve.correct_logps["hard"]
    assert curve.injections > 0
    assert hard[-1] > math.log(0.5) > hard[0]
    assert curve.correct_sampled["hard"] > 0


def test_onpolicy_is_reproducible() -> None:
    first = toy.run_onpolicy("dpo", inject=True, steps=40, seed=7)
    second = toy.run_onpolicy("dpo", inject=True, steps=40, seed=7)
    assert first.correct_logps == second.correct_logps
    assert first.correct_sampled == second.correct_sampled


def test_divergence_is_recorded_not_raised() -> None:
    curve = toy.run_offline("ipo", steps=STEPS, lr=50.0)
    assert curve.diverged_at is not None
    assert all(math.isfinite(v) for v in curve.chosen_logps)


def test_command_writes_plots_and_json(tmp_path, capsys) -> None:
    from miopt.cli import main

    out = tmp_path / "toy"
    threads = torch.get_num_threads()
    code = main(
        ["toy", "--output-dir", str(out), "--objectives", "dpo", "mio", "--steps", "60", "--seed", "1"]
    )
    assert code == 0
    assert torch.get_num_threads() == threads
    assert sorted(p.name for p in out.iterdir()) == ["toy.json", "toy_offline.png", "toy_onpolicy.png"]
    for png in ("toy_offline.png", "toy_onpolicy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "toy.json").read_text())
    assert data["settings"]["steps"] == 60 and data["settings"]["seed"] == 1
    assert set(data["offline"]) == {"dpo", "mio"}
    assert len(data["offline"]["dpo"]["curves"]["chosen_logps"]) == 61
    assert [(run["curves"]["objective"], run["curves"]["inject"]) for run in data["onpolicy"]] == [
        ("dpo", False),
        ("dpo", True),
        ("mio", False),
        ("mio", True),
    ]
    printed = capsys.readouterr().out
    assert "chosen start" in printed and "dpo" in printed and "mio" in printed


def test_command_rejects_unknown_objective(tmp_path, capsys) -> None:
    from miopt.cli import main

    assert main(["toy", "--output-dir", str(tmp_path), "--objectives", "nope"]) == 2
    assert "nope" in capsys.readouterr().err

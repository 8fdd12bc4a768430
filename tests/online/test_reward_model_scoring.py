"""``miopt online --reward-model``: pairs from scores (a stub scorer with known scores), the verifier
gate, the per-round score distribution, and a round end to end with a reward model."""

from __future__ import annotations

import json

import pytest

from miopt.cli import main
from miopt.evaluation.tasks import EvalRecord
from miopt.online.pairs import build_pairs_by_score, score_distribution
from miopt.online.scoring import RoundScorer, pair_round


class StubScorer:
    """Known scores: each sample's score is looked up by its text."""

    name = "stub"

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, records, samples):
        return [[self.table[text] for text in texts] for texts in samples]


def _record(index: int, solution: str | None = "reference") -> EvalRecord:
    return EvalRecord(f"Q{index}", "1", "exact", solution=solution, source=f"r{index}")


SCORES = {"a": 2.0, "b": 1.5, "c": 0.2, "d": -1.0, "e": 2.0, "f": 1.9, "x": 0.0, "y": 0.0}


def test_score_pairs_take_the_best_against_those_below_the_margin():
    records = [_record(0), _record(1), _record(2)]
    samples = [["c", "a", "b", "d"], ["e", "a", "f"], ["x", "y"]]
    scores = StubScorer(SCORES).score(records, samples)
    pairs, stats = build_pairs_by_score(records, samples, scores, margin=0.4)
    by_source = {pair.source: pair for pair in pairs}
    # r0: best a (2.0); b is 0.5 below (> 0.4: rejected), c and d far below
    assert by_source["r0"].chosen == "a" and by_source["r0"].rejected == ("c", "b", "d")
    # r1: e and a tie at 2.0: the first wins; a (tie) and f (0.1 below) are within the margin: no contrast
    # r2: x and y tie: no contrast
    assert set(by_source) == {"r0"} and stats.all_correct == 2 and stats.pairs == 1
    pairs, _ = build_pairs_by_score(records, samples, scores, margin=0.0)
    assert {pair.source: pair.rejected for pair in pairs} == {"r0": ("c", "b", "d"), "r1": ("f",)}
    assert pairs[1].chosen == "e"


def test_verifier_gate_limits_the_chosen_and_rejects_every_incorrect_sample():
    records = [_record(0), _record(1, solution=None), _record(2)]
    samples = [["a", "b", "c", "d"], ["a", "c"], ["e", "f"]]
    rewards = StubScorer({"a": 0.0, "b": 1.0, "c": 1.0, "d": 0.0, "e": 0.0, "f": 0.0})
    scorer = RoundScorer(rewards, StubScorer(SCORES))
    scored = scorer.score(records, samples)
    assert scored.rewards[0] == [0.0, 1.0, 1.0, 0.0] and scored.scores[0] == [2.0, 1.5, 0.2, -1.0]
    pairs, stats = pair_round(records, samples, scored, threshold=0.5, margin=1.0, inject_reference=True)
    by_source = {pair.source: pair for pair in pairs}
    # r0: a scores best but is incorrect: b (best correct) is chosen; c is correct and 1.3 below
    # b (> margin 1.0): rejected; a and d incorrect: rejected whatever their score
    assert by_source["r0"].chosen == "b" and set(by_source["r0"].rejected) == {"a", "c", "d"}
    # r1: c is the only correct sample: chosen against the incorrect a (a's higher score does not matter)
    assert by_source["r1"].chosen == "c" and by_source["r1"].rejected == ("a",)
    # r2: nothing correct: the reference solution is injected against both samples
    assert by_source["r2"].injected and by_source["r2"].chosen == "reference"
    assert by_source["r2"].rejected == ("e", "f")
    assert stats.no_correct == 1 and stats.injected == 1


def test_without_a_reward_model_pairing_is_by_verifier():
    records = [_record(0)]
    samples = [["a", "b", "c"]]
    scorer = RoundScorer(StubScorer({"a": 0.0, "b": 1.0, "c": 1.0}), None)
    pairs, _ = pair_round(
        records, samples, scorer.score(records, samples), threshold=0.5, margin=0.0, inject_reference=False
    )
    assert pairs[0].chosen == "b" and pairs[0].rejected == ("a",)


def test_score_distribution_has_quantiles_and_spread():
    values = score_distribution([[0.0, 1.0, 2.0], [3.0, 4.0]])
    assert values["rm_score/mean"] == pytest.approx(2.0)
    assert values["rm_score/min"] == 0.0 and values["rm_score/max"] == 4.0
    assert values["rm_score/median"] == pytest.approx(2.0)
    assert values["rm_score/p10"] == pytest.approx(0.4)
    assert values["rm_score/std"] == pytest.approx(2**0.5)
    assert values["rm_score/prompt_spread"] == pytest.approx(1.5)


@pytest.fixture
def prompts_file(tmp_path):
    from miopt.tasks import arithmetic

    problems, _ = arithmetic.generate_splits(4, 0, seed=3)
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as file:
        for problem in problems:
            row = {"prompt": problem.prompt, "answer": str(problem.answer), "answer_type": "arithmetic"}
            file.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def reward_model_dir(tmp_path_factory, tokenizer):
    from miopt.training.reward import load_reward_model

    folder = tmp_path_factory.mktemp("rm")
    load_reward_model("builtin", tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _online(model, data, output, *extra):
    return [
        "online", "--model", str(model), "--data", str(data), "--output-dir", str(output),
        "--samples", "4", "--prompts-per-round", "4", "--max-new-tokens", "8", "--batch-size", "4",
        "--learning-rate", "1e-3", "--eval-limit", "0", "--progress", "false", "--rounds", "1", *extra,
    ]  # fmt: skip


def test_online_round_with_a_reward_model_pairs_by_its_scores(
    small_model_dir, prompts_file, reward_model_dir, tmp_path
):
    from miopt.online.scoring import RewardModelScorer

    out = tmp_path / "run"
    args = _online(
        small_model_dir, prompts_file, out, "--reward-model", str(reward_model_dir), "--verifier", "none"
    )
    assert main(args) == 0
    (row,) = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()][1:]
    assert {"rm_score/mean", "rm_score/std", "rm_score/median", "rm_score/max"} <= set(row)
    assert "pass@1" not in row
    lines = [json.loads(line) for line in (out / "round-001" / "samples.jsonl").read_text().splitlines()]
    pairs = {
        json.loads(line)["source"]: json.loads(line) for line in (out / "round-001" / "pairs.jsonl").open()
    }
    flat = [score for line in lines for score in line["scores"]]
    assert row["rm_score/mean"] == pytest.approx(sum(flat) / len(flat))
    # the stored scores are the reward model's, and the chosen sample is the best-scored one
    records = [
        EvalRecord(line["prompt"], line["gold"], "arithmetic", source=line["source"]) for line in lines
    ]
    rescored = RewardModelScorer(str(reward_model_dir)).score(records, [line["samples"] for line in lines])
    for line, scores in zip(lines, rescored):
        assert scores == pytest.approx(line["scores"], abs=1e-4)
        if line["source"] in pairs:
            best = max(range(4), key=lambda k: (line["scores"][k], -k))
            assert pairs[line["source"]]["chosen"] == line["samples"][best]
    assert row["pairs"] == len(pairs) >= 1


def test_online_reward_model_options_fail_before_anything_is_written(
    small_model_dir, prompts_file, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(_online(small_model_dir, prompts_file, out, "--reward-model", str(tmp_path / "nope"))) == 2
    assert "--reward-model" in capsys.readouterr().err
    assert main(_online(small_model_dir, prompts_file, out, "--reward-model", str(small_model_dir))) == 2
    assert "not a one-score sequence classifier" in capsys.readouterr().err
    assert main(_online(small_model_dir, prompts_file, out, "--verifier", "none")) == 2
    assert "--verifier none needs --reward-model" in capsys.readouterr().err
    assert not out.exists()

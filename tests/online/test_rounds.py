"""``miopt online``: pairing and injection, pluggable verifiers and their errors, rounds and resume."""

from __future__ import annotations

import json
import textwrap

import pytest

from miopt.cli import main
from miopt.evaluation.tasks import EvalRecord
from miopt.online.rounds import build_pairs, round_prompts, sample_metrics
from miopt.online.verifiers import VerifierError, load_verifier

VERIFIER_MODULE = """
CALLS = []

def even(prompt, completion, answer):
    CALLS.append((prompt, completion, answer))
    return len(completion) % 2 == 0

def never(prompt, completion, answer):
    return False

def explode(prompt, completion, answer):
    raise ZeroDivisionError("boom")

def text(prompt, completion, answer):
    return "yes"

NOT_CALLABLE = 3
"""


@pytest.fixture
def verifier_module(tmp_path, monkeypatch):
    """A module ``online_verifiers`` importable by name (and as a file)."""
    folder = tmp_path / "verifiers"
    folder.mkdir()
    (folder / "online_verifiers.py").write_text(textwrap.dedent(VERIFIER_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(__import__("sys").modules, "online_verifiers", raising=False)
    return folder / "online_verifiers.py"


@pytest.fixture
def prompts_file(tmp_path):
    """Six generic records with the arithmetic answer type and worked reference solutions."""
    from miopt.tasks import arithmetic

    problems, _ = arithmetic.generate_splits(6, 0, seed=3)
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as file:
        for problem in problems:
            record = {
                "prompt": problem.prompt,
                "answer": str(problem.answer),
                "answer_type": "arithmetic",
                "solution": problem.solution,
            }
            file.write(json.dumps(record) + "\n")
    return path


def _record(index: int, solution: str | None = "the solution") -> EvalRecord:
    return EvalRecord(f"Q{index}", "1", "exact", solution=solution, source=f"r{index}")


def _online(model, data, output, *extra):
    return [
        "online", "--model", str(model), "--data", str(data), "--output-dir", str(output),
        "--samples", "4", "--prompts-per-round", "4", "--max-new-tokens", "10", "--batch-size", "4",
        "--learning-rate", "1e-3", "--beta", "0.5", "--eval-limit", "0", "--progress", "false",
        "--logging-steps", "1", *extra,
    ]  # fmt: skip


def _rows(folder):
    return [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_are_labelled_and_injection_adds_a_positive_only_when_on():
    records = [_record(0), _record(1), _record(2), _record(3, solution=None)]
    samples = [["a", "b", "c", "d"], ["e", "f", "g", "h"], ["i", "j", "k", "l"], ["m", "n", "o", "p"]]
    rewards = [[1, 0, 0.2, True], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]

    pairs, stats = build_pairs(records, samples, rewards, threshold=0.5, inject_reference=False)
    assert [(p.source, p.chosen, p.rejected, p.injected) for p in pairs] == [("r0", "a", ("b", "c"), False)]
    assert (stats.no_correct, stats.all_correct, stats.no_positive, stats.injected) == (2, 1, 2, 0)

    pairs, stats = build_pairs(records, samples, rewards, threshold=0.5, inject_reference=True)
    by_source = {p.source: p for p in pairs}
    assert set(by_source) == {"r0", "r1"}  # r2: no negative; r3: no solution to inject
    assert by_source["r1"].chosen == "the solution" and by_source["r1"].injected
    assert by_source["r1"].rejected == ("e", "f", "g", "h")  # all K samples are negatives
    assert (stats.pairs, stats.injected, stats.no_positive) == (2, 1, 1)

    metrics = sample_metrics(rewards, 0.5)
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 0 + 1 + 0) / 4)
    assert metrics["pass@K"] == pytest.approx(2 / 4)
    assert metrics["no_correct_fraction"] == pytest.approx(2 / 4)


def test_round_prompts_are_disjoint_slices_that_wrap():
    first, second = round_prompts(10, 4, 1, seed=0), round_prompts(10, 4, 2, seed=0)
    assert len(set(first)) == 4 and not set(first) & set(second)
    assert round_prompts(10, 4, 1, seed=0) == first
    assert sorted(round_prompts(3, 8, 1, seed=0)) == [0, 1, 2]


def test_verifiers_builtin_and_errors_name_the_spec(verifier_module):
    record = EvalRecord("Q: 1+2=?\n", "3", "arithmetic", source="t:1")
    assert load_verifier("builtin")(record, "1+2=3. A: 3") == 1.0
    assert load_verifier("builtin")(record, "1+2=4. A: 4") == 0.0
    assert load_verifier("online_verifiers:even")(record, "ab") == 1.0
    assert load_verifier(f"{verifier_module}:never")(record, "ab") == 0.0  # a file path works too

    cases = {
        "no_such_module_zz:f": "module 'no_such_module_zz' not found",
        "online_verifiers:missing": "has no attribute 'missing'",
        "online_verifiers:NOT_CALLABLE": "not callable",
        "no-colon": "module:function",
        "/no/such/file.py:f": "not found",
    }
    for spec, message in cases.items():
        with pytest.raises(VerifierError, match="verifier") as error:
            load_verifier(spec)
        assert spec in str(error.value) and message in str(error.value)
    with pytest.raises(
        VerifierError, match=r"'online_verifiers:explode' raised ZeroDivisionError: boom \(record t:1"
    ):
        load_verifier("online_verifiers:explode")(record, "x")
    with pytest.raises(VerifierError, match="returned 'yes'.*expected a bool or a finite number"):
        load_verifier("online_verifiers:text")(record, "x")


def test_cli_reports_a_missing_or_failing_verifier(
    small_model_dir, prompts_file, tmp_path, verifier_module, capsys
):
    assert main(_online(small_model_dir, prompts_file, tmp_path / "a", "--verifier", "nope_zz:f")) == 2
    assert "verifier 'nope_zz:f': module 'nope_zz' not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # failed before anything was written
    assert (
        main(_online(small_model_dir, prompts_file, tmp_path / "b", "--verifier", "online_verifiers:explode"))
        == 2
    )
    assert "'online_verifiers:explode' raised ZeroDivisionError" in capsys.readouterr().err


def test_one_round_calls_the_named_verifier_and_labels_pairs(
    small_model_dir, prompts_file, tmp_path, verifier_module
):
    import online_verifiers

    out = tmp_path / "run"
    assert (
        main(
            _online(
                small_model_dir, prompts_file, out, "--rounds", "1", "--verifier", "online_verifiers:even"
            )
        )
        == 0
    )
    samples = _jsonl(out / "round-001" / "samples.jsonl")
    assert len(samples) == 4 and all(len(line["samples"]) == 4 for line in samples)
    # called once per sample, as f(prompt, completion, answer)
    assert sorted(online_verifiers.CALLS) == sorted(
        (line["prompt"], text, line["gold"]) for line in samples for text in line["samples"]
    )
    pairs = {pair["source"]: pair for pair in _jsonl(out / "round-001" / "pairs.jsonl")}
    for line in samples:
        even = [text for text in line["samples"] if len(text) % 2 == 0]
        odd = [text for text in line["samples"] if len(text) % 2 == 1]
        assert line["rewards"] == [float(len(text) % 2 == 0) for text in line["samples"]]
        if even and odd:
            pair = pairs[line["source"]]
            assert pair["chosen"] == even[0] and pair["rejected"] == odd and not pair["injected"]
        else:
            assert line["source"] not in pairs and line["positive"] is None
    (row,) = [row for row in _rows(out) if row["round"] == 1]
    assert row["pairs"] == len(pairs)
    assert row["pass@1"] == pytest.approx(sum(map(sum, (line["rewards"] for line in samples))) / 16)
    if pairs:
        assert row["steps"] >= 1 and "logps/chosen" in row and "logps/rejected" in row
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "round-001")


@pytest.mark.parametrize("inject", [False, True])
def test_all_wrong_prompts_give_positives_only_with_injection(
    small_model_dir, prompts_file, tmp_path, verifier_module, inject
):
    out = tmp_path / "run"
    args = [
        "--rounds",
        "1",
        "--verifier",
        "online_verifiers:never",
        "--inject-reference",
        str(inject).lower(),
    ]
    assert main(_online(small_model_dir, prompts_file, out, *args)) == 0
    (row,) = [row for row in _rows(out) if row["round"] == 1]
    assert row["no_correct_fraction"] == 1.0 and row["pass@1"] == 0.0
    pairs = _jsonl(out / "round-001" / "pairs.jsonl")
    samples = _jsonl(out / "round-001" / "samples.jsonl")
    if inject:
        assert row["pairs"] == row["injected"] == 4 and row["steps"] >= 1
        solutions = {json.loads(line)["prompt"]: json.loads(line)["solution"] for line in prompts_file.open()}
        assert all(
            pair["chosen"] == solutions[pair["prompt"]] and len(pair["rejected"]) == 4 for pair in pairs
        )
        assert all(line["positive"] == "reference" for line in samples)
    else:
        assert row["pairs"] == 0 and row["steps"] == 0 and pairs == []
        assert all(line["positive"] is None for line in samples)


def test_resume_continues_from_the_last_complete_round(
    small_model_dir, prompts_file, tmp_path, verifier_module
):
    extra = ("--verifier", "online_verifiers:even", "--reference-mode", "start")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_online(small_model_dir, prompts_file, straight, "--rounds", "2", *extra)) == 0
    assert main(_online(small_model_dir, prompts_file, resumed, "--rounds", "1", *extra)) == 0
    first = _rows(resumed)
    assert [row["round"] for row in first] == [0, 1]
    # an existing run is not overwritten without --resume; a resumed run keeps its settings
    assert main(_online(small_model_dir, prompts_file, resumed, "--rounds", "2", *extra)) == 2
    assert (
        main(
            _online(
                small_model_dir, prompts_file, resumed, "--rounds", "2", "--resume", *extra, "--samples", "3"
            )
        )
        == 2
    )
    # a round killed mid-way (temporary folder left) and round 1's log line lost after its commit
    (resumed / ".round-002.abc.tmp").mkdir()
    (resumed / "rounds.jsonl").write_text(json.dumps(first[0]) + "\n")
    assert main(_online(small_model_dir, prompts_file, resumed, "--rounds", "2", "--resume", *extra)) == 0
    rows = _rows(resumed)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[1] == first[1]  # round 1 not redone
    assert not (resumed / ".round-002.abc.tmp").exists()
    expected = _rows(straight)[2]
    for key in ("pass@1", "pass@K", "pairs", "steps", "loss", "logps/chosen"):
        if key in expected:
            assert rows[2][key] == pytest.approx(expected[key], rel=1e-5), key
    assert _jsonl(resumed / "round-002" / "samples.jsonl") == _jsonl(straight / "round-002" / "samples.jsonl")


def test_gsm8k_file_with_the_builtin_verifier_injection_and_heldout(small_model_dir, tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    with path.open("w") as file:
        for index in range(4):
            total = 1000 + 2 * index
            answer = f"She has {index} and {1000 + index}.\nSo <<{index}+{1000 + index}={total}>>{total}.\n#### {total}"
            question = f"Ann has {index} apples and {1000 + index} pears. How many fruits?"
            file.write(json.dumps({"question": question, "answer": answer}) + "\n")
    out = tmp_path / "run"
    args = ["--rounds", "1", "--inject-reference", "--eval-data", str(path), "--eval-limit", "2"]
    assert main(_online(small_model_dir, path, out, *args)) == 0
    rows = _rows(out)
    assert rows[0]["heldout_n"] == 2 and "heldout_accuracy" in rows[1]
    assert rows[1]["pass@1"] == 0.0  # an untrained model does not write 1000-odd numbers
    pairs = _jsonl(out / "round-001" / "pairs.jsonl")
    samples = {line["source"]: line for line in _jsonl(out / "round-001" / "samples.jsonl")}
    assert rows[1]["pairs"] == rows[1]["injected"] == len(pairs) == 4
    for pair in pairs:  # every positive is the reference solution, every sample a negative
        assert pair["injected"] and pair["chosen"].endswith(f"#### {samples[pair['source']]['gold']}")
        assert pair["prompt"].startswith("Question: Ann has") and len(pair["rejected"]) == 4


def test_builtin_task_without_model_uses_the_shipped_start_and_its_defaults(tmp_path):
    out = tmp_path / "run"
    args = ["online", "--output-dir", str(out), "--rounds", "1", "--samples", "2", "--prompts-per-round", "2"]
    args += ["--max-new-tokens", "8", "--eval-limit", "3", "--beta", "0.25", "--progress", "false"]
    assert main(args) == 0
    stored = json.loads((out / "online.json").read_text())
    assert stored["start_model"] == "builtin:arith"
    assert stored["options"]["objective"] == "mio" and stored["options"]["learning_rate"] == 5e-5
    assert stored["options"]["beta"] == 0.25  # an explicit flag wins over the built-in defaults
    assert [row.get("heldout_n") for row in _rows(out)] == [3, 3]


def test_sigterm_during_a_round_exits_143_and_resume_equals_the_straight_run(
    small_model_dir, prompts_file, tmp_path, verifier_module, monkeypatch, capsys
):
    """A preempted round's update stops with exit 143; ``--resume`` redoes that round from the last
    complete one (sampling is seeded per round) and ends where the uninterrupted run ends."""
    import os
    import signal

    import miopt.training.preference as train_module

    extra = ("--verifier", "online_verifiers:even", "--reference-mode", "start", "--rounds", "2")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    original, calls = train_module.make_step_function, {"made": 0, "signal_at": None}

    def signalling(*args, **kwargs):
        step = original(*args, **kwargs)
        calls["made"] += 1
        made = calls["made"]

        def wrapped(model, indices):
            if made == calls["signal_at"]:  # the last round's update
                os.kill(os.getpid(), signal.SIGTERM)
            return step(model, indices)

        return wrapped

    monkeypatch.setattr(train_module, "make_step_function", signalling)
    assert main(_online(small_model_dir, prompts_file, straight, *extra)) == 0
    assert _rows(straight)[2]["steps"] > 0, "round 2 must train for the signal to land in it"
    calls["signal_at"], calls["made"] = calls["made"], 0
    capsys.readouterr()
    assert main(_online(small_model_dir, prompts_file, stopped, *extra)) == 143
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "Traceback" not in err
    assert [row["round"] for row in _rows(stopped)] == [0, 1]

    monkeypatch.setattr(train_module, "make_step_function", original)
    assert main(_online(small_model_dir, prompts_file, stopped, *extra, "--resume")) == 0
    rows, expected = _rows(stopped), _rows(straight)
    assert [row["round"] for row in rows] == [0, 1, 2]
    for key in ("pass@1", "pairs", "steps", "loss", "logps/chosen"):
        if key in expected[2]:
            assert rows[2][key] == pytest.approx(expected[2][key], rel=1e-5), key
    assert not list(stopped.glob(".round-*.tmp"))

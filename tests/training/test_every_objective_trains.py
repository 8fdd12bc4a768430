"""``miopt train`` with every registry objective, combinations, KTO's unpaired data (and its bad-input
catalogue), and objective options rejected before any data or model is loaded."""

from __future__ import annotations

import json
import math

import pytest

from miopt import objectives
from miopt.cli import main
from miopt.data.unpaired import load_unpaired_records, split_pairs, with_mismatched_completions
from miopt.errors import DataError, OptionError
from tests.helpers import read_metrics, train_args


@pytest.mark.parametrize("name", objectives.available())
def test_every_objective_trains_end_to_end(name, small_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(small_model_dir, pairs_file, out, "--max-steps", "1", "--objective", name)) == 0
    (row,) = read_metrics(out)
    keys = ["loss", "rewards/accuracies", "logps/chosen"]
    if not objectives.build(name).reference_free:  # simpo has no reference
        keys += ["logps/chosen_change", "logps/rejected_change"]
    for key in keys:
        assert math.isfinite(row[key]), key
    assert json.loads((out / "summary.json").read_text())["objective"] == name


def test_combination_logs_each_term_and_their_weighted_sum(small_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    spec = "mio:1.0,sft:0.5"
    assert main(train_args(small_model_dir, pairs_file, out, "--max-steps", "1", "--objective", spec)) == 0
    (row,) = read_metrics(out)
    assert row["loss"] == pytest.approx(row["loss/mio"] + 0.5 * row["loss/sft"], rel=1e-5)
    assert row["loss/mio"] == pytest.approx(math.log(4.0), abs=1e-4)  # T = 0 at the first step


def test_objective_option_reaches_the_loss(small_model_dir, pairs_file, tmp_path):
    """--objective-option sets declared options: exo_pair's loss at T = 0 depends on eps."""
    values = []
    for eps in ("0.001", "0.3"):
        out = tmp_path / eps
        args = train_args(small_model_dir, pairs_file, out, "--max-steps", "1", "--objective", "exo_pair")
        assert main([*args, "--objective-option", f"label_smoothing={eps}"]) == 0
        values.append(read_metrics(out)[0]["loss"])
    for eps, value in zip((0.001, 0.3), values):  # q = 1/2: log(1/2) - (log(1 - eps) + log eps) / 2
        assert value == pytest.approx(math.log(0.5) - 0.5 * (math.log(1 - eps) + math.log(eps)), abs=1e-4)


# --------------------------------------------------------------------------------------------
# Options rejected before anything is loaded
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--negatives", "bogus"], "--negatives: negatives must be one of marginal, rejected, got 'bogus'"),
        (["--objective", "ipo", "--negatives", "rejected"], "--negatives: option negatives does not apply"),
        (
            ["--objective", "robust", "--label-smoothing", "0.5"],
            "label_smoothing must be a number in [0, 0.5)",
        ),
        (
            ["--objective", "dpop", "--objective-option", "dpop_lambda=-1"],
            "dpop_lambda must be a number in [0, inf), got -1.0",
        ),
        (
            ["--objective", "dpo", "--objective-option", "f_divergence_type=kl"],
            "f_divergence_type must be one of",
        ),
        (
            ["--objective", "dpo", "--objective-option", "nope=1"],
            "option nope does not apply to objective 'dpo'",
        ),
        (["--objective-option", "negatives"], "--objective-option takes KEY=VALUE"),
        (["--objective", "mio:2,nope"], "unknown objective 'nope'"),
        (["--objective", "mio:-1"], "weight of 'mio' must be >= 0"),
        (["--objective", "kto,sft"], "cannot be combined"),
        (["--objective", "kto", "--sft-weight", "0.5"], "--sft-weight does not apply to unpaired objectives"),
        (  # TRL refuses WPO for AOT too
            ["--objective", "aot", "--objective-option", "use_weighting=true"],
            "option use_weighting does not apply to objective 'aot'",
        ),
        (["--ld-alpha", "2"], "--ld-alpha: ld_alpha must be a number in [0, 1], got 2.0"),
        (["--objective", "discopop", "--discopop-tau", "0"], "--discopop-tau: discopop_tau must be"),
        (
            ["--objective", "mio", "--f-divergence-type", "forward_kl"],
            "--f-divergence-type: option f_divergence_type does not apply to objective 'mio'",
        ),
        (
            ["--objective", "mio", "--objective-option", "ld_alpha=1.5"],
            "ld_alpha must be a number in [0, 1]",
        ),
    ],
)
def test_bad_objective_options_fail_before_any_load(extra, message, tmp_path, capsys, monkeypatch):
    import miopt.model.loading
    import miopt.training.preference

    def forbidden(*_, **__):
        raise AssertionError("loaded something before validating the options")

    monkeypatch.setattr(miopt.model.loading, "load_model", forbidden)
    monkeypatch.setattr(miopt.model.loading, "load_tokenizer", forbidden)
    monkeypatch.setattr(miopt.training.preference, "load_examples", forbidden)
    # Neither the data nor the model exists: the option error must come first.
    args = train_args(tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "out", *extra)
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# KTO: unpaired data
# --------------------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _unpaired_rows(count=16):
    rows = []
    for i in range(count):
        a, b = i % 7, i // 7 + 1
        good = i % 2 == 0
        rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b if good else a + b + 1}", "label": good})
    return rows


def test_kto_trains_on_unpaired_data_and_logs_the_reference_point(small_model_dir, tmp_path):
    data = _write(tmp_path / "unpaired.jsonl", _unpaired_rows())
    out = tmp_path / "run"
    assert main(train_args(small_model_dir, data, out, "--max-steps", "3", "--objective", "kto")) == 0
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # T = 0 and z0 = 0: sigmoid(0)
    assert all(row["kl"] >= 0 for row in rows)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen_change", "logps/rejected_change"} <= set(
        rows[0]
    )
    assert json.loads((out / "summary.json").read_text())["examples"] == 16


def test_kto_splits_paired_data(small_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(small_model_dir, pairs_file, out, "--max-steps", "1", "--objective", "kto")) == 0
    pairs = len(pairs_file.read_text().splitlines())
    assert json.loads((out / "summary.json").read_text())["examples"] == 2 * pairs


@pytest.mark.parametrize(
    "row,field,what",
    [
        ({"prompt": "1+1=", "completion": "2"}, "label", "missing"),
        ({"prompt": "1+1=", "completion": "2", "label": "true"}, "label", "must be a boolean (true = desirable), got a string"),
        ({"prompt": "1+1=", "completion": "2", "label": 1}, "label", "must be a boolean"),
        ({"prompt": "1+1=", "completion": "2", "label": None}, "label", "must be a boolean"),
        ({"prompt": "1+1=", "completion": "  ", "label": True}, "completion", "is empty"),
        ({"prompt": "1+1=", "completion": "", "label": False}, "completion", "is empty"),
        ({"completion": "2", "label": True}, "prompt", "missing"),
        ({"prompt": "1+1=", "label": True}, "completion", "missing"),
        ({"prompt": "1+1=", "completion": 2, "label": True}, "completion", "must be a string or a list"),
        ({"text": "1+1=2"}, "completion", "missing: unpaired rows need prompt, completion and label"),
    ],
)  # fmt: skip
def test_unpaired_bad_input_names_file_line_and_field(row, field, what, tmp_path):
    path = _write(tmp_path / "data.jsonl", [_unpaired_rows()[0], row])
    with pytest.raises(DataError) as info:
        load_unpaired_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: field '{field}':"), message
    assert what in message


def test_unpaired_bad_label_through_the_cli(small_model_dir, tmp_path, capsys):
    data = _write(
        tmp_path / "data.jsonl", [*_unpaired_rows(3), {"prompt": "1+1=", "completion": "2", "label": "yes"}]
    )
    code = main(train_args(small_model_dir, data, tmp_path / "out", "--objective", "kto", "--max-steps", "1"))
    assert code != 0
    assert f"{data}:4: field 'label': must be a boolean" in capsys.readouterr().err


def test_unpaired_records_split_paired_rows_and_keep_labels(tmp_path):
    rows = [{"prompt": "Q ", "chosen": "good", "rejected": ["bad", "worse"]}, _unpaired_rows()[1]]
    records, report = load_unpaired_records(_write(tmp_path / "mixed.jsonl", rows))
    assert [(r.completion, r.label) for r in records] == [
        ("good", True),
        ("bad", False),
        ("worse", False),
        ("3", False),
    ]
    assert report.kept == 2 and records[0].source.endswith(":1")


def test_mismatched_completions_come_from_other_examples_of_the_block(tokenizer):
    from miopt.data.tokenize import TokenizedExample

    paired = [TokenizedExample((i,), (100 + i,), ((200 + i,),), f"s{i}") for i in range(10)]
    unpaired = split_pairs(paired)
    assert [e.label for e in unpaired[:4]] == [True, False, True, False]
    result = with_mismatched_completions(unpaired, block=4, max_length=64, seed=3)
    assert [e.chosen_ids for e in result] == [e.chosen_ids for e in unpaired] and len(result) == 20
    completions = [e.chosen_ids for e in unpaired]
    for example in result:
        (mismatched,) = example.rejected_ids
        assert mismatched != example.chosen_ids  # never its own completion
        assert mismatched in completions
    # Every completion is used exactly once as a mismatched one (a rotation within blocks).
    assert sorted(e.rejected_ids[0] for e in result) == sorted(completions)
    with pytest.raises(ValueError):
        with_mismatched_completions(unpaired, block=1, max_length=64)


def test_kto_step_without_desirable_rows_keeps_metrics_finite():
    import torch

    out = objectives.kto(
        torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.zeros(2), torch.zeros(2),
        beta=0.1, labels=torch.tensor([False, False]),
    )  # fmt: skip
    assert all(torch.isfinite(v).all() for v in out.metrics().values())


def test_trl_modifier_flags_and_yaml_keys_set_the_objective_options(tmp_path):
    """TRL's DPOConfig names work as flags and as --config YAML keys, the same as --objective-option."""
    from miopt.config import resolve
    from miopt.training.objective_flags import ld_alpha_of, objective_options, uses_weighting
    from miopt.training.preference import TrainOptions

    want = {"dpo": {"use_weighting": True, "ld_alpha": 0.5, "f_divergence_type": "alpha_divergence",
                    "f_alpha_divergence_coef": 0.3}}  # fmt: skip
    generic = TrainOptions(objective="dpo", objective_option=[
        "use_weighting=true", "ld_alpha=0.5", "f_divergence_type=alpha_divergence", "f_alpha_divergence_coef=0.3",
    ])  # fmt: skip
    assert objective_options(generic) == want
    config = tmp_path / "trl.yaml"
    config.write_text(
        "objective: dpo\nuse_weighting: true\nld_alpha: 0.5\nf_divergence_type: alpha_divergence\n"
        "f_alpha_divergence_coef: 0.3\n"
    )
    from_yaml = resolve(TrainOptions, {"config": str(config)})
    assert objective_options(from_yaml) == want
    assert uses_weighting(from_yaml) and ld_alpha_of(from_yaml) == 0.5
    assert objective_options(TrainOptions(objective="mio")) == {"mio": {}}  # unset flags set nothing


def test_option_error_type_is_an_option_error():
    from miopt.training.objective_flags import objective_options
    from miopt.training.preference import TrainOptions

    with pytest.raises(OptionError):
        objective_options(TrainOptions(objective="dpo", negatives="nope"))


# --------------------------------------------------------------------------------------------
# LD-DPO in the step function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["padded", "packed", "shared-prompt"])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
def test_ld_pair_logps_weights_the_tail_beyond_the_shorter_response(tiny_model, tokenizer, packing, ld_alpha):
    """Per pair, the first min(|y_w|, |y_l|) tokens count fully and the rest times alpha, in every layout;
    alpha = 1 is the plain summed log-prob."""
    import torch

    from miopt.data.tokenize import TokenizedExample, collate
    from miopt.logprobs.forward import pair_logps, sequence_logps
    from miopt.logprobs.length_desensitised import ld_pair_logps
    from miopt.logprobs.packing import make_batch

    examples = [
        TokenizedExample((5, 6, 7), (10, 11, 12, 13, 14), ((20, 21),), "a"),
        TokenizedExample((8, 9), (30,), ((31, 32, 33), (34, 35)), "b"),
    ]
    tiny_model.eval()
    with torch.no_grad():
        got = ld_pair_logps(
            tiny_model, make_batch(examples, 0, packing, tiny_model), chunk_tokens=64, ld_alpha=ld_alpha
        )
        padded = collate(examples, 0)
        per_token = sequence_logps(tiny_model, padded, chunk_tokens=0).per_token
        plain = pair_logps(tiny_model, padded, chunk_tokens=0)

    def expected(row: int, prompt: int, length: int, shared: int) -> float:
        tokens = per_token[row, prompt : prompt + length]
        return float(tokens[:shared].sum() + ld_alpha * tokens[shared:].sum())

    # Rows of the padded layout: chosen a, chosen b, then rejected a0, b0, b1.
    # Lengths: a 5 vs 2 (shared 2); b 1 vs 3 and 2 (chosen shares 1 with its shortest, each rejected 1).
    want_chosen = [expected(0, 3, 5, 2), expected(1, 2, 1, 1)]
    want_rejected = [[expected(2, 3, 2, 2), 0.0], [expected(3, 2, 3, 1), expected(4, 2, 2, 1)]]
    torch.testing.assert_close(got.chosen, torch.tensor(want_chosen), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        got.rejected * got.rejected_mask, torch.tensor(want_rejected), rtol=1e-5, atol=1e-5
    )
    if ld_alpha == 1.0:
        torch.testing.assert_close(got.chosen, plain.chosen, rtol=1e-5, atol=1e-5)


def _step_examples():
    from miopt.data.tokenize import TokenizedExample

    return [  # prompt, chosen, rejected..., id: lengths 5 vs 2, and 1 vs 3 and 2
        TokenizedExample((5, 6, 7), (10, 11, 12, 13, 14), ((20, 21),), "a"),
        TokenizedExample((8, 9), (30,), ((31, 32, 33), (34, 35)), "b"),
    ]


@pytest.mark.parametrize("packing", ["padded", "shared-prompt"])
def test_the_reference_cache_gives_the_ld_logps_of_a_reference_forward(tiny_model, packing):
    """The cached tail sums turn into LD-DPO's reference log-probs for any alpha, equal to an LD forward
    of the reference, although the cache was filled one example at a time."""
    import torch

    from miopt.logprobs.length_desensitised import ld_pair_logps
    from miopt.logprobs.packing import make_batch
    from miopt.logprobs.reference import compute_reference_logps

    examples = _step_examples()
    tiny_model.eval()
    reference = compute_reference_logps(
        tiny_model, examples, 0, batch_size=1, packing=packing, progress=False
    )
    for ld_alpha in (0.0, 0.3):
        with torch.no_grad():
            batch = make_batch(examples, 0, packing, tiny_model)
            want = ld_pair_logps(tiny_model, batch, chunk_tokens=64, ld_alpha=ld_alpha)
        chosen, rejected = reference.select([0, 1], 2, ld_alpha)
        mask = want.rejected_mask
        torch.testing.assert_close(chosen, want.chosen, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rejected * mask, want.rejected * mask, atol=1e-5, rtol=1e-5)
    summed_chosen, _ = reference.select([0, 1], 2)
    assert (summed_chosen[0] - chosen[0]).abs() > 1e-3  # example a's chosen has a tail of 3 tokens


@pytest.mark.parametrize("packing", ["padded", "shared-prompt"])
def test_wpo_step_weights_each_pair_by_its_responses(tiny_model, packing):
    """At the first step (policy = reference) DPO's loss of a prompt with K rejected responses is
    log(1 + K), and WPO multiplies it by w(y_w) mean_k w(y_k), w(y) = exp(mean_t [log p(y_t) - log
    sum_v p(v)^2]): here computed by hand."""
    import torch

    from miopt.logprobs.reference import compute_reference_logps
    from miopt.training.preference_step import PreferenceData, make_step_function

    examples = _step_examples()
    tiny_model.eval()
    reference = compute_reference_logps(tiny_model, examples, 0, packing=packing, progress=False)
    step = make_step_function(
        objectives.build("dpo", {"use_weighting": True}),
        PreferenceData(examples, reference),
        beta=0.5, pad_token_id=0, chunk_tokens=4, packing=packing,
    )  # fmt: skip
    loss, _ = step(tiny_model, [0, 1])

    def weight(prompt, response) -> float:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0].double()
        terms = []
        for t in range(len(prompt), ids.shape[1]):
            logp = torch.log_softmax(logits[t - 1], -1)
            terms.append(logp[ids[0, t]] - torch.log((logp.exp() ** 2).sum()))
        return math.exp(float(torch.stack(terms).mean()))

    weights = [
        weight(e.prompt_ids, e.chosen_ids)
        * sum(weight(e.prompt_ids, r) for r in e.rejected_ids)
        / len(e.rejected_ids)
        for e in examples
    ]
    assert all(abs(w - 1) > 0.05 for w in weights)  # the weights are not trivially one
    losses = [math.log(1 + len(e.rejected_ids)) * w for e, w in zip(examples, weights)]
    assert float(loss.detach()) == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_use_weighting_trains_end_to_end(small_model_dir, pairs_file, tmp_path):
    plain, weighted = tmp_path / "plain", tmp_path / "weighted"
    assert main(train_args(small_model_dir, pairs_file, plain, "--max-steps", "2", "--objective", "dpo")) == 0
    args = train_args(small_model_dir, pairs_file, weighted, "--max-steps", "2", "--objective", "dpo")
    assert main([*args, "--objective-option", "use_weighting=true"]) == 0
    first_plain, first_weighted = read_metrics(plain)[0], read_metrics(weighted)[0]
    assert first_plain["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert math.isfinite(first_weighted["loss"]) and first_weighted["loss"] != pytest.approx(math.log(2.0))
    assert first_weighted["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # weights scale the loss only


def test_ld_alpha_trains_from_the_reference_cache_as_from_a_reference_forward(
    small_model_dir, pairs_file, tmp_path
):
    losses = {}
    for reference in ("on-the-fly", "precompute", "precompute"):  # the second precompute reads the cache
        out = tmp_path / f"{reference}-{len(losses)}"
        args = train_args(small_model_dir, pairs_file, out, "--max-steps", "2", "--objective", "dpo")
        assert main([*args, "--reference", reference, "--objective-option", "ld_alpha=0.5"]) == 0
        rows = read_metrics(out)
        assert rows[0]["loss"] == pytest.approx(
            math.log(2.0), abs=1e-5
        )  # policy = reference at the first step
        summary = json.loads((out / "summary.json").read_text())
        losses[(reference, summary["reference_cached"])] = [row["loss"] for row in rows]
    assert set(losses) == {("on-the-fly", False), ("precompute", False), ("precompute", True)}
    assert losses[("precompute", True)] == losses[("precompute", False)]
    assert losses[("precompute", False)] == pytest.approx(losses[("on-the-fly", False)], abs=1e-4)
    assert losses[("on-the-fly", False)][1] < math.log(2.0)  # the second step has trained


def test_compare_accepts_every_name_and_combination(tmp_path):
    from miopt.experiments.compare import CompareOptions, check_compare_options

    names = [*objectives.available(), "mio:1.0,sft:0.5", "dpo:1,sft:1"]
    check_compare_options(CompareOptions(output_dir=str(tmp_path), objectives=names))
    for bad, match in [
        ("mio:x", "must be a number"),
        ("nope", "unknown objective 'nope'"),
        ("kto,sft", "cannot be combined"),
    ]:
        with pytest.raises(OptionError, match=match):
            check_compare_options(CompareOptions(output_dir=str(tmp_path), objectives=["dpo", bad]))


def test_toy_rejects_kto_and_accepts_combinations(tmp_path, capsys):
    assert main(["toy", "--output-dir", str(tmp_path / "a"), "--objectives", "kto"]) == 2
    assert "unpaired data" in capsys.readouterr().err
    assert main(["toy", "--output-dir", str(tmp_path / "b"), "--objectives", "mio:x"]) == 2
    assert "must be a number" in capsys.readouterr().err

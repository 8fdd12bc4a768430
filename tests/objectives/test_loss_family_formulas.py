"""The loss family beyond the MI estimators (TRL's remaining loss types, the decline-fixers, KTO,
weighted combinations, declared options): each formula against a hand computation with ``math`` on a few
values, autograd gradients against the closed form where one exists, finiteness at |T| = 1e4, and
the registry's spec parsing and option validation. TRL as the oracle: tests/objectives/test_against_trl_losses.py."""

from __future__ import annotations

import math

import pytest
import torch

from miopt.objectives import (
    ObjectiveOptionError,
    UnknownObjectiveError,
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    available,
    build,
    cal_dpo,
    compute,
    continued_sft,
    discopop,
    dpop,
    dv,
    exo_pair,
    is_unpaired,
    js,
    kto,
    parse_spec,
    resolve_options,
    sigmoid_norm,
    sppo_hard,
)

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
T_W = [0.7, -1.3, 2.2, -0.4]
T_L = [-0.5, 0.9, 1.1, -2.0]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def run(objective, t_w, t_l, *, beta=1.0, lengths=None, **options):
    """The objective on critics ``T`` given as policy log-probs with a zero reference (so T = beta * logp)."""
    t_w = torch.as_tensor(t_w, dtype=DTYPE).clone().requires_grad_(True)
    t_l = torch.as_tensor(t_l, dtype=DTYPE).clone().requires_grad_(True)
    out = objective(t_w, t_l, torch.zeros_like(t_w), torch.zeros_like(t_l), beta=beta, **options)
    return out, t_w, t_l


def expected(formula, *columns):
    return torch.tensor([formula(*values) for values in zip(*columns)], dtype=DTYPE)


# --------------------------------------------------------------------------------------------
# Hand computations (beta = 1 unless a test says otherwise: T = the given values)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-3, 0.25])
def test_exo_pair_hand_values_and_closed_form_gradient(eps):
    def loss(w, r):
        q = sig(w - r)
        return q * (math.log(q) - math.log(1 - eps)) + (1 - q) * (math.log(1 - q) - math.log(eps))

    out, t_w, t_l = run(exo_pair, T_W, T_L, label_smoothing=eps)
    torch.testing.assert_close(out.losses, expected(loss, T_W, T_L), **TOL)
    (g_w,) = torch.autograd.grad(out.losses.sum(), t_w)
    # dL/dm = q (1 - q) (m - log((1 - eps) / eps)), m = T_w - T_l.
    closed = expected(
        lambda w, r: sig(w - r) * (1 - sig(w - r)) * (w - r - math.log((1 - eps) / eps)), T_W, T_L
    )
    torch.testing.assert_close(g_w, closed, **TOL)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_sppo_hard_hand_values_and_gradient(beta):
    def loss(w, r):
        return (w / beta - 0.5 / beta) ** 2 + (r / beta + 0.5 / beta) ** 2

    out, t_w, t_l = run(sppo_hard, T_W, T_L, beta=beta)
    # With beta != 1 the inputs are log-probs: T = beta * value.
    tw, tl = [beta * x for x in T_W], [beta * x for x in T_L]
    torch.testing.assert_close(out.losses, expected(loss, tw, tl), **TOL)
    g_w, g_l = torch.autograd.grad(out.losses.sum(), (t_w, t_l))
    torch.testing.assert_close(g_w, expected(lambda w: 2 * (w / beta - 0.5 / beta), tw), **TOL)
    torch.testing.assert_close(g_l, expected(lambda x: 2 * (x / beta + 0.5 / beta), tl), **TOL)


def test_apo_zero_and_apo_down_hand_values_and_gradients():
    out, t_w, t_l = run(apo_zero, T_W, T_L)
    torch.testing.assert_close(out.losses, expected(lambda w, r: 1 - sig(w) + sig(r), T_W, T_L), **TOL)
    g_w, g_l = torch.autograd.grad(out.losses.sum(), (t_w, t_l))
    torch.testing.assert_close(g_w, expected(lambda w: -sig(w) * (1 - sig(w)), T_W), **TOL)
    torch.testing.assert_close(g_l, expected(lambda x: sig(x) * (1 - sig(x)), T_L), **TOL)
    # Decoupled like MIO: the chosen gradient does not depend on T_l.
    assert out.chosen_grad_weight.min() > 0

    out, t_w, t_l = run(apo_down, T_W, T_L)
    torch.testing.assert_close(out.losses, expected(lambda w, r: sig(w) + 1 - sig(w - r), T_W, T_L), **TOL)
    g_w, g_l = torch.autograd.grad(out.losses.sum(), (t_w, t_l))
    d = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    torch.testing.assert_close(g_w, expected(lambda w, r: d(w) - d(w - r), T_W, T_L), **TOL)
    torch.testing.assert_close(g_l, expected(lambda w, r: d(w - r), T_W, T_L), **TOL)


@pytest.mark.parametrize("tau", [0.05, 1.0, 3.0])
def test_discopop_hand_values(tau):
    def loss(w, r):
        m = w - r
        s = sig(m / tau)
        return -math.log(sig(m)) * (1 - s) + math.exp(-m) * s

    out, _, _ = run(discopop, T_W, T_L, discopop_tau=tau)
    torch.testing.assert_close(out.losses, expected(loss, T_W, T_L), **TOL)


def test_sigmoid_norm_hand_values_uses_each_length():
    n_w, n_l = [2.0, 5.0, 1.0, 3.0], [4.0, 1.0, 7.0, 2.0]
    out, _, _ = run(
        sigmoid_norm, T_W, T_L, chosen_lengths=torch.tensor(n_w), rejected_lengths=torch.tensor(n_l)
    )
    loss = lambda w, r, a, b: -math.log(sig(w / a - r / b))  # noqa: E731
    torch.testing.assert_close(out.losses, expected(loss, T_W, T_L, n_w, n_l), **TOL)


@pytest.mark.parametrize("lam", [0.0, 5.0, 50.0])
def test_dpop_hand_values_and_gradient(lam):
    def margin(w, r):
        return w - r - lam * max(0.0, -w)

    out, t_w, t_l = run(dpop, T_W, T_L, dpop_lambda=lam)
    torch.testing.assert_close(
        out.losses, expected(lambda w, r: -math.log(sig(margin(w, r))), T_W, T_L), **TOL
    )
    (g_w,) = torch.autograd.grad(out.losses.sum(), t_w)
    slope = lambda w: 1.0 + (lam if w < 0 else 0.0)  # noqa: E731
    closed = expected(lambda w, r: -sig(-margin(w, r)) * slope(w), T_W, T_L)
    torch.testing.assert_close(g_w, closed, **TOL)
    if lam == 0.0:
        torch.testing.assert_close(out.losses, dv(*run_inputs(T_W, T_L), beta=1.0).losses, **TOL)


def run_inputs(t_w, t_l):
    t_w, t_l = torch.tensor(t_w, dtype=DTYPE), torch.tensor(t_l, dtype=DTYPE)
    return t_w, t_l, torch.zeros_like(t_w), torch.zeros_like(t_l)


def test_dpop_penalises_a_falling_chosen_log_ratio_dpo_does_not():
    """Same margin, chosen below the reference: DPO's loss is unchanged, DPOP's grows."""
    above = run(dpop, [2.0], [1.0], dpop_lambda=50.0)[0].losses
    below = run(dpop, [-1.0], [-2.0], dpop_lambda=50.0)[0].losses
    assert below.item() > above.item() + 10
    torch.testing.assert_close(run(dv, [2.0], [1.0])[0].losses, run(dv, [-1.0], [-2.0])[0].losses)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_cal_dpo_hand_values_and_gradient(beta):
    def loss(hw, hl):
        return -math.log(sig(hw - hl)) + (hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2

    out, t_w, _ = run(cal_dpo, T_W, T_L, beta=beta)  # inputs are the log-ratios h: T = beta h
    torch.testing.assert_close(out.losses, expected(loss, T_W, T_L), **TOL)
    (g_w,) = torch.autograd.grad(out.losses.sum(), t_w)  # d/dh_w
    closed = expected(lambda hw, hl: -sig(-(hw - hl)) + 2 * (hw - 0.5 / beta), T_W, T_L)
    torch.testing.assert_close(g_w, closed, **TOL)


def test_aot_sorts_over_the_batch_by_hand():
    """Three prompts with a zero reference margin except prompt 1: the sorted policy margins meet the
    sorted reference margins rank by rank."""
    pc = torch.tensor([0.0, 0.0, 0.0], dtype=DTYPE)
    pr = torch.tensor([-1.0, 2.0, 0.5], dtype=DTYPE)  # policy margins 1, -2, -0.5
    rc = torch.tensor([0.0, 0.3, 0.0], dtype=DTYPE)
    rr = torch.tensor([0.0, 0.0, 0.0], dtype=DTYPE)  # reference margins 0, 0.3, 0
    beta = 0.5
    policy_sorted, ref_sorted = [-2.0, -0.5, 1.0], [0.0, 0.0, 0.3]
    rank_losses = [-math.log(sig(beta * (p - r))) for p, r in zip(policy_sorted, ref_sorted)]
    out = aot(pc, pr, rc, rr, beta=beta)
    # Rank r's loss goes to the prompt holding rank r of the policy margins: prompt 1, 2, 0.
    torch.testing.assert_close(
        out.losses, torch.tensor([rank_losses[2], rank_losses[0], rank_losses[1]], dtype=DTYPE)
    )

    # aot_unpaired: chosen log-ratios (0, -0.3, 0) and rejected (-1, 2, 0.5), each sorted.
    chosen_sorted, rejected_sorted = [-0.3, 0.0, 0.0], [-1.0, 0.5, 2.0]
    rank_losses = [-math.log(sig(beta * (c - r))) for c, r in zip(chosen_sorted, rejected_sorted)]
    out = aot_unpaired(pc, pr, rc, rr, beta=beta)
    assert out.losses.sum().item() == pytest.approx(sum(rank_losses), abs=1e-12)
    assert out.losses[1].item() == pytest.approx(
        rank_losses[0], abs=1e-12
    )  # prompt 1 holds the lowest chosen


def test_kto_hand_values_reference_point_and_gradient():
    beta = 0.5
    policy = torch.tensor([-3.0, -5.0, -2.0, -4.0], dtype=DTYPE, requires_grad=True)
    ref = torch.tensor([-3.5, -4.0, -2.5, -4.0], dtype=DTYPE)
    mismatched = torch.tensor([-7.0, -6.0, -9.0, -8.0], dtype=DTYPE)
    ref_mismatched = torch.tensor([-7.5, -6.2, -8.9, -8.4], dtype=DTYPE)  # log-ratios 0.5, 0.2, -0.1, 0.4
    labels = torch.tensor([True, False, True, False])
    out = kto(policy, mismatched, ref, ref_mismatched, beta=beta, labels=labels, desirable_weight=1.5)
    z0 = (0.5 + 0.2 - 0.1 + 0.4) / 4
    h = [0.5, -1.0, 0.5, 0.0]

    def loss(h_i, desirable):
        return 1.5 * (1 - sig(beta * (h_i - z0))) if desirable else 1 - sig(beta * (z0 - h_i))

    torch.testing.assert_close(out.losses, expected(loss, h, labels.tolist()), **TOL)
    assert out.metrics()["kl"].item() == pytest.approx(z0)
    (grad,) = torch.autograd.grad(out.losses.sum(), policy)
    closed = expected(
        lambda h_i, d: (-1.5 if d else 1.0) * beta * sig(beta * (h_i - z0)) * (1 - sig(beta * (h_i - z0))),
        h,
        labels.tolist(),
    )
    torch.testing.assert_close(grad, closed, **TOL)
    # A negative estimate is clamped to 0 (Ethayarajh et al. 2024: z0 >= 0).
    clamped = kto(policy, mismatched, ref, mismatched + 1.0, beta=beta, labels=labels)
    assert clamped.metrics()["kl"].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kto_finite_for_extreme_critics(dtype):
    grid = torch.tensor([-1e4, -300.0, 0.0, 300.0, 1e4], dtype=dtype)
    t, t_kl = (x.reshape(-1).clone().requires_grad_(True) for x in torch.meshgrid(grid, grid, indexing="ij"))
    labels = torch.arange(t.shape[0]) % 2 == 0
    out = kto(t, t_kl, torch.zeros_like(t), torch.zeros_like(t_kl), beta=1.0, labels=labels)
    (grad,) = torch.autograd.grad(out.losses.sum(), t)
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(value).all() for value in out.metrics().values())


# --------------------------------------------------------------------------------------------
# Combinations
# --------------------------------------------------------------------------------------------


def random_batch(n=6, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (n, k)
    pc, pr = -torch.rand(n, generator=g, dtype=DTYPE) * 20, -torch.rand(shape, generator=g, dtype=DTYPE) * 20
    rc, rr = pc + torch.randn(n, generator=g, dtype=DTYPE), pr + torch.randn(shape, generator=g, dtype=DTYPE)
    lengths = (
        torch.randint(1, 9, (n,), generator=g).to(DTYPE),
        torch.randint(1, 9, shape, generator=g).to(DTYPE),
    )
    return pc, pr, rc, rr, lengths


@pytest.mark.parametrize(
    "spec,terms",
    [
        ("mio:1.0,sft:0.5", [(js, 1.0), (continued_sft, 0.5)]),
        ("rpo", [(dv, 1.0), (continued_sft, 1.0)]),
        ("dpo:0.8,apo_zero:0.2,cal_dpo:0.3", [(dv, 0.8), (apo_zero, 0.2), (cal_dpo, 0.3)]),
        ("sigmoid:2", [(dv, 2.0)]),
    ],
)
@pytest.mark.parametrize("k", [None, 3])
def test_combination_is_the_weighted_sum_of_its_terms(spec, terms, k):
    pc, pr, rc, rr, (len_c, len_r) = random_batch(k=k, seed=3)
    outs = []
    for objective in [build(spec)] + [t for t, _ in terms]:
        leaf = pc.clone().requires_grad_(True)
        out = compute(objective, leaf, pr, rc, rr, beta=0.3, chosen_lengths=len_c, rejected_lengths=len_r)
        outs.append((out, torch.autograd.grad(out.losses.sum(), leaf)[0]))
    (combined, combined_grad), parts = outs[0], outs[1:]
    torch.testing.assert_close(
        combined.losses, sum(w * o.losses for (o, _), (_, w) in zip(parts, terms)), **TOL
    )
    torch.testing.assert_close(combined_grad, sum(w * g for (_, g), (_, w) in zip(parts, terms)), **TOL)
    torch.testing.assert_close(
        combined.chosen_grad_weight,
        sum(w * o.chosen_grad_weight for (o, _), (_, w) in zip(parts, terms)),
        **TOL,
    )
    metrics = combined.metrics()
    if len(terms) > 1:
        names = [name for name, _ in parse_spec(spec)]
        for name, (part, _) in zip(names, parts):
            assert metrics[f"loss/{name}"].item() == pytest.approx(part.losses.mean().item(), abs=1e-12)


def test_parse_spec_and_its_errors():
    assert parse_spec("mio") == [("mio", 1.0)]
    assert parse_spec(" mio : 1.0 , sft:0.5") == [("mio", 1.0), ("sft", 0.5)]
    assert parse_spec("rpo:0.5") == [("dpo", 0.5), ("sft", 0.5)]
    assert parse_spec("nca_pair,sigmoid:0") == [("mio", 1.0), ("dpo", 0.0)]
    with pytest.raises(UnknownObjectiveError, match="valid objectives: .*cal_dpo"):
        parse_spec("mio,nope:1")
    for bad, match in [
        ("mio:x", "must be a number"),
        ("mio:-1", ">= 0"),
        ("mio:inf", "finite"),
        ("mio,,sft", "empty term"),
        ("mio,js", "given more than once"),  # js is mio
        ("mio:1,mio:2", "given more than once"),
        ("mio:0,sft:0", "at least one weight must be positive"),
        ("kto,sft", "unpaired data and cannot be combined"),
    ]:
        if bad == "mio,js":
            assert parse_spec(bad) == [("mio", 1.0), ("js", 1.0)]  # distinct registry names: allowed
            continue
        with pytest.raises(ObjectiveOptionError, match=match):
            parse_spec(bad)
    assert is_unpaired("kto") and not is_unpaired("mio:1,sft:1")


def test_every_issue_13_name_is_available():
    names = set(available())
    wanted = {"exo_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
              "sigmoid_norm", "dpop", "cal_dpo", "rpo", "kto", "sft", "sigmoid", "nca_pair"}  # fmt: skip
    assert wanted <= names


# --------------------------------------------------------------------------------------------
# Declared options
# --------------------------------------------------------------------------------------------


def test_resolve_options_checks_values_and_applies_to_the_terms_that_take_them():
    assert resolve_options("dpop", {"dpop_lambda": "5"}) == {"dpop": {"dpop_lambda": 5.0}}
    assert resolve_options("dpo:1,robust:1", {"label_smoothing": 0.2}) == {
        "dpo": {},
        "robust": {"label_smoothing": 0.2},
    }
    assert resolve_options("dpo", {"use_weighting": "true"}) == {"dpo": {"use_weighting": True}}
    bad = [
        ("mio", {"negatives": "bogus"}, "negatives must be one of marginal, rejected, got 'bogus'"),
        ("mio", {"label_smoothing": 0.1}, "option label_smoothing does not apply to objective 'mio'"),
        ("robust", {"label_smoothing": 0.5}, r"label_smoothing must be a number in \[0, 0.5\), got 0.5"),
        ("exo_pair", {"label_smoothing": 0.0}, r"in \(0, 1\)"),
        ("discopop", {"discopop_tau": -1}, r"discopop_tau must be a number in \(0, inf\)"),
        ("dpop", {"dpop_lambda": "lots"}, "dpop_lambda must be a number"),
        (
            "dpo",
            {"f_divergence_type": "kl"},
            "one of reverse_kl, forward_kl, js_divergence, alpha_divergence",
        ),
        ("dpo", {"f_alpha_divergence_coef": 0.3}, "needs f_divergence_type=alpha_divergence"),
        ("mio", {"f_divergence_type": "js_divergence"}, "does not apply"),  # TRL: not for nca_pair
        ("kto", {"desirable_weight": 0}, r"desirable_weight must be a number in \(0, inf\)"),
        ("dpo", {"use_weighting": "maybe"}, "use_weighting must be true or false"),
        ("dpo", {"ld_alpha": 1.5}, r"ld_alpha must be a number in \[0, 1\]"),
    ]
    for spec, given, match in bad:
        with pytest.raises(ObjectiveOptionError, match=match):
            resolve_options(spec, given)


def test_options_reach_the_objective():
    pc, pr, rc, rr, _ = random_batch(seed=8)
    torch.testing.assert_close(
        build("dpop", {"dpop_lambda": 3.0})(pc, pr, rc, rr, beta=0.2).losses,
        dpop(pc, pr, rc, rr, beta=0.2, dpop_lambda=3.0).losses,
    )
    torch.testing.assert_close(
        build("dpo", {"negatives": "rejected"})(pc, pr, rc, rr, beta=0.2).losses,
        dv(pc, pr, rc, rr, beta=0.2, negatives="rejected").losses,
    )
    # BCO's state is the combination's, saved under its term's name and restored into a fresh build.
    combined = build("bco:1,sft:1")
    pc, pr, rc, rr, _ = random_batch(seed=9)
    combined(pc, pr, rc, rr, beta=0.2, chosen_lengths=torch.ones_like(pc))
    saved = combined.state.state_dict()
    assert set(saved) == {"bco"} and saved["bco"]["reward_count"] > 0
    fresh = build("bco:1,sft:1")
    fresh.state.load_state_dict(saved)
    assert fresh.state.state_dict() == saved
    assert build("mio").state is None


def test_build_without_options_holds_the_registered_function():
    assert build("cal_dpo").loss is cal_dpo and build("sigmoid").loss is dv and build("nca_pair").loss is js
    assert build("sigmoid").name == "dpo" and build("nca_pair").name == "mio"

"""Properties of the objectives module (docs/theory.md sections 2-5) and its registry.

Most tests drive an objective with critic values directly: reference log-probs zero and
``beta = 1`` make ``T = policy log-prob``, so gradients with respect to the policy log-probs
are gradients with respect to ``T``. Everything runs in float64 unless the test is about
float32 overflow.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from miopt.objectives import (
    BCO,
    ObjectiveOutput,
    UnknownObjectiveError,
    available,
    build,
    compute,
    dv,
    hinge,
    ipo,
    is_unpaired,
    js,
    nwj,
    robust,
    simpo,
)

DTYPE = torch.float64
# The generic properties below hold for every paired objective; kto (unpaired data) has its own tests.
PAIRED = sorted(name for name in available() if not is_unpaired(name))
# Batch-coupled objectives (AOT sorts over the batch): a prompt's loss depends on the other prompts.
BATCH_COUPLED = {"aot", "aot_unpaired"}
LOG4 = math.log(4.0)
TOL = {"rtol": 1e-10, "atol": 1e-10}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def leaf(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=DTYPE).clone().requires_grad_(True)


def call(name: str, t_w, t_l, *, mask=None, lengths=None, objective=None, **options) -> ObjectiveOutput:
    """Run the registered objective ``name`` on critic values (``beta = 1``, reference zero).

    Lengths are ones unless given (they only matter to simpo and the SFT term).
    """
    objective = objective if objective is not None else build(name)
    t_l = torch.as_tensor(t_l)
    chosen_lengths = torch.ones(t_w.shape[0], dtype=DTYPE) if lengths is None else lengths[0]
    rejected_lengths = torch.ones(t_l.shape, dtype=DTYPE) if lengths is None else lengths[1]
    return compute(
        objective,
        t_w,
        t_l,
        torch.zeros_like(t_w, dtype=DTYPE),
        torch.zeros(t_l.shape, dtype=DTYPE),
        beta=1.0,
        rejected_mask=mask,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        **options,
    )


def random_logps(n: int, seed: int, *, k: int | None = None):
    """Random policy/reference summed log-probs of realistic magnitude: chosen [n], rejected [n] or [n, k]."""
    g = generator(seed)
    shape = (n,) if k is None else (n, k)
    policy_chosen = -torch.rand(n, generator=g, dtype=DTYPE) * 60
    policy_rejected = -torch.rand(shape, generator=g, dtype=DTYPE) * 60
    ref_chosen = policy_chosen + torch.randn(n, generator=g, dtype=DTYPE) * 8
    ref_rejected = policy_rejected + torch.randn(shape, generator=g, dtype=DTYPE) * 8
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # An input the loss does not use (the sft objective's rejected log-probs) has gradient 0.
    return torch.autograd.grad(loss, tensors, materialize_grads=True)


# --------------------------------------------------------------------------------------------
# theory.md section 5: dv is DPO, js is MIO/NCA, stability, shift, listwise, masking, negatives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_dv_equals_dpo_sigmoid_loss_and_its_gradient(beta):
    pc, pr, rc, rr = random_logps(64, seed=1)
    pc, pr = leaf(pc), leaf(pr)
    out = dv(pc, pr, rc, rr, beta=beta)
    expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(out.losses, expected, **TOL)
    for got, want in zip(grads(out.losses.sum(), pc, pr), grads(expected.sum(), pc, pr)):
        torch.testing.assert_close(got, want, **TOL)
    # One pair with marginal negatives: the DV bound is log 2 - loss_DPO (theory.md section 2).
    torch.testing.assert_close(out.mi_bound, math.log(2.0) - expected.detach(), **TOL)


def test_dpo_alias_is_dv_and_mio_alias_is_js():
    assert build("dpo").loss is dv and build("dpo").name == "dpo"
    assert build("mio").loss is js and build("mio").name == "mio"


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_js_equals_mio_closed_form_and_its_gradient(beta):
    pc, pr, rc, rr = random_logps(64, seed=2)
    pc, pr = leaf(pc), leaf(pr)
    out = js(pc, pr, rc, rr, beta=beta)
    t_w, t_l = beta * (pc - rc), beta * (pr - rr)
    expected = -F.logsigmoid(t_w) - 0.5 * F.logsigmoid(-t_w) - 0.5 * F.logsigmoid(-t_l)
    torch.testing.assert_close(out.losses, expected, **TOL)
    for got, want in zip(grads(out.losses.sum(), pc, pr), grads(expected.sum(), pc, pr)):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(out.mi_bound, -expected.detach(), **TOL)


def test_js_is_log4_at_zero():
    pc, pr, _, _ = random_logps(8, seed=3)
    out = js(pc, pr, pc.clone(), pr.clone(), beta=0.3)  # policy == reference: T = 0
    torch.testing.assert_close(out.losses, torch.full((8,), LOG4, dtype=DTYPE), rtol=0, atol=1e-14)
    out = call("mio", torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))
    assert out.losses.item() == pytest.approx(LOG4, abs=1e-15)


def coupling(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a one-pair objective along two sweeps, plus the mixed second derivative.

    Returns (dL/dT_w for fixed T_w while T_l sweeps, dL/dT_l for fixed T_l while T_w sweeps,
    d2L/dT_w dT_l on a grid, and the sweep itself).
    """
    sweep = torch.linspace(-12.0, 12.0, 49, dtype=DTYPE)
    fixed = torch.full_like(sweep, 0.7)
    t_w, t_l = leaf(fixed), leaf(sweep)
    (d_w,) = grads(call(name, t_w, t_l).losses.sum(), t_w)
    t_w, t_l = leaf(sweep), leaf(fixed)
    (d_l,) = grads(call(name, t_w, t_l).losses.sum(), t_l)
    t_w, t_l = leaf(sweep), leaf(sweep.flip(0))
    (g_w,) = torch.autograd.grad(call(name, t_w, t_l).losses.sum(), t_w, create_graph=True)
    (mixed,) = torch.autograd.grad(g_w.sum(), t_l, allow_unused=True)
    mixed = torch.zeros_like(sweep) if mixed is None else mixed
    return d_w, d_l, mixed, sweep


def test_js_gradients_are_decoupled():
    d_w, d_l, mixed, _ = coupling("js")
    # dL/dT_w is one number however T_l moves, and dL/dT_l one number however T_w moves.
    torch.testing.assert_close(d_w, d_w[:1].expand_as(d_w), rtol=0, atol=1e-15)
    torch.testing.assert_close(d_l, d_l[:1].expand_as(d_l), rtol=0, atol=1e-15)
    assert torch.all(mixed == 0)
    # And they are the theory.md section 3 values at the fixed points.
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    assert d_w[0].item() == pytest.approx(-(sigmoid(-0.7) - 0.5 * sigmoid(0.7)), rel=1e-12)
    assert d_l[0].item() == pytest.approx(0.5 * sigmoid(0.7), rel=1e-12)


def test_decoupling_check_detects_dv_coupling():
    """Control for the test above: the same check fails for DV, whose weight depends on the margin."""
    d_w, d_l, mixed, _ = coupling("dv")
    assert d_w.max() - d_w.min() > 0.5
    assert d_l.max() - d_l.min() > 0.5
    assert mixed.abs().max() > 0.1


EXTREMES = [-1e4, -300.0, -80.0, 0.0, 80.0, 300.0, 1e4]


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_for_extreme_critics(name, dtype):
    grid = torch.tensor(EXTREMES, dtype=dtype)
    t_w, t_l = torch.meshgrid(grid, grid, indexing="ij")
    t_w = t_w.reshape(-1).clone().requires_grad_(True)
    t_l = t_l.reshape(-1).clone().requires_grad_(True)
    objective = build(name)
    for rejected in (t_l, torch.stack([t_l, t_l.flip(0), torch.zeros_like(t_l)], -1)):
        out = compute(
            objective,
            t_w,
            rejected,
            torch.zeros_like(t_w),
            torch.zeros_like(rejected),
            beta=1.0,
            chosen_lengths=torch.ones_like(t_w),
            rejected_lengths=torch.ones_like(rejected),
        )
        assert out.losses.dtype == dtype
        g_w, g_l = torch.autograd.grad(out.losses.sum(), (t_w, t_l), materialize_grads=True)
        for label, value in {
            "losses": out.losses,
            "grad chosen": g_w,
            "grad rejected": g_l,
            "mi_bound": out.mi_bound,
            "chosen_grad_weight": out.chosen_grad_weight,
            "rejected_grad_weight": out.rejected_grad_weight,
        }.items():
            assert torch.isfinite(value).all(), f"{name}: {label} not finite at |T| up to 1e4"


def test_dv_and_js_saturate_correctly_at_extremes():
    """Not just finite: the right limits (a naive log(sigmoid) gives inf or 0 * inf here)."""
    big = torch.tensor([1e4], dtype=torch.float32)
    assert call("dv", big, -big).losses.item() == 0.0
    assert call("dv", -big, big).losses.item() == pytest.approx(2e4)
    assert call("js", big, -big).losses.item() == pytest.approx(0.5e4, rel=1e-6)  # 1/2 softplus(T_w)
    assert call("js", -big, big).losses.item() == pytest.approx(1.5e4, rel=1e-6)


def test_dv_matches_dpo_in_float32_at_extremes():
    """-T_w + logsumexp(T_w, T_l) must not cancel catastrophically: in float32 it equals
    -logsigmoid(T_w - T_l) (the margin is all that matters) and is never negative."""
    grid = torch.tensor(EXTREMES + [1e4 - 3.0, -1e4 + 2.0], dtype=torch.float32)
    t_w, t_l = (x.reshape(-1) for x in torch.meshgrid(grid, grid, indexing="ij"))
    out = call("dv", t_w, t_l)
    assert out.losses.dtype == torch.float32
    torch.testing.assert_close(out.losses, -F.logsigmoid(t_w - t_l), rtol=1e-6, atol=1e-6)
    assert bool((out.losses >= 0).all())
    torch.testing.assert_close(out.mi_bound, math.log(2.0) + F.logsigmoid(t_w - t_l), rtol=1e-6, atol=1e-6)
    # Listwise: -T_w + logsumexp(T_w, T_1, T_2) >= 0 as well.
    listwise = call("dv", t_w, torch.stack([t_l, t_l.flip(0)], -1))
    assert bool((listwise.losses >= 0).all())


@pytest.mark.parametrize("name", ["hinge", "ipo", "robust", "bco"])
def test_baseline_mi_bound_is_dv_estimate(name):
    """Baselines report the DV estimate of their critics as mi_bound, so the column compares across objectives."""
    g = generator(26)
    t_w, t_neg = torch.randn(8, generator=g, dtype=DTYPE) * 3, torch.randn(8, 2, generator=g, dtype=DTYPE) * 3
    torch.testing.assert_close(call(name, t_w, t_neg).mi_bound, call("dv", t_w, t_neg).mi_bound, **TOL)
    big = torch.tensor([1e4], dtype=torch.float32)
    assert call(name, big, -big).mi_bound.item() == pytest.approx(math.log(2.0), abs=1e-6)


@pytest.mark.parametrize("k", [None, 3])
def test_dv_invariant_to_common_shift_js_not(k):
    g = generator(4)
    shape = (32,) if k is None else (32, k)
    t_w, t_l = torch.randn(32, generator=g, dtype=DTYPE) * 3, torch.randn(shape, generator=g, dtype=DTYPE) * 3
    for shift in (-5.0, 0.3, 7.0):
        torch.testing.assert_close(
            call("dv", t_w + shift, t_l + shift).losses, call("dv", t_w, t_l).losses, **TOL
        )
        changed = (call("js", t_w + shift, t_l + shift).losses - call("js", t_w, t_l).losses).abs()
        assert bool((changed > 1e-3).all())


def all_objectives():
    return PAIRED


@pytest.mark.parametrize("name", all_objectives())
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_listwise_k1_equals_pairwise(name, sft_weight):
    pc, pr, rc, rr = random_logps(16, seed=5)
    lengths_c = torch.randint(1, 30, (16,), generator=generator(6)).to(DTYPE)
    lengths_r = torch.randint(1, 30, (16,), generator=generator(7)).to(DTYPE)
    outs, gradients = [], []
    for listwise in (False, True):
        pc_leaf = leaf(pc)
        pr_leaf = leaf(pr.unsqueeze(-1) if listwise else pr)
        out = compute(
            build(name, sft_weight=sft_weight),  # fresh BCO state each time
            pc_leaf,
            pr_leaf,
            rc,
            rr.unsqueeze(-1) if listwise else rr,
            beta=0.2,
            chosen_lengths=lengths_c,
            rejected_lengths=lengths_r.unsqueeze(-1) if listwise else lengths_r,
        )
        outs.append(out)
        g_c, g_r = grads(out.losses.sum(), pc_leaf, pr_leaf)
        gradients.append((g_c, g_r.reshape(-1)))
    pair, lst = outs
    assert lst.losses.shape == pair.losses.shape == (16,)
    for field in ("losses", "mi_bound", "chosen_grad_weight", "rejected_grad_weight", "chosen_rewards"):
        torch.testing.assert_close(getattr(lst, field), getattr(pair, field), **TOL)
    torch.testing.assert_close(lst.rejected_rewards.reshape(-1), pair.rejected_rewards.reshape(-1))
    for got, want in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(got, want, **TOL)


# Rows with 1, 2 and 4 real negatives out of K = 4.
MASK = torch.tensor([[True, False, False, False], [False, True, False, True], [True, True, True, True]])


@pytest.mark.parametrize("name", sorted(set(all_objectives()) - BATCH_COUPLED))
@pytest.mark.parametrize("garbage", [1e6, -1e6, float("nan"), float("inf")])
def test_masked_negatives_do_not_contribute(name, garbage):
    """Value, gradient and diagnostics of a masked batch equal those of each prompt alone with
    only its real negatives, whatever the masked slots hold (policy, reference and lengths)."""
    pc, pr, rc, rr = random_logps(3, seed=8, k=4)
    len_c = torch.tensor([3.0, 7.0, 2.0], dtype=DTYPE)
    len_r = torch.randint(1, 20, (3, 4), generator=generator(9)).to(DTYPE)
    fill = torch.tensor(garbage, dtype=DTYPE)
    pr_dirty = torch.where(MASK, pr, fill)
    rr_dirty = torch.where(MASK, rr, fill)
    len_r_dirty = torch.where(MASK, len_r, fill)

    objective = build(name)
    pc_leaf, pr_leaf = leaf(pc), leaf(pr_dirty)
    out = compute(
        objective,
        pc_leaf,
        pr_leaf,
        rc,
        rr_dirty,
        beta=0.3,
        rejected_mask=MASK,
        chosen_lengths=len_c,
        rejected_lengths=len_r_dirty,
    )
    g_c, g_r = grads(out.losses.sum(), pc_leaf, pr_leaf)
    assert torch.all(g_r[~MASK] == 0), "masked slots received gradient"
    assert torch.isfinite(out.losses).all() and torch.isfinite(g_c).all() and torch.isfinite(g_r).all()

    for b in range(3):
        real = MASK[b]
        pc_b, pr_b = leaf(pc[b : b + 1]), leaf(pr[b : b + 1, real])
        ref_out = compute(
            build(name),
            pc_b,
            pr_b,
            rc[b : b + 1],
            rr[b : b + 1, real],
            beta=0.3,
            chosen_lengths=len_c[b : b + 1],
            rejected_lengths=len_r[b : b + 1, real],
        )
        ref_gc, ref_gr = grads(ref_out.losses.sum(), pc_b, pr_b)
        torch.testing.assert_close(out.losses[b : b + 1], ref_out.losses, **TOL)
        torch.testing.assert_close(g_c[b : b + 1], ref_gc, **TOL)
        torch.testing.assert_close(g_r[b : b + 1, real], ref_gr, **TOL)
        for field in ("mi_bound", "chosen_grad_weight", "rejected_grad_weight", "margins", "accuracies"):
            torch.testing.assert_close(
                getattr(out, field)[b : b + 1], getattr(ref_out, field), **TOL, msg=field
            )
    metrics = out.metrics()
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
    if isinstance(objective.state, BCO):
        # The running offset saw only real rewards.
        real_rewards = torch.cat([0.3 * (pc - rc), 0.3 * (pr - rr)[MASK]])
        assert objective.state.offset == pytest.approx(real_rewards.mean().item(), rel=1e-12)


def test_masked_negatives_listwise_forms():
    """Spot values of the listwise forms of theory.md section 4 with a mask."""
    t_w = torch.tensor([0.5, -1.0], dtype=DTYPE)
    t_neg = torch.tensor([[0.2, 99.0, -0.4], [1.5, -2.0, 99.0]], dtype=DTYPE)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    rows = [torch.tensor([0.5, 0.2, -0.4], dtype=DTYPE), torch.tensor([-1.0, 1.5, -2.0], dtype=DTYPE)]
    dv_expected = torch.stack([torch.logsumexp(r, 0) - r[0] for r in rows])
    js_expected = torch.stack([F.softplus(-r[0]) + F.softplus(r).mean() for r in rows])
    nwj_expected = torch.stack([-r[0] + torch.exp(r - 1).mean() for r in rows])
    torch.testing.assert_close(call("dv", t_w, t_neg, mask=mask).losses, dv_expected)
    torch.testing.assert_close(call("js", t_w, t_neg, mask=mask).losses, js_expected)
    torch.testing.assert_close(call("nwj", t_w, t_neg, mask=mask).losses, nwj_expected)
    # mi_bound for dv: log(K_b + 1) - loss.
    torch.testing.assert_close(call("dv", t_w, t_neg, mask=mask).mi_bound, math.log(3.0) - dv_expected)


def test_mask_validation():
    t_w = torch.zeros(2, dtype=DTYPE)
    t_neg = torch.zeros(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="at least one"):
        call("js", t_w, t_neg, mask=torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="rejected_mask has shape"):
        call("js", t_w, t_neg, mask=torch.ones(2, 2, dtype=torch.bool))


def test_rejected_negatives_forms():
    g = generator(10)
    t_w, t_l = torch.randn(16, generator=g, dtype=DTYPE) * 4, torch.randn(16, generator=g, dtype=DTYPE) * 4
    # js with Q = delta_{y_l}: softplus(-T_w) + softplus(T_l) (TRL's bco_pair without offset).
    torch.testing.assert_close(
        call("js", t_w, t_l, negatives="rejected").losses, F.softplus(-t_w) + F.softplus(t_l), **TOL
    )
    # The same choice makes DV degenerate: T_l - T_w, unbounded (theory.md section 3).
    torch.testing.assert_close(call("dv", t_w, t_l, negatives="rejected").losses, t_l - t_w, **TOL)
    torch.testing.assert_close(
        call("nwj", t_w, t_l, negatives="rejected").losses, -t_w + torch.exp(t_l - 1), **TOL
    )
    # Listwise: mean over the rejected only, the chosen is not among the negatives.
    t_neg = torch.stack([t_l, -t_l], -1)
    torch.testing.assert_close(
        call("js", t_w, t_neg, negatives="rejected").losses,
        F.softplus(-t_w) + 0.5 * (F.softplus(t_l) + F.softplus(-t_l)),
    )
    for name in ("dv", "js", "nwj"):
        with pytest.raises(ValueError, match="negatives"):
            call(name, t_w, t_l, negatives="uniform")


def test_nwj_marginal_form_and_clamp():
    t_w = torch.tensor([0.3, 2.0], dtype=DTYPE)
    t_l = torch.tensor([-1.0, 0.5], dtype=DTYPE)
    expected = -t_w + 0.5 * (torch.exp(t_w - 1) + torch.exp(t_l - 1))
    torch.testing.assert_close(call("nwj", t_w, t_l).losses, expected)
    # Above the clamp the exponential term stops growing: the loss decreases as -T_w with slope -1.
    t_w = leaf([100.0])
    out = call("nwj", t_w, torch.tensor([0.0], dtype=DTYPE))
    (d_w,) = grads(out.losses.sum(), t_w)
    assert d_w.item() == pytest.approx(-1.0)


# --------------------------------------------------------------------------------------------
# Gradient weights (theory.md section 4) and their agreement with autograd
# --------------------------------------------------------------------------------------------


def test_dv_grad_weights_match_theory():
    g = generator(11)
    t_w, t_l = torch.randn(64, generator=g, dtype=DTYPE) * 5, torch.randn(64, generator=g, dtype=DTYPE) * 5
    out = call("dv", t_w, t_l)
    expected = torch.sigmoid(t_l - t_w)
    torch.testing.assert_close(out.chosen_grad_weight, expected, **TOL)
    torch.testing.assert_close(out.rejected_grad_weight, expected, **TOL)


def test_js_grad_weights_match_theory():
    g = generator(12)
    t_w, t_l = torch.randn(64, generator=g, dtype=DTYPE) * 5, torch.randn(64, generator=g, dtype=DTYPE) * 5
    out = call("js", t_w, t_l)
    torch.testing.assert_close(out.chosen_grad_weight, torch.sigmoid(-t_w) - 0.5 * torch.sigmoid(t_w), **TOL)
    torch.testing.assert_close(out.rejected_grad_weight, 0.5 * torch.sigmoid(t_l), **TOL)
    # The chosen term is minimised at T_w = log 2: zero weight there.
    at_log2 = call("js", torch.tensor([math.log(2.0)], dtype=DTYPE), torch.tensor([3.0], dtype=DTYPE))
    assert at_log2.chosen_grad_weight.item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name", all_objectives())
def test_grad_weights_are_loss_derivatives(name):
    """chosen_grad_weight = -dL/dT_w and rejected_grad_weight = sum_k dL/dT_k, on the real graph."""
    g = generator(13)
    t_w = leaf(torch.randn(6, generator=g, dtype=DTYPE) * 2)
    t_neg = leaf(torch.randn(6, 3, generator=g, dtype=DTYPE) * 2)
    mask = torch.rand(6, 3, generator=g) > 0.3
    mask[:, 0] = True
    out = call(name, t_w, t_neg, mask=mask)
    d_w, d_neg = grads(out.losses.sum(), t_w, t_neg)
    torch.testing.assert_close(out.chosen_grad_weight, -d_w, **TOL)
    torch.testing.assert_close(out.rejected_grad_weight, d_neg.sum(-1), **TOL)
    assert not out.chosen_grad_weight.requires_grad and not out.mi_bound.requires_grad


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", all_objectives())
def test_objectives_work_without_autograd(name, context):
    """Evaluation loops call objectives under no_grad / inference_mode: same values and weights."""
    t_w = torch.tensor([0.4, -1.2], dtype=DTYPE)
    t_l = torch.tensor([-0.3, 0.8], dtype=DTYPE)
    expected = call(name, t_w, t_l)
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        out = call(name, t_w.clone(), t_l.clone())
    for field in ("losses", "mi_bound", "chosen_grad_weight", "rejected_grad_weight"):
        torch.testing.assert_close(getattr(out, field), getattr(expected, field).detach(), msg=field)


# --------------------------------------------------------------------------------------------
# Output type
# --------------------------------------------------------------------------------------------


def test_output_margins_accuracies_metrics():
    t_w = torch.tensor([1.0, -1.0], dtype=DTYPE)
    t_neg = torch.tensor([[0.0, 2.0, 50.0], [-3.0, 0.5, -2.0]], dtype=DTYPE)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = call("dv", t_w, t_neg, mask=mask)
    torch.testing.assert_close(out.mean_rejected_rewards, torch.tensor([1.0, -1.5], dtype=DTYPE))
    torch.testing.assert_close(out.margins, torch.tensor([0.0, 0.5], dtype=DTYPE))
    torch.testing.assert_close(out.accuracies, torch.tensor([0.5, 2.0 / 3.0], dtype=DTYPE))
    metrics = out.metrics()
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "mi_bound",
        "grad_weight/chosen",
        "grad_weight/rejected",
    }
    assert metrics["rewards/accuracies"].item() == pytest.approx((0.5 + 2.0 / 3.0) / 2)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.0)
    assert metrics["mi_bound"].item() == pytest.approx(out.mi_bound.mean().item())


# --------------------------------------------------------------------------------------------
# TRL counterparts named in the docstrings
# --------------------------------------------------------------------------------------------

TRL_COUNTERPARTS = {
    dv: "sigmoid",
    js: "nca_pair",
    hinge: "hinge",
    robust: "robust",
    ipo: "ipo",
    BCO: "bco_pair",
}


@pytest.mark.parametrize(
    "objective,loss_type", list(TRL_COUNTERPARTS.items()), ids=list(TRL_COUNTERPARTS.values())
)
def test_docstring_names_trl_counterpart(objective, loss_type):
    doc = objective.__doc__ or ""
    assert f'loss_type="{loss_type}"' in doc, (
        f"{objective.__name__} docstring should name TRL's {loss_type!r}"
    )


def test_docstrings_without_trl_dpo_counterpart_say_so():
    assert "No TRL counterpart" in (nwj.__doc__ or "")
    assert "CPOTrainer" in (simpo.__doc__ or "")


# --------------------------------------------------------------------------------------------
# Registry, SFT term, SimPO, BCO
# --------------------------------------------------------------------------------------------


def test_available_names():
    assert {"mio", "dpo", "dv", "js", "nwj", "ipo", "hinge", "robust", "simpo", "bco"} <= set(available())


def test_unknown_name_error_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build("nope")
    assert isinstance(info.value, UnknownObjectiveError)
    message = str(info.value)
    assert "nope" in message
    for name in available():
        assert name in message


def test_build_bco_returns_fresh_independent_states():
    first, second = build("bco"), build("bco")
    assert isinstance(first.state, BCO) and isinstance(second.state, BCO) and first.state is not second.state
    call("bco", torch.tensor([2.0], dtype=DTYPE), torch.tensor([4.0], dtype=DTYPE), objective=first)
    assert first.state.offset == pytest.approx(3.0)
    assert second.state.offset == 0.0 and second.state.reward_count == 0
    assert build("bco").state.offset == 0.0


@pytest.mark.parametrize("name", ["mio", "dpo", "simpo", "bco", "ipo", "nwj"])
@pytest.mark.parametrize("weight", [0.25, 1.0])
def test_sft_term_adds_weighted_chosen_nll(name, weight):
    pc, pr, rc, rr = random_logps(8, seed=14)
    len_c = torch.randint(1, 40, (8,), generator=generator(15)).to(DTYPE)
    len_r = torch.randint(1, 40, (8,), generator=generator(16)).to(DTYPE)
    results = []
    for w in (0.0, weight):
        pc_leaf = leaf(pc)
        out = compute(
            build(name, sft_weight=w),
            pc_leaf,
            pr,
            rc,
            rr,
            beta=0.1,
            chosen_lengths=len_c,
            rejected_lengths=len_r,
        )
        (g,) = grads(out.losses.sum(), pc_leaf)
        results.append((out, g))
    (base, g_base), (with_sft, g_sft) = results
    torch.testing.assert_close(with_sft.losses - base.losses, weight * (-pc / len_c), **TOL)
    torch.testing.assert_close(g_sft - g_base, -weight / len_c, **TOL)
    for field in ("mi_bound", "rejected_grad_weight", "chosen_rewards"):
        torch.testing.assert_close(getattr(with_sft, field), getattr(base, field), msg=field)
    # -dL/dT_w gains the NLL term's own weight, w / (beta |y_w|): the logged weight is the sum's derivative
    torch.testing.assert_close(
        with_sft.chosen_grad_weight - base.chosen_grad_weight, weight / (0.1 * len_c), **TOL
    )
    assert build(name, sft_weight=weight).reference_free is False  # the NLL term reads no reference
    assert (
        set(with_sft.terms) == {name, "sft"}
        and build(name, sft_weight=weight).name == f"{name}:1,sft:{weight:g}"
    )


def test_sft_weight_zero_and_negative():
    assert build("mio", sft_weight=0.0).loss is js
    with pytest.raises(ValueError, match="sft_weight"):
        build("mio", sft_weight=-1.0)


def test_simpo_ignores_reference_and_normalises_by_length():
    pc, pr, rc, rr = random_logps(8, seed=17)
    len_c = torch.randint(1, 40, (8,), generator=generator(18)).to(DTYPE)
    len_r = torch.randint(1, 40, (8,), generator=generator(19)).to(DTYPE)
    beta, gamma = 2.0, 0.5
    objective = build("simpo")
    assert objective.reference_free and not build("dpo").reference_free
    kwargs = dict(beta=beta, gamma=gamma, chosen_lengths=len_c, rejected_lengths=len_r)
    out = simpo(pc, pr, rc, rr, **kwargs)
    expected = -F.logsigmoid(beta * pc / len_c - beta * pr / len_r - gamma)
    torch.testing.assert_close(out.losses, expected, **TOL)
    torch.testing.assert_close(out.chosen_rewards, beta * pc / len_c)
    # Reference ignored: absent or arbitrary.
    torch.testing.assert_close(simpo(pc, pr, None, None, **kwargs).losses, expected)
    torch.testing.assert_close(simpo(pc, pr, rc * 3 + 1, rr - 5, **kwargs).losses, expected)
    # Length-normalised: scaling log-probs and lengths together changes nothing; lengths alone do.
    scaled = dict(kwargs, chosen_lengths=3 * len_c, rejected_lengths=3 * len_r)
    torch.testing.assert_close(simpo(3 * pc, 3 * pr, None, None, **scaled).losses, expected)
    assert not torch.allclose(simpo(pc, pr, None, None, **scaled).losses, expected)
    # compute() hands the batch lengths over.
    torch.testing.assert_close(
        compute(
            objective, pc, pr, None, None, beta=beta, chosen_lengths=len_c, rejected_lengths=len_r
        ).losses,
        -F.logsigmoid(beta * pc / len_c - beta * pr / len_r - 0.5),
    )


def test_compute_passes_lengths_only_to_objectives_that_take_them():
    pc, pr, rc, rr = random_logps(4, seed=20)
    lengths = torch.full((4,), 7.0, dtype=DTYPE)
    out = compute(dv, pc, pr, rc, rr, beta=0.1, chosen_lengths=lengths, rejected_lengths=lengths)
    torch.testing.assert_close(out.losses, dv(pc, pr, rc, rr, beta=0.1).losses)


def test_reference_objectives_reject_missing_reference_and_bad_beta():
    pc, pr, _, _ = random_logps(2, seed=21)
    with pytest.raises(ValueError, match="reference"):
        dv(pc, pr, None, None, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        js(pc, pr, pc, pr, beta=0.0)


def test_robust_is_dpo_at_zero_smoothing_and_closed_form():
    g = generator(22)
    t_w, t_l = torch.randn(16, generator=g, dtype=DTYPE) * 3, torch.randn(16, generator=g, dtype=DTYPE) * 3
    torch.testing.assert_close(
        call("robust", t_w, t_l, label_smoothing=0.0).losses, call("dv", t_w, t_l).losses
    )
    eps, m = 0.2, t_w - t_l
    expected = (-(1 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)) / (1 - 2 * eps)
    torch.testing.assert_close(call("robust", t_w, t_l, label_smoothing=eps).losses, expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        call("robust", t_w, t_l, label_smoothing=0.5)


def test_ipo_and_hinge_closed_forms():
    pc, pr, rc, rr = random_logps(16, seed=24)
    beta = 0.1
    delta = (pc - rc) - (pr - rr)
    torch.testing.assert_close(ipo(pc, pr, rc, rr, beta=beta).losses, (delta - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(hinge(pc, pr, rc, rr, beta=beta).losses, torch.relu(1 - beta * delta))


def test_bco_offset_is_running_mean_of_rewards():
    g = generator(25)
    objective = build("bco")
    batches = [
        (torch.randn(4, generator=g, dtype=DTYPE) + 1, torch.randn(4, 2, generator=g, dtype=DTYPE) - 1),
        (torch.randn(3, generator=g, dtype=DTYPE) + 2, torch.randn(3, 2, generator=g, dtype=DTYPE)),
    ]
    seen = []
    for t_w, t_neg in batches:
        delta = torch.cat(seen).mean().item() if seen else 0.0
        assert objective.state.offset == pytest.approx(delta, rel=1e-12, abs=1e-15)
        out = call("bco", t_w, t_neg, objective=objective)
        expected = -F.logsigmoid(t_w - delta) - F.logsigmoid(-(t_neg - delta)).mean(-1)
        torch.testing.assert_close(out.losses, expected, **TOL)
        seen += [t_w, t_neg.reshape(-1)]
    assert objective.state.offset == pytest.approx(torch.cat(seen).mean().item(), rel=1e-12)
    assert objective.state.offset != pytest.approx(0.0)
    # The first call (offset 0) is js with negatives="rejected".
    t_w, t_neg = batches[0]
    torch.testing.assert_close(
        call("bco", t_w, t_neg).losses, call("js", t_w, t_neg, negatives="rejected").losses, **TOL
    )
    # The state round-trips: a restored instance continues exactly.
    restored = BCO()
    restored.load_state_dict(objective.state.state_dict())
    assert restored.offset == objective.state.offset
    t_w, t_neg = batches[1]
    torch.testing.assert_close(
        call("bco", t_w, t_neg, objective=restored).losses,
        call("bco", t_w, t_neg, objective=objective).losses,
    )


def test_sft_objective_is_the_sft_loss_and_leaves_rejected_without_gradient():
    chosen = torch.tensor([-10.0, -20.0], requires_grad=True)
    rejected = torch.tensor([[-12.0], [-18.0]], requires_grad=True)
    reference = torch.tensor([-11.0, -19.0]), torch.tensor([[-12.0], [-19.0]])
    lengths = torch.tensor([4, 6])
    output = build("sft")(chosen, rejected, *reference, beta=0.5, chosen_lengths=lengths)
    # Per prompt, the chosen response's mean token NLL: 10 / 4 and 20 / 6.
    assert torch.allclose(output.losses, torch.tensor([10.0 / 4, 20.0 / 6]))
    output.losses.mean().backward()
    assert torch.allclose(chosen.grad, torch.tensor([-1.0 / 8, -1.0 / 12]))
    assert torch.allclose(output.chosen_grad_weight, torch.tensor([1.0 / (0.5 * 4), 1.0 / (0.5 * 6)]))
    assert rejected.grad is None
    metrics = output.metrics()
    assert torch.isclose(metrics["rewards/chosen"], torch.tensor(0.0))  # 0.5 * mean(+1, -1)
    assert torch.isclose(metrics["rewards/accuracies"], torch.tensor(0.5))

"""The discrete toy problem of docs/theory.md section 5, solved with miopt's own objectives.

Six responses; positives ``y ~ P``, rejected responses ``y ~ Q`` (both known). A free critic
vector ``T`` (one value per response) is fitted with Adam. Expectations are exact: the
objective is evaluated on every (positive, negative) combination and the per-prompt losses
(and ``mi_bound``) are weighted by their probabilities, so the fitted quantity *is* the bound
each estimator computes, with no sampling noise:

* ``js`` / ``nwj`` with ``negatives="rejected"``: one pair per (i, j), weight ``p_i q_j``; the
  loss is ``E_P[softplus(-T)] + E_Q[softplus(T)]`` (resp. ``-E_P[T] + E_Q[exp(T-1)]``), so the
  distribution playing ``Q`` is the rejected distribution itself.
* ``js`` with ``negatives="marginal"``: the same pairs; the loss is
  ``E_P[softplus(-T)] + E_M[softplus(T)]`` with ``M = (P + Q) / 2``: with marginal negatives
  the distribution playing ``Q`` is the mixture ``M`` of positives and rejected responses.
* ``dv`` with ``negatives="rejected"``: the DV bound has ``log E_Q[exp T]``, a log of an
  expectation, which per-pair weights cannot express. Each positive ``i`` (weight ``p_i``) gets
  one listwise row of N = 20 negatives in which response ``j`` appears ``20 q_j`` times, so the
  row's ``log mean_k exp T_k`` *is* ``log E_Q[exp T]``; ``Q`` is again the rejected distribution.

The bounds hold for every ``T`` (exact expectations), so every iterate must stay below the target
(up to float64 round-off), and the optimum must be reached: ``T* = log p/q`` (js),
``log p/q + c`` (dv), ``1 + log p/q`` (nwj).
"""

from __future__ import annotations

import math

import pytest
import torch

from miopt.objectives import build, compute

DTYPE = torch.float64
P = torch.tensor([0.30, 0.25, 0.15, 0.10, 0.12, 0.08], dtype=DTYPE)
Q_COUNTS = torch.tensor([1, 2, 3, 5, 4, 5])  # out of 20
Q = Q_COUNTS.to(DTYPE) / Q_COUNTS.sum()
N = P.numel()
# Response j repeated 20 q_j times: a list of 20 negatives whose uniform mean is E_Q.
Q_LIST = torch.tensor([j for j, count in enumerate(Q_COUNTS.tolist()) for _ in range(count)])


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


def jsd(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def pairwise_bound(name: str, negatives: str, critic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected loss and expected mi_bound over all (i ~ P, j ~ Q) pairs, from the objective itself."""
    i, j = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    weights = P[i] * Q[j]
    zeros = torch.zeros(i.numel(), dtype=DTYPE)
    out = compute(build(name), critic[i], critic[j], zeros, zeros, beta=1.0, negatives=negatives)
    return (weights * out.losses).sum(), (weights * out.mi_bound).sum()


def listwise_dv_bound(critic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected dv loss and mi_bound: row i = positive i, negatives = responses repeated 20 q_j times."""
    rejected = critic[Q_LIST].expand(N, -1)  # [N, 20]
    zeros_c, zeros_r = torch.zeros(N, dtype=DTYPE), torch.zeros(N, Q_LIST.numel(), dtype=DTYPE)
    out = compute(build("dv"), critic, rejected, zeros_c, zeros_r, beta=1.0, negatives="rejected")
    return (P * out.losses).sum(), (P * out.mi_bound).sum()


def fit(expected_loss_and_bound, steps: int = 600, lr: float = 0.1) -> tuple[torch.Tensor, list[float]]:
    """Adam on a free critic vector, lr decayed to 0 (cosine); returns T and the bound at every step."""
    critic = (torch.randn(N, generator=torch.Generator().manual_seed(0), dtype=DTYPE) * 2).requires_grad_(
        True
    )
    optimizer = torch.optim.Adam([critic], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    bounds = []
    for _ in range(steps):
        loss, bound = expected_loss_and_bound(critic)
        bounds.append(bound.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    _, bound = expected_loss_and_bound(critic)
    bounds.append(bound.item())
    return critic.detach(), bounds


def assert_approaches_from_below(bounds: list[float], target: float, *, final_tol: float) -> None:
    assert max(bounds) <= target + 1e-10, f"bound {max(bounds)} exceeds the quantity it bounds, {target}"
    assert bounds[-1] == pytest.approx(target, abs=final_tol)
    assert bounds[0] < target - 0.05, "the fit should start visibly below the target"


def test_js_rejected_negatives_recovers_log_density_ratio():
    critic, bounds = fit(lambda t: pairwise_bound("js", "rejected", t))
    torch.testing.assert_close(critic, (P / Q).log(), rtol=0, atol=1e-4)
    assert_approaches_from_below(bounds, 2 * jsd(P, Q) - math.log(4), final_tol=1e-6)


def test_js_marginal_negatives_bounds_jsd_to_the_mixture():
    mixture = (P + Q) / 2
    critic, bounds = fit(lambda t: pairwise_bound("js", "marginal", t))
    torch.testing.assert_close(critic, (P / mixture).log(), rtol=0, atol=1e-4)
    assert_approaches_from_below(bounds, 2 * jsd(P, mixture) - math.log(4), final_tol=1e-6)


def test_dv_recovers_log_density_ratio_up_to_a_constant():
    critic, bounds = fit(listwise_dv_bound)
    target = (P / Q).log()
    torch.testing.assert_close(critic - critic.mean(), target - target.mean(), rtol=0, atol=1e-4)
    assert_approaches_from_below(bounds, kl(P, Q), final_tol=1e-6)


def test_nwj_recovers_shifted_log_density_ratio():
    critic, bounds = fit(lambda t: pairwise_bound("nwj", "rejected", t))
    torch.testing.assert_close(critic, 1 + (P / Q).log(), rtol=0, atol=1e-4)
    assert_approaches_from_below(bounds, kl(P, Q), final_tol=1e-6)


def test_bounds_at_the_analytic_optimum_are_tight():
    """No optimiser: at T* the objectives' mi_bound equals the divergence to round-off."""
    log_ratio = (P / Q).log()
    assert pairwise_bound("js", "rejected", log_ratio)[1].item() == pytest.approx(
        2 * jsd(P, Q) - math.log(4), abs=1e-12
    )
    assert listwise_dv_bound(log_ratio + 3.0)[1].item() == pytest.approx(kl(P, Q), abs=1e-12)
    assert pairwise_bound("nwj", "rejected", 1 + log_ratio)[1].item() == pytest.approx(kl(P, Q), abs=1e-12)
    # And a wrong critic is strictly below.
    assert listwise_dv_bound(-log_ratio)[1].item() < kl(P, Q) - 0.1

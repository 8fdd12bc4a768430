"""miopt's objectives against TRL's own DPOTrainer loss code (the outside oracle of theory.md section 5).

TRL 1.x computes the per-sequence losses inside ``DPOTrainer._compute_loss(model, inputs,
return_outputs)``, after a forward pass. The tests run that method, unmodified, on a trainer
made with ``object.__new__(DPOTrainer)`` and the attributes it reads, with a stand-in "model"
whose forward returns, as ``log_probs``, the summed log-probabilities we choose (one completion
token per row) and reference log-probs passed as precomputed (``precompute_ref_logps``). No
network, no tokenizer, no real model: only TRL's arithmetic on the same log-probabilities.
TRL returns the batch mean, so values are compared per pair (batch of one) and gradients with
respect to the policy log-probs for the whole batch.
"""

from __future__ import annotations

import inspect
import types
from collections import defaultdict

import pytest
import torch

from miopt.objectives import BCO, build, dv, hinge, ipo, js, robust

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer", reason="trl is not installed")
DPOTrainer = dpo_trainer.DPOTrainer

if not hasattr(DPOTrainer, "_compute_loss") or list(
    inspect.signature(DPOTrainer._compute_loss).parameters
) != [
    "self",
    "model",
    "inputs",
    "return_outputs",
]:
    pytest.skip(
        "this TRL version has no DPOTrainer._compute_loss(model, inputs, return_outputs) (the TRL 1.x layout "
        "these tests drive)",
        allow_module_level=True,
    )

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


class SummedLogpsModel(torch.nn.Module):
    """Stands in for the policy: returns the given summed log-probs as the first completion token's log-prob."""

    def __init__(self, logps: torch.Tensor) -> None:
        super().__init__()
        self.logps = logps

    def forward(self, input_ids: torch.Tensor, **_: object) -> types.SimpleNamespace:
        rows, length = input_ids.shape
        per_token = torch.zeros(rows, length - 1, dtype=self.logps.dtype)
        per_token = torch.cat([self.logps.unsqueeze(-1), per_token[:, 1:]], dim=-1)
        return types.SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros_like(per_token).detach(),
            mean_logits=torch.zeros_like(per_token).detach(),
            is_top1=torch.zeros(per_token.shape, dtype=torch.bool),
        )


def trl_loss(
    loss_type,
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    *,
    beta,
    label_smoothing=0.0,
    lengths=None,
):
    """TRL's batch-mean loss of ``loss_type`` (a tensor with the graph to the policy log-probs).

    ``lengths`` [2B] (chosen rows then rejected rows) sets the completion token counts, which
    only the length-normalised losses (``ipo``) read; default one token per completion.
    """
    trainer = object.__new__(DPOTrainer)
    logps = torch.cat([policy_chosen, policy_rejected])
    model = SummedLogpsModel(logps)
    rows = logps.shape[0]
    lengths = torch.ones(rows, dtype=torch.long) if lengths is None else lengths.long()
    width = int(lengths.max()) + 1
    completion_mask = (torch.arange(width).unsqueeze(0) >= 1) & (
        torch.arange(width).unsqueeze(0) <= lengths.unsqueeze(1)
    )
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    attributes = {
        "model": model,
        "accelerator": accelerator,
        "beta": beta,
        "precompute_ref_logps": True,
        "loss_types": [loss_type],
        "loss_weights": [1.0],
        "ld_alpha": None,
        "f_divergence_type": "reverse_kl",
        "label_smoothing": label_smoothing,
        "use_weighting": False,
        "aux_loss_enabled": False,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    for key, value in attributes.items():
        setattr(trainer, key, value)
    inputs = {
        "input_ids": torch.ones(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trainer._compute_loss(model, inputs, False)


def random_logps(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    policy_chosen = -torch.rand(n, generator=g, dtype=DTYPE) * 60
    policy_rejected = -torch.rand(n, generator=g, dtype=DTYPE) * 60
    ref_chosen = policy_chosen + torch.randn(n, generator=g, dtype=DTYPE) * 10
    ref_rejected = policy_rejected + torch.randn(n, generator=g, dtype=DTYPE) * 10
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def assert_same_as_trl(loss_type, objective, *, beta, trl_kwargs=None, miopt_kwargs=None, seed=0, n=12):
    trl_kwargs, miopt_kwargs = trl_kwargs or {}, miopt_kwargs or {}
    pc, pr, rc, rr = random_logps(n, seed)
    # Per pair: TRL's batch mean of one row is that row's per-sequence loss.
    theirs = torch.stack(
        [
            trl_loss(
                loss_type, pc[b : b + 1], pr[b : b + 1], rc[b : b + 1], rr[b : b + 1], beta=beta, **trl_kwargs
            )
            for b in range(n)
        ]
    )
    ours = objective()(pc, pr, rc, rr, beta=beta, **miopt_kwargs).losses
    torch.testing.assert_close(ours, theirs, **TOL)
    # Gradients of the batch means with respect to the policy log-probs.
    grads = []
    for compute_mean in (
        lambda c, r: trl_loss(loss_type, c, r, rc, rr, beta=beta, **trl_kwargs),
        lambda c, r: objective()(c, r, rc, rr, beta=beta, **miopt_kwargs).losses.mean(),
    ):
        c, r = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(compute_mean(c, r), (c, r)))
    for theirs_grad, ours_grad in zip(*grads):
        torch.testing.assert_close(ours_grad, theirs_grad, **TOL)
    assert grads[0][0].abs().max() > 0, "degenerate inputs: no gradient to compare"


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dv_matches_trl_sigmoid(beta):
    assert_same_as_trl("sigmoid", lambda: dv, beta=beta, seed=1)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_js_matches_trl_nca_pair(beta):
    assert_same_as_trl("nca_pair", lambda: js, beta=beta, seed=2)


def test_registry_aliases_match_trl():
    assert_same_as_trl("sigmoid", lambda: build("dpo"), beta=0.1, seed=3)
    assert_same_as_trl("nca_pair", lambda: build("mio"), beta=0.1, seed=4)


def test_hinge_matches_trl_hinge():
    # beta small enough that some pairs sit on each side of the hinge.
    assert_same_as_trl("hinge", lambda: hinge, beta=0.05, seed=5, n=16)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_matches_trl_robust(eps):
    assert_same_as_trl(
        "robust",
        lambda: robust,
        beta=0.1,
        seed=6,
        trl_kwargs={"label_smoothing": eps},
        miopt_kwargs={"label_smoothing": eps},
    )


def test_ipo_matches_trl_ipo_with_unit_lengths():
    """TRL's ipo divides each log-ratio by the completion length; with one-token completions it is miopt's ipo."""
    assert_same_as_trl("ipo", lambda: ipo, beta=0.1, seed=7)


def test_trl_ipo_is_miopt_ipo_on_length_normalised_logps():
    """With real lengths the two differ exactly by that normalisation (documented in ipo's docstring)."""
    pc, pr, rc, rr = random_logps(6, seed=8)
    lengths_c = torch.tensor([3, 1, 7, 12, 2, 5])
    lengths_r = torch.tensor([4, 9, 1, 2, 8, 5])
    for b in range(6):
        theirs = trl_loss(
            "ipo",
            pc[b : b + 1],
            pr[b : b + 1],
            rc[b : b + 1],
            rr[b : b + 1],
            beta=0.1,
            lengths=torch.stack([lengths_c[b], lengths_r[b]]),
        )
        n_c, n_r = float(lengths_c[b]), float(lengths_r[b])
        ours = ipo(
            pc[b : b + 1] / n_c, pr[b : b + 1] / n_r, rc[b : b + 1] / n_c, rr[b : b + 1] / n_r, beta=0.1
        )
        torch.testing.assert_close(ours.losses, theirs.reshape(1), **TOL)
        if lengths_c[b] != 1 or lengths_r[b] != 1:
            assert not torch.allclose(
                ipo(pc[b : b + 1], pr[b : b + 1], rc[b : b + 1], rr[b : b + 1], beta=0.1).losses, theirs
            )


def test_js_rejected_negatives_matches_trl_bco_pair():
    assert_same_as_trl("bco_pair", lambda: js, beta=0.1, seed=9, miopt_kwargs={"negatives": "rejected"})


def test_bco_first_step_matches_trl_bco_pair():
    """miopt's BCO starts with offset 0, which is TRL 1.x's offset-free bco_pair (fresh instance each call)."""
    assert_same_as_trl("bco_pair", BCO, beta=0.1, seed=10)


@pytest.mark.parametrize("loss_type", ["sigmoid", "nca_pair", "hinge", "robust", "ipo", "bco_pair"])
def test_docstring_names_are_trl_loss_types(loss_type):
    """The TRL names quoted in miopt's docstrings are loss types this TRL actually implements."""
    assert f'loss_type == "{loss_type}"' in inspect.getsource(DPOTrainer._compute_loss)


# --------------------------------------------------------------------------------------------
# TRL 1.16's remaining loss types and modifiers (issue 13)
# --------------------------------------------------------------------------------------------


class PerTokenModel(torch.nn.Module):
    """Stands in for the policy with chosen per-token log-probs ``[rows, L-1]`` (and, for WPO, the
    per-token ``log sum_v p_v^2``)."""

    def __init__(self, per_token: torch.Tensor, log_sum_sq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.per_token, self.log_sum_sq = per_token, log_sum_sq

    def forward(self, input_ids: torch.Tensor, **_: object) -> types.SimpleNamespace:
        extra = {} if self.log_sum_sq is None else {"log_sum_sq_probs": self.log_sum_sq}
        return types.SimpleNamespace(
            log_probs=self.per_token,
            entropy=torch.zeros_like(self.per_token).detach(),
            mean_logits=torch.zeros_like(self.per_token).detach(),
            is_top1=torch.zeros(self.per_token.shape, dtype=torch.bool),
            **extra,
        )


def trl_batch_loss(loss_type, per_token, completion_mask, ref_chosen, ref_rejected, *, beta, **attributes):
    """TRL's batch-mean loss from per-token policy log-probs ``[2B, L-1]`` and a completion mask ``[2B, L]``."""
    trainer = object.__new__(DPOTrainer)
    rows, width = completion_mask.shape
    model = PerTokenModel(per_token, attributes.pop("log_sum_sq", None))
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    settings = {
        "model": model,
        "accelerator": accelerator,
        "beta": beta,
        "precompute_ref_logps": True,
        "loss_types": [loss_type] if isinstance(loss_type, str) else list(loss_type),
        "loss_weights": attributes.pop("loss_weights", [1.0]),
        "ld_alpha": None,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "label_smoothing": 0.0,
        "use_weighting": False,
        "aux_loss_enabled": False,
        "args": types.SimpleNamespace(discopop_tau=attributes.pop("discopop_tau", 0.05)),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
        **attributes,
    }
    for key, value in settings.items():
        setattr(trainer, key, value)
    inputs = {
        "input_ids": torch.ones(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trainer._compute_loss(model, inputs, False)


def one_token_rows(policy_chosen, policy_rejected):
    """Per-token log-probs and mask for one-token completions holding the given summed log-probs."""
    logps = torch.cat([policy_chosen, policy_rejected])
    per_token = torch.stack([logps, torch.zeros_like(logps)], dim=-1)
    mask = torch.zeros(logps.shape[0], 3, dtype=torch.long)
    mask[:, 1] = 1
    return per_token, mask


def assert_batch_mean_as_trl(
    loss_type,
    objective,
    *,
    beta,
    trl_attributes=None,
    seed=0,
    n=10,
    batch=None,
    scale=1.0,
    dtype=DTYPE,
    tol=TOL,
):
    """TRL's batch mean (and its gradient w.r.t. the policy log-probs) equals miopt's mean over prompts.
    ``scale`` shrinks the log-ratios (reference = policy + scale * noise)."""
    trl_attributes = trl_attributes or {}
    pc, pr, rc, rr = random_logps(n, seed)
    rc, rr = pc + scale * (rc - pc), pr + scale * (rr - pr)
    pc, pr, rc, rr = (x.to(dtype) for x in (pc, pr, rc, rr))
    values = []
    for which in ("trl", "miopt"):
        c, r = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        if which == "trl":
            per_token, mask = one_token_rows(c, r)
            loss = trl_batch_loss(loss_type, per_token, mask, rc, rr, beta=beta, **dict(trl_attributes))
        else:
            loss = objective(c, r, rc, rr, beta=beta, **(batch or {})).losses.mean()
        values.append((loss.detach(), torch.autograd.grad(loss, (c, r))))
    (theirs, theirs_grad), (ours, ours_grad) = values
    torch.testing.assert_close(ours, theirs, **tol)
    for got, want in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(got, want, **tol)
    assert theirs_grad[0].abs().max() > 0


@pytest.mark.parametrize(
    "loss_type,name,options,trl_attributes",
    [
        ("exo_pair", "exo_pair", {"label_smoothing": 1e-3}, {"label_smoothing": 1e-3}),
        ("exo_pair", "exo_pair", {"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
        ("sppo_hard", "sppo_hard", {}, {}),
        ("apo_zero", "apo_zero", {}, {}),
        ("apo_down", "apo_down", {}, {}),
        ("discopop", "discopop", {}, {}),
        ("discopop", "discopop", {"discopop_tau": 0.5}, {"discopop_tau": 0.5}),
        ("aot", "aot", {}, {}),
        ("aot", "aot", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
        ("aot_unpaired", "aot_unpaired", {}, {}),
        ("aot_unpaired", "aot_unpaired", {"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
        ("sigmoid", "dpo", {}, {}),
        ("nca_pair", "mio", {}, {}),
    ],
)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_new_loss_types_match_trl_batch_mean_and_gradient(loss_type, name, options, trl_attributes, beta):
    from miopt.objectives import build

    # TRL takes exo_pair's log(1 - eps) and log(eps) in float32; miopt in double (docstring).
    tol = {"rtol": 1e-7, "atol": 1e-7} if loss_type == "exo_pair" else TOL
    assert_batch_mean_as_trl(
        loss_type,
        lambda *a, **k: build(name, options)(*a, **k),
        beta=beta,
        trl_attributes=trl_attributes,
        seed=31,
        tol=tol,
    )


def test_trl_loss_type_names_resolve_to_the_same_loss():
    """TRL's names are registry names (sigmoid -> dpo, nca_pair -> mio; the rest are the same word)."""
    from miopt.objectives import available, parse_spec

    source = inspect.getsource(DPOTrainer._compute_loss)
    trl_types = [t for t in ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                             "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")]  # fmt: skip
    for loss_type in trl_types:
        assert f'loss_type == "{loss_type}"' in source
        if loss_type != "bco_pair":  # miopt's bco keeps the running offset; js(negatives=rejected) is TRL's
            assert loss_type in available(), loss_type
            parse_spec(loss_type)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_norm_matches_trl_with_real_lengths(beta):
    """TRL divides each log-ratio by the completion-mask token count; miopt by the response length: the same."""
    from miopt.objectives import build, compute

    n = 6
    g = torch.Generator().manual_seed(40)
    lengths = torch.tensor([3, 1, 7, 4, 2, 5, 6, 2, 1, 8, 3, 4])
    width = int(lengths.max()) + 1
    per_token = -torch.rand(2 * n, width - 1, generator=g, dtype=DTYPE) * 3
    mask = (torch.arange(width).unsqueeze(0) >= 1) & (
        torch.arange(width).unsqueeze(0) <= lengths.unsqueeze(1)
    )
    per_token = per_token * mask[:, 1:]
    rc = -torch.rand(n, generator=g, dtype=DTYPE) * 10
    rr = -torch.rand(n, generator=g, dtype=DTYPE) * 10
    leaf = per_token.clone().requires_grad_(True)
    theirs = trl_batch_loss("sigmoid_norm", leaf, mask, rc, rr, beta=beta)
    (theirs_grad,) = torch.autograd.grad(theirs, leaf)
    leaf2 = per_token.clone().requires_grad_(True)
    summed = (leaf2 * mask[:, 1:]).sum(-1)
    ours = compute(
        build("sigmoid_norm"), summed[:n], summed[n:], rc, rr, beta=beta,
        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
    ).losses.mean()  # fmt: skip
    (ours_grad,) = torch.autograd.grad(ours, leaf2)
    torch.testing.assert_close(ours, theirs, **TOL)
    # TRL's stand-in rows hold zeros outside the completion, which its sum still differentiates: compare inside.
    torch.testing.assert_close(ours_grad, theirs_grad * mask[:, 1:], **TOL)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize(
    "loss_type,name,extra", [("sigmoid", "dpo", {}), ("hinge", "hinge", {}), ("robust", "robust", {"label_smoothing": 0.1}),
                             ("exo_pair", "exo_pair", {"label_smoothing": 0.01}), ("discopop", "discopop", {})],
)  # fmt: skip
def test_f_divergence_variants_match_trl(divergence, loss_type, name, extra):
    from miopt.objectives import build

    options = {"f_divergence_type": divergence, **extra}
    trl_attributes = {"f_divergence_type": divergence, **extra}
    precision = {}
    if divergence == "alpha_divergence":
        options["f_alpha_divergence_coef"] = trl_attributes["f_alpha_divergence_coef"] = 0.3
        # TRL's alpha-divergence clamps by dtype and knows float16/bfloat16/float32 only.
        precision = {"dtype": torch.float32, "tol": {"rtol": 1e-5, "atol": 1e-5}}
    # Log-ratios of a few nats: with large ones TRL's discopop of forward KL scores is exp(huge) * 0 = nan
    # (miopt's is finite: see test_discopop_is_finite_where_trl_is_nan).
    if loss_type == "exo_pair" and not precision:
        precision = {"tol": {"rtol": 1e-7, "atol": 1e-7}}  # TRL's float32 log(eps) constants
    assert_batch_mean_as_trl(
        loss_type,
        lambda *a, **k: build(name, options)(*a, **k),
        beta=0.1,
        trl_attributes=trl_attributes,
        seed=33,
        scale=0.3,
        **precision,
    )


def test_discopop_is_finite_where_trl_is_nan():
    """A documented difference: TRL's exp(-m) * sigmoid(m / tau) is inf * 0 = nan for a very negative margin m;
    miopt computes exp(-m + log sigmoid(m / tau)), which is 0 there."""
    from miopt.objectives import discopop

    pc, pr = torch.tensor([-900.0], dtype=DTYPE), torch.tensor([-1.0], dtype=DTYPE)
    zero = torch.zeros(1, dtype=DTYPE)
    per_token, mask = one_token_rows(pc, pr)
    assert torch.isnan(trl_batch_loss("discopop", per_token, mask, zero, zero, beta=1.0))
    ours = discopop(pc, pr, zero, zero, beta=1.0).losses
    assert torch.isfinite(ours).all() and ours.item() == pytest.approx(899.0)


def test_combination_matches_trl_loss_type_list_with_weights():
    """TRL's loss_type list with loss_weights (MPO) = miopt's NAME:WEIGHT,... spec (one-token completions,
    where TRL's batch-token-mean sft equals miopt's per-prompt mean token NLL)."""
    from miopt.objectives import build

    spec = "dpo:0.8,apo_zero:0.2,mio:1.0"
    assert_batch_mean_as_trl(
        ["sigmoid", "apo_zero", "nca_pair"],
        lambda *a, **k: build(spec)(*a, **k),
        beta=0.3,
        trl_attributes={"loss_weights": [0.8, 0.2, 1.0]},
        seed=34,
    )


def test_rpo_matches_trl_sigmoid_plus_sft_on_one_token_completions():
    from miopt.objectives import build

    assert_batch_mean_as_trl(
        ["sigmoid", "sft"],
        lambda *a, **k: build("rpo")(*a, **k),
        beta=0.2,
        trl_attributes={"loss_weights": [1.0, 1.0]},
        seed=35,
        batch={"chosen_lengths": torch.ones(10)},
    )


def test_wpo_weighting_matches_trl_use_weighting():
    """miopt's WPO wrapper with the per-response mean of log p_t - log sum_v p_v^2 equals TRL's use_weighting."""
    from miopt.objectives import build, compute, wpo_token_terms

    n = 5
    g = torch.Generator().manual_seed(41)
    lengths = torch.tensor([2, 3, 1, 4, 2, 3, 2, 1, 2, 4])
    width = int(lengths.max()) + 1
    mask = (torch.arange(width).unsqueeze(0) >= 1) & (
        torch.arange(width).unsqueeze(0) <= lengths.unsqueeze(1)
    )
    shift_mask = mask[:, 1:]
    per_token = (-torch.rand(2 * n, width - 1, generator=g, dtype=DTYPE) * 2) * shift_mask
    log_sum_sq = -torch.rand(2 * n, width - 1, generator=g, dtype=DTYPE) * 1.5
    rc = -torch.rand(n, generator=g, dtype=DTYPE) * 6
    rr = -torch.rand(n, generator=g, dtype=DTYPE) * 6
    leaf = per_token.clone().requires_grad_(True)
    theirs = trl_batch_loss(
        "sigmoid", leaf, mask, rc, rr, beta=0.5, use_weighting=True, log_sum_sq=log_sum_sq
    )
    (theirs_grad,) = torch.autograd.grad(theirs, leaf)
    leaf2 = per_token.clone().requires_grad_(True)
    summed = (leaf2 * shift_mask).sum(-1)
    terms = wpo_token_terms(leaf2.detach(), log_sum_sq, shift_mask)
    out = compute(
        build("dpo", {"use_weighting": True}), summed[:n], summed[n:], rc, rr, beta=0.5,
        chosen_wpo_logps=terms[:n], rejected_wpo_logps=terms[n:],
    )  # fmt: skip
    (ours_grad,) = torch.autograd.grad(out.losses.mean(), leaf2)
    torch.testing.assert_close(out.losses.mean(), theirs, **TOL)
    torch.testing.assert_close(ours_grad, theirs_grad * shift_mask, **TOL)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_logps_then_dpo_matches_trl_ld_alpha(ld_alpha):
    """LD-DPO: miopt.objectives.ld_logps on policy and reference per-token log-probs, then dpo, equals TRL's
    ld_alpha (TRL computes the reference's the same way from its per-token log-probs; here both are given)."""
    from miopt.objectives import dv, ld_logps

    n = 5
    g = torch.Generator().manual_seed(42)
    lengths = torch.tensor([2, 5, 1, 4, 3, 3, 2, 6, 2, 1])
    width = int(lengths.max()) + 1
    mask = (torch.arange(width).unsqueeze(0) >= 1) & (
        torch.arange(width).unsqueeze(0) <= lengths.unsqueeze(1)
    )
    shift_mask = mask[:, 1:]
    per_token = (-torch.rand(2 * n, width - 1, generator=g, dtype=DTYPE) * 2) * shift_mask
    ref_per_token = (-torch.rand(2 * n, width - 1, generator=g, dtype=DTYPE) * 2) * shift_mask
    shared = torch.minimum(lengths[:n], lengths[n:]).repeat(2)
    ref = ld_logps(ref_per_token, shift_mask, shared, ld_alpha)
    leaf = per_token.clone().requires_grad_(True)
    theirs = trl_batch_loss("sigmoid", leaf, mask, ref[:n], ref[n:], beta=0.5, ld_alpha=ld_alpha)
    (theirs_grad,) = torch.autograd.grad(theirs, leaf)
    leaf2 = per_token.clone().requires_grad_(True)
    policy = ld_logps(leaf2, shift_mask, shared, ld_alpha)
    ours = dv(policy[:n], policy[n:], ref[:n], ref[n:], beta=0.5).losses.mean()
    (ours_grad,) = torch.autograd.grad(ours, leaf2)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours_grad, theirs_grad * shift_mask, **TOL)


# --------------------------------------------------------------------------------------------
# KTO against TRL's KTOTrainer._compute_loss
# --------------------------------------------------------------------------------------------


class TwoBatchModel(torch.nn.Module):
    """Returns the completion log-probs for input ids of 1 and the mismatched (KL) ones for ids of 2."""

    def __init__(self, completion: torch.Tensor, mismatched: torch.Tensor) -> None:
        super().__init__()
        self.completion, self.mismatched = completion, mismatched

    def forward(self, input_ids: torch.Tensor, **_: object) -> types.SimpleNamespace:
        logps = self.completion if int(input_ids[0, 0]) == 1 else self.mismatched
        per_token = torch.stack([logps, torch.zeros_like(logps)], dim=-1)
        return types.SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros_like(per_token).detach(),
            mean_logits=torch.zeros_like(per_token).detach(),
            is_top1=torch.zeros(per_token.shape, dtype=torch.bool),
        )


def trl_kto_loss(
    policy, policy_kl, ref, ref_kl, labels, *, beta, desirable_weight=1.0, undesirable_weight=1.0
):
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    trainer = object.__new__(kto_trainer.KTOTrainer)
    model = TwoBatchModel(policy, policy_kl)
    rows = policy.shape[0]
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    settings = {
        "model": model,
        "accelerator": accelerator,
        "beta": beta,
        "loss_type": "kto",
        "calculate_KL": True,
        "precompute_ref_logps": True,
        "desirable_weight": desirable_weight,
        "undesirable_weight": undesirable_weight,
        "aux_loss_enabled": False,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    for key, value in settings.items():
        setattr(trainer, key, value)
    mask = torch.tensor([[0, 1, 0]] * rows)
    inputs = {
        "label": labels,
        "input_ids": torch.ones(rows, 3, dtype=torch.long),
        "attention_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_mask": mask,
        "KL_input_ids": torch.full((rows, 3), 2, dtype=torch.long),
        "KL_attention_mask": torch.ones(rows, 3, dtype=torch.long),
        "KL_completion_mask": mask,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    return trainer._compute_loss(model, inputs, False), trainer._metrics["train"]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33), (0.7, 1.0)])
@pytest.mark.parametrize("kl_shift", [-3.0, 4.0])  # below 0 the KL estimate is clamped to 0
def test_kto_matches_trl_kto_trainer(weights, kl_shift):
    from miopt.objectives import kto

    n = 8
    g = torch.Generator().manual_seed(50)
    policy = -torch.rand(n, generator=g, dtype=DTYPE) * 30
    ref = policy + torch.randn(n, generator=g, dtype=DTYPE) * 5
    policy_kl = -torch.rand(n, generator=g, dtype=DTYPE) * 30
    ref_kl = policy_kl - kl_shift + torch.randn(n, generator=g, dtype=DTYPE)
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    d, u = weights
    leaf = policy.clone().requires_grad_(True)
    theirs, their_metrics = trl_kto_loss(
        leaf, policy_kl, ref, ref_kl, labels, beta=0.3, desirable_weight=d, undesirable_weight=u
    )
    (theirs_grad,) = torch.autograd.grad(theirs, leaf)
    leaf2 = policy.clone().requires_grad_(True)
    out = kto(
        leaf2, policy_kl, ref, ref_kl, beta=0.3, labels=labels, desirable_weight=d, undesirable_weight=u
    )
    (ours_grad,) = torch.autograd.grad(out.losses.mean(), leaf2)
    torch.testing.assert_close(out.losses.mean(), theirs, **TOL)
    torch.testing.assert_close(ours_grad, theirs_grad, **TOL)
    metrics = out.metrics()
    assert metrics["kl"].item() == pytest.approx(their_metrics["kl"][-1], abs=1e-12)
    assert (metrics["kl"].item() == 0.0) == (kl_shift < 0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key].item() == pytest.approx(their_metrics[key][-1], abs=1e-10), key

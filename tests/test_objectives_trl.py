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

from miopt.objectives import BCO, dv, get, hinge, ipo, js, robust

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
    assert_same_as_trl("sigmoid", lambda: get("dpo"), beta=0.1, seed=3)
    assert_same_as_trl("nca_pair", lambda: get("mio"), beta=0.1, seed=4)


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

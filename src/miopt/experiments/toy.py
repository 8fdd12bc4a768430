"""The discrete toy: a softmax policy over a handful of responses, trained with each objective.

The policy over the responses ``y`` of prompt ``x`` is ``pi(y|x) = softmax_y(phi(x, y) . theta + b(x, y))``:
fixed features ``phi``, fixed base logits ``b`` and one trainable vector ``theta``, started at zero,
so that the reference policy ``pi_ref`` is the initial policy. Every step computes the summed
log-probabilities the LLM trainer would compute and passes them through the same objective code
(:func:`miopt.objectives.compute`), then takes a plain SGD step on ``theta``.

Two experiments (docs/theory.md; Lv et al. 2025, arXiv 2506.22578):

* :func:`run_offline` -- one prompt, one fixed preference pair whose responses share a large common
  feature, the rejected one loading more on it. Only the margin ``T_w - T_l`` enters DPO's loss and
  its gradient is ``-sigmoid(T_l - T_w) (dT_w - dT_l)`` (theory.md section 2): under SGD ``theta``
  moves along ``phi_w - phi_l`` only, which lowers the shared feature, and the chosen log-probability
  falls while the margin grows (the likelihood displacement of Razin et al. 2024, arXiv 2410.08847).
  MIO's chosen and rejected gradients are decoupled (theory.md section 3): once the rejected side
  has fallen, the chosen term ``softplus(-T_w)`` pulls the chosen log-ratio back up towards its
  fixed point ``T_w = log 2``.
* :func:`run_onpolicy` -- positives only from the policy's own samples judged by a 0/1 reward
  (``P`` = ``pi`` restricted to correct responses, i.e. the RLHF optimum's positives, theory.md
  section 2), negatives the sampled incorrect responses. A correct response whose starting
  probability is far below ``1 / (samples x steps)`` is never sampled, so it never becomes a
  positive and its probability cannot rise; supplying it as a positive when no sample is correct
  (``inject=True``) is what makes it learnable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

import miopt.objectives as objectives

DTYPE = torch.float64

DEFAULT_STEPS = 300
DEFAULT_BETA = 0.1
DEFAULT_LR = 3.0
DEFAULT_SAMPLES = 8
DEFAULT_SEED = 0
# |log-prob| or |loss| beyond this counts as divergence (float64 overflows much later, uselessly).
DIVERGENCE_LIMIT = 1e6

# Offline problem: one prompt, six responses; features (shared, chosen's own, rejected's own).
# The pair shares a big common feature and the rejected loads more on it, so the cheapest way to
# widen the margin is to lower the shared feature, which drags the chosen response down with it.
OFFLINE_FEATURES = (
    (2.0, 0.5, 0.0),  # chosen
    (2.5, 0.0, 0.5),  # rejected
    (0.0, 0.0, 0.0),  # four other responses, untouched by theta: where displaced mass goes
    (0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0),
)
OFFLINE_CHOSEN = 0
OFFLINE_REJECTED = 1

# On-policy problem: two prompts, six responses each, response 0 the only correct one.
ONPOLICY_PROMPTS = ("easy", "hard")
ONPOLICY_RESPONSES = 6
ONPOLICY_CORRECT = 0
EASY_START_PROB = 0.1
HARD_START_PROB = 1e-7


@dataclass(frozen=True)
class SoftmaxProblem:
    """A linear-softmax policy family: ``log pi = log_softmax(features @ theta + base_logits)``.

    ``features`` is ``[P, N, D]`` (prompts x responses x features), ``base_logits`` is ``[P, N]``.
    """

    features: Tensor
    base_logits: Tensor

    def initial_theta(self) -> Tensor:
        """``theta = 0``: the start of training, and the reference policy."""
        return torch.zeros(self.features.shape[-1], dtype=DTYPE)

    def log_probs(self, theta: Tensor) -> Tensor:
        """``log pi(y|x)`` for every prompt and response, ``[P, N]``."""
        return torch.log_softmax(self.features @ theta + self.base_logits, dim=-1)


def offline_problem() -> SoftmaxProblem:
    """One prompt, a chosen (index 0) and a rejected (index 1) response with overlapping features."""
    features = torch.tensor(OFFLINE_FEATURES, dtype=DTYPE).unsqueeze(0)
    return SoftmaxProblem(features=features, base_logits=torch.zeros(features.shape[:2], dtype=DTYPE))


def onpolicy_problem() -> SoftmaxProblem:
    """Two prompts with tabular (one-hot, disjoint) features; response 0 is the only correct one.

    Base logits put the correct response at ``EASY_START_PROB`` on the easy prompt and at
    ``HARD_START_PROB`` on the hard one, the incorrect responses sharing the rest equally. The prompts
    share no feature, so nothing learned on one moves the other: the toy isolates the sampling
    mechanism from generalisation.
    """
    n_prompts, n = len(ONPOLICY_PROMPTS), ONPOLICY_RESPONSES
    features = torch.zeros(n_prompts, n, n_prompts * n, dtype=DTYPE)
    for p in range(n_prompts):
        features[p, :, p * n : (p + 1) * n] = torch.eye(n, dtype=DTYPE)
    base = torch.zeros(n_prompts, n, dtype=DTYPE)
    for p, start in enumerate((EASY_START_PROB, HARD_START_PROB)):
        # n - 1 incorrect logits at 0: p = e^l / (e^l + n - 1), so l = log(p (n - 1) / (1 - p)).
        base[p, ONPOLICY_CORRECT] = math.log(start * (n - 1) / (1.0 - start))
    return SoftmaxProblem(features=features, base_logits=base)


@dataclass
class OfflineCurve:
    """One objective's offline run: values at steps ``0..steps`` (index 0 = the start).

    ``margins`` is the log-ratio margin ``(T_w - T_l) / beta`` in nats; ``losses[t]`` is the loss
    evaluated at step ``t`` (its last entry is at the final parameters, no update after it).
    ``diverged_at``: the step at which a value first became non-finite or exceeded ``DIVERGENCE_LIMIT``
    (``None``: never).
    """

    objective: str
    chosen_logps: list[float]
    rejected_logps: list[float]
    margins: list[float]
    losses: list[float]
    diverged_at: int | None = None

    @property
    def chosen_start(self) -> float:
        return self.chosen_logps[0]

    @property
    def chosen_end(self) -> float:
        return self.chosen_logps[-1]

    @property
    def rejected_start(self) -> float:
        return self.rejected_logps[0]

    @property
    def rejected_end(self) -> float:
        return self.rejected_logps[-1]

    def summary(self) -> dict[str, float]:
        return {
            "chosen_logp_start": self.chosen_start,
            "chosen_logp_end": self.chosen_end,
            "chosen_logp_min": min(self.chosen_logps),
            "rejected_logp_start": self.rejected_start,
            "rejected_logp_end": self.rejected_end,
            "margin_end": self.margins[-1],
            "diverged_at": self.diverged_at,
        }


@dataclass
class OnPolicyCurve:
    """One objective's on-policy run, with or without injection; per-prompt values at steps ``0..steps``.

    ``correct_logps[prompt]`` is ``log pi(correct | prompt)``; ``correct_sampled[prompt]`` counts the
    correct samples drawn over the whole run; ``first_sampled[prompt]`` is the first step at which the
    correct response was sampled (``None``: never); ``injections`` counts the steps at which the
    known-correct response was supplied as a positive; ``updates[prompt]`` counts the steps at which
    the prompt contributed to the loss (it needs a positive and a negative); ``diverged_at``: the
    step at which a log-probability or the loss first became non-finite or exceeded ``DIVERGENCE_LIMIT``
    (``None``: never).
    """

    objective: str
    inject: bool
    correct_logps: dict[str, list[float]]
    correct_sampled: dict[str, int]
    first_sampled: dict[str, int | None]
    updates: dict[str, int]
    injections: int = 0
    diverged_at: int | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inject": self.inject,
            "injections": self.injections,
            "diverged_at": self.diverged_at,
        }
        for prompt, logps in self.correct_logps.items():
            out[prompt] = {
                "correct_logp_start": logps[0],
                "correct_logp_end": logps[-1],
                "correct_prob_start": math.exp(logps[0]),
                "correct_prob_end": math.exp(logps[-1]),
                "times_sampled": self.correct_sampled[prompt],
                "first_sampled_step": self.first_sampled[prompt],
                "updates": self.updates[prompt],
            }
        return out


@dataclass
class ToyResults:
    """Both experiments for a list of objectives, with the settings that produced them."""

    settings: dict[str, Any]
    offline: list[OfflineCurve] = field(default_factory=list)
    onpolicy: list[OnPolicyCurve] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, full curves and the start/end numbers of each run."""
        return {
            "settings": self.settings,
            "offline": {
                curve.objective: {"summary": curve.summary(), "curves": asdict(curve)}
                for curve in self.offline
            },
            "onpolicy": [{"summary": curve.summary(), "curves": asdict(curve)} for curve in self.onpolicy],
        }


def _nonfinite(values: Tensor) -> bool:
    """Whether any value is non-finite or beyond ``DIVERGENCE_LIMIT`` (a run that has blown up)."""
    values = values.detach()
    return not bool((torch.isfinite(values) & (values.abs() < DIVERGENCE_LIMIT)).all())


def _sgd_step(theta: Tensor, loss: Tensor, lr: float) -> None:
    """Plain gradient descent, ``theta <- theta - lr * dloss/dtheta``."""
    (grad,) = torch.autograd.grad(loss, theta)
    with torch.no_grad():
        theta -= lr * grad


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread: the tensors hold a few numbers, and extra threads only contend
    (on a loaded 2-core machine two threads made a run ~20x slower). Restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _objective_losses(
    objective: objectives.Objective,
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    mask: Tensor,
    beta: float,
) -> Tensor:
    """Per-row losses ``[B]`` through the registry's :func:`miopt.objectives.compute` (one token per response)."""
    output = objectives.compute(
        objective,
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        rejected_mask=mask,
        chosen_lengths=torch.ones_like(chosen),
        rejected_lengths=torch.ones_like(rejected),
    )
    return output.losses


@_one_thread()
def run_offline(
    objective: str, *, steps: int = DEFAULT_STEPS, beta: float = DEFAULT_BETA, lr: float = DEFAULT_LR
) -> OfflineCurve:
    """Train the offline problem on its one preference pair with ``objective`` for ``steps`` SGD steps.

    Deterministic (no sampling). With the defaults, DPO's chosen log-probability falls throughout
    while the margin grows; MIO's dips, then returns above its start (theory.md sections 2-3).
    If a log-probability or the loss becomes non-finite or exceeds ``DIVERGENCE_LIMIT`` in size (learning
    rate too large for the objective),
    the run stops there and ``diverged_at`` records the step; the curves hold the finite steps before it.
    """
    problem = offline_problem()
    loss_fn = objectives.build(objective)
    theta = problem.initial_theta().requires_grad_(True)
    ref = problem.log_probs(theta.detach())
    ref_chosen, ref_rejected = ref[:, OFFLINE_CHOSEN], ref[:, OFFLINE_REJECTED]
    mask = torch.ones(1, 1, dtype=torch.bool)
    curve = OfflineCurve(objective, [], [], [], [])
    for step in range(steps + 1):
        logps = problem.log_probs(theta)
        chosen, rejected = logps[:, OFFLINE_CHOSEN], logps[:, OFFLINE_REJECTED]
        loss = _objective_losses(
            loss_fn, chosen, rejected.unsqueeze(-1), ref_chosen, ref_rejected.unsqueeze(-1), mask, beta
        ).mean()
        if _nonfinite(torch.cat([logps.flatten(), loss.reshape(1)])):
            curve.diverged_at = step
            break
        curve.chosen_logps.append(float(chosen[0].detach()))
        curve.rejected_logps.append(float(rejected[0].detach()))
        curve.margins.append(float(((chosen - ref_chosen) - (rejected - ref_rejected))[0].detach()))
        curve.losses.append(float(loss.detach()))
        if step == steps:
            break
        _sgd_step(theta, loss, lr)
    return curve


@_one_thread()
def run_onpolicy(
    objective: str,
    *,
    inject: bool,
    steps: int = DEFAULT_STEPS,
    beta: float = DEFAULT_BETA,
    lr: float = DEFAULT_LR,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> OnPolicyCurve:
    """On-policy training: each step draws ``samples`` responses per prompt from the current policy.

    Reward 1 for the correct response, 0 otherwise. Positives are the sampled correct responses
    (one row each), negatives the sampled incorrect ones of the same prompt (``[B, K]`` with a mask);
    a prompt whose samples are all correct or all incorrect contributes nothing, except that with
    ``inject`` a prompt with no correct sample gets the known-correct response as its positive
    (theory.md section 2: without it, ``P`` only ever contains what ``pi`` samples). The loss is the
    sum over prompts of the mean over that prompt's rows, and each prompt draws from its own
    ``torch.Generator`` (seeded from ``seed``); as the prompts share no feature, each prompt's run
    depends on nothing that happens on the other. Reproducible on CPU.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    problem = onpolicy_problem()
    loss_fn = objectives.build(objective)
    names = ONPOLICY_PROMPTS
    generators = [torch.Generator().manual_seed(seed * len(names) + p) for p in range(len(names))]
    theta = problem.initial_theta().requires_grad_(True)
    ref = problem.log_probs(theta.detach())
    curve = OnPolicyCurve(
        objective=objective,
        inject=inject,
        correct_logps={name: [] for name in names},
        correct_sampled=dict.fromkeys(names, 0),
        first_sampled=dict.fromkeys(names),
        updates=dict.fromkeys(names, 0),
    )
    for step in range(steps + 1):
        logps = problem.log_probs(theta)
        if _nonfinite(logps):
            curve.diverged_at = step
            break
        for p, name in enumerate(names):
            curve.correct_logps[name].append(float(logps[p, ONPOLICY_CORRECT].detach()))
        if step == steps:
            break
        rows = _sampled_rows(logps.detach().exp(), generators, samples, inject, curve, step)
        if not rows:
            continue
        loss = _onpolicy_loss(loss_fn, logps, ref, rows, beta)
        if _nonfinite(loss):
            curve.diverged_at = step
            break
        _sgd_step(theta, loss, lr)
    return curve


def _sampled_rows(probs: Tensor, generators, samples: int, inject: bool, curve: OnPolicyCurve, step: int):
    """One step's training rows ``(prompt, positive response, negative responses)`` from ``samples``
    draws per prompt; the curve's sampling counts are updated."""
    rows: list[tuple[int, int, list[int]]] = []
    for p, name in enumerate(ONPOLICY_PROMPTS):
        drawn = torch.multinomial(probs[p], samples, replacement=True, generator=generators[p]).tolist()
        positives = [y for y in drawn if y == ONPOLICY_CORRECT]
        negatives = [y for y in drawn if y != ONPOLICY_CORRECT]
        if positives:
            curve.correct_sampled[name] += len(positives)
            if curve.first_sampled[name] is None:
                curve.first_sampled[name] = step
        elif inject:
            positives = [ONPOLICY_CORRECT]
            curve.injections += 1
        if positives and negatives:
            curve.updates[name] += 1
            rows.extend((p, y, negatives) for y in positives)
    return rows


def _onpolicy_loss(loss_fn, logps: Tensor, ref: Tensor, rows, beta: float) -> Tensor:
    """The sum over prompts of the mean loss over that prompt's rows (negatives padded, masked)."""
    width = max(len(negs) for _, _, negs in rows)
    prompt_idx = torch.tensor([p for p, _, _ in rows])
    chosen_idx = torch.tensor([y for _, y, _ in rows])
    rejected_idx = torch.tensor([negs + [negs[0]] * (width - len(negs)) for _, _, negs in rows])
    mask = torch.tensor([[k < len(negs) for k in range(width)] for _, _, negs in rows])
    rows_per_prompt = torch.bincount(prompt_idx, minlength=len(ONPOLICY_PROMPTS)).to(DTYPE)
    losses = _objective_losses(
        loss_fn,
        logps[prompt_idx, chosen_idx],
        logps[prompt_idx.unsqueeze(-1), rejected_idx],
        ref[prompt_idx, chosen_idx],
        ref[prompt_idx.unsqueeze(-1), rejected_idx],
        mask,
        beta,
    )
    return (losses / rows_per_prompt[prompt_idx]).sum()


def run_all(
    objective_names: Sequence[str],
    *,
    steps: int = DEFAULT_STEPS,
    beta: float = DEFAULT_BETA,
    lr: float = DEFAULT_LR,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> ToyResults:
    """Both experiments for each objective; on-policy both without and with injection."""
    settings = {
        "objectives": list(objective_names),
        "steps": steps,
        "beta": beta,
        "lr": lr,
        "optimizer": "sgd",
        "samples_per_prompt": samples,
        "seed": seed,
        "offline_features": [list(row) for row in OFFLINE_FEATURES],
        "onpolicy_prompts": list(ONPOLICY_PROMPTS),
        "onpolicy_start_probs": {"easy": EASY_START_PROB, "hard": HARD_START_PROB},
    }
    results = ToyResults(settings=settings)
    for name in objective_names:
        results.offline.append(run_offline(name, steps=steps, beta=beta, lr=lr))
    for name in objective_names:
        for inject in (False, True):
            results.onpolicy.append(
                run_onpolicy(name, inject=inject, steps=steps, beta=beta, lr=lr, samples=samples, seed=seed)
            )
    return results

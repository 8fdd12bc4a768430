"""The registry of objectives: names, their declared options, and weighted combinations.

An objective *spec* is a registry name (``mio``) or a weighted sum ``NAME:WEIGHT,NAME:WEIGHT``
(``mio:1.0,sft:0.5``; a name without ``:WEIGHT`` has weight 1), the way TRL's ``loss_type`` list
with ``loss_weights`` combines losses (MPO). ``rpo`` names the combination ``dpo:1.0,sft:1.0``.
Every entry declares its keyword options with their valid values (:mod:`.options`), so
:func:`resolve_options` checks any option of any objective before data or models are loaded.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from miopt.objectives import options as spec
from miopt.objectives.base import ObjectiveOutput
from miopt.objectives.baselines import BCO, hinge, ipo, robust, simpo
from miopt.objectives.decline import cal_dpo, dpop
from miopt.objectives.estimators import dv, js, nwj
from miopt.objectives.kto import kto
from miopt.objectives.modifiers import WPO_INPUTS, with_f_divergence, with_wpo_weighting
from miopt.objectives.objective import Objective, Stateful, batch_inputs_of, combined_state
from miopt.objectives.options import ObjectiveOptionError, OptionSpec
from miopt.objectives.sft import continued_sft
from miopt.objectives.trl_losses import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    discopop,
    exo_pair,
    sigmoid_norm,
    sppo_hard,
)


@dataclass(frozen=True)
class Entry:
    """A registry entry: the objective (or a class whose instance is one), its options, and the TRL
    modifiers it supports (``f_divergence``, ``weighting``)."""

    objective: Callable[..., ObjectiveOutput] | type
    options: Mapping[str, OptionSpec] = field(default_factory=dict)
    modifiers: frozenset[str] = frozenset()
    summary: str = ""
    reference_free: bool = False  # no reference log-probs needed (SimPO)
    unpaired: bool = False  # rows of (prompt, completion, label) (KTO)

    def all_options(self) -> dict[str, OptionSpec]:
        declared = dict(self.options)
        if "f_divergence" in self.modifiers:
            declared.update(spec.F_DIVERGENCE_OPTIONS)
        if "weighting" in self.modifiers:
            declared.update(spec.WEIGHTING_OPTIONS)
        if "ld" in self.modifiers:
            declared.update(spec.LD_OPTIONS)
        return declared


_F, _W, _LD = "f_divergence", "weighting", "ld"
_ALL_MODIFIERS = frozenset({_F, _W, _LD})
_NO_F = frozenset({_W, _LD})

_REGISTRY: dict[str, Entry] = {
    "mio": Entry(js, {"negatives": spec.NEGATIVES}, _NO_F, "the paper's MIO: JS estimator (TRL nca_pair)"),
    "dpo": Entry(dv, {"negatives": spec.NEGATIVES}, _ALL_MODIFIERS, "DPO: DV estimator (TRL sigmoid)"),
    "dv": Entry(dv, {"negatives": spec.NEGATIVES}, _ALL_MODIFIERS, "= dpo"),
    "js": Entry(js, {"negatives": spec.NEGATIVES}, _NO_F, "= mio"),
    "nwj": Entry(nwj, {"negatives": spec.NEGATIVES}, _NO_F, "NWJ estimator (no TRL counterpart)"),
    "ipo": Entry(ipo, {}, _ALL_MODIFIERS, "IPO, summed log-probs (TRL ipo length-normalises)"),
    "hinge": Entry(hinge, {}, _ALL_MODIFIERS, "SLiC hinge (TRL hinge)"),
    "robust": Entry(
        robust, {"label_smoothing": spec.ROBUST_SMOOTHING}, _ALL_MODIFIERS, "robust DPO (TRL robust)"
    ),
    "simpo": Entry(
        simpo,
        {"gamma": spec.SIMPO_GAMMA},
        frozenset(),
        "SimPO, reference-free (TRL CPOTrainer)",
        reference_free=True,
    ),
    "bco": Entry(BCO, {}, _NO_F, "BCO with running offset (TRL bco_pair without it)"),
    "sft": Entry(continued_sft, {}, frozenset(), "continued SFT: chosen NLL per token (TRL sft)"),
    "exo_pair": Entry(
        exo_pair, {"label_smoothing": spec.EXO_SMOOTHING}, _ALL_MODIFIERS, "EXO (TRL exo_pair)"
    ),
    "sppo_hard": Entry(sppo_hard, {}, _NO_F, "SPPO, hard labels (TRL sppo_hard)"),
    "aot": Entry(aot, {"label_smoothing": spec.AOT_SMOOTHING}, frozenset({_LD}), "AOT, paired (TRL aot)"),
    "aot_unpaired": Entry(
        aot_unpaired,
        {"label_smoothing": spec.AOT_SMOOTHING},
        frozenset({_LD}),
        "AOT, unpaired (TRL aot_unpaired)",
    ),
    "apo_zero": Entry(apo_zero, {}, _NO_F, "APO-zero (TRL apo_zero)"),
    "apo_down": Entry(apo_down, {}, _NO_F, "APO-down (TRL apo_down)"),
    "discopop": Entry(
        discopop, {"discopop_tau": spec.DISCOPOP_TAU}, _ALL_MODIFIERS, "DiscoPOP (TRL discopop)"
    ),
    "sigmoid_norm": Entry(sigmoid_norm, {}, _ALL_MODIFIERS, "length-normalised DPO (TRL sigmoid_norm)"),
    "dpop": Entry(dpop, {"dpop_lambda": spec.DPOP_LAMBDA}, _NO_F, "DPO-Positive (Pal et al. 2024)"),
    "cal_dpo": Entry(cal_dpo, {}, _NO_F, "Cal-DPO (Xiao et al. 2024)"),
    "kto": Entry(
        kto,
        {"desirable_weight": spec.KTO_WEIGHT, "undesirable_weight": spec.KTO_WEIGHT},
        frozenset(),
        "KTO on unpaired data (TRL KTOTrainer)",
        unpaired=True,
    ),
}

# Names that stand for a weighted combination of registry entries.
NAMED_COMBINATIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "rpo": (("dpo", 1.0), ("sft", 1.0)),  # RPO: DPO + chosen NLL (Pang et al. 2024, eq. 3)
}

# TRL DPOTrainer loss_type -> the miopt name of the same loss.
TRL_ALIASES = {"sigmoid": "dpo", "nca_pair": "mio"}


class UnknownObjectiveError(ValueError):
    """Raised for a name that is not in the registry; the message lists the valid names."""


def available() -> list[str]:
    """Names accepted by :func:`get` and in specs (registry entries, TRL aliases, named combinations)."""
    return [*_REGISTRY, *TRL_ALIASES, *NAMED_COMBINATIONS]


def entry(name: str) -> Entry:
    name = TRL_ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise UnknownObjectiveError(f"unknown objective {name!r}; valid objectives: {', '.join(available())}")
    return _REGISTRY[name]


def parse_spec(text: str) -> list[tuple[str, float]]:
    """``"mio:1.0,sft:0.5"`` -> ``[("mio", 1.0), ("sft", 0.5)]`` with named combinations expanded.

    Raises :class:`UnknownObjectiveError` for an unknown name and ``ObjectiveOptionError`` for a bad
    weight (not a number, negative, all zero) or a name given twice.
    """
    terms: list[tuple[str, float]] = []
    for part in str(text).split(","):
        name, _, weight_text = part.strip().partition(":")
        name = name.strip()
        if not name:
            raise ObjectiveOptionError(
                f"objective {text!r}: empty term (expected NAME or NAME:WEIGHT, comma-separated)"
            )
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ObjectiveOptionError(
                f"objective {text!r}: weight of {name!r} must be a number, got {weight_text!r}"
            ) from None
        if not weight >= 0 or weight == float("inf"):
            raise ObjectiveOptionError(
                f"objective {text!r}: weight of {name!r} must be >= 0 and finite, got {weight_text}"
            )
        if name in NAMED_COMBINATIONS:
            terms.extend((inner, weight * inner_weight) for inner, inner_weight in NAMED_COMBINATIONS[name])
        else:
            entry(name)
            terms.append((TRL_ALIASES.get(name, name), weight))
    names = [name for name, _ in terms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ObjectiveOptionError(f"objective {text!r}: {', '.join(repeated)} given more than once")
    if not any(weight > 0 for _, weight in terms):
        raise ObjectiveOptionError(f"objective {text!r}: at least one weight must be positive")
    unpaired = [name for name in names if _REGISTRY[name].unpaired]
    if unpaired and len(terms) > 1:
        raise ObjectiveOptionError(
            f"objective {text!r}: {unpaired[0]} trains on unpaired data and cannot be combined with other objectives"
        )
    return terms


def is_unpaired(text: str) -> bool:
    """Whether the spec trains on unpaired (prompt, completion, label) data (``kto``)."""
    return any(_REGISTRY[name].unpaired for name, _ in parse_spec(text))


def options_of(name: str) -> dict[str, OptionSpec]:
    """The options the named objective takes (its own and its TRL modifiers'), with their specs."""
    return entry(name).all_options()


def option_names(name: str) -> list[str]:
    """Names of the keyword options the named objective accepts."""
    return list(options_of(name))


def resolve_options(text: str, given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check ``given`` options against the spec's terms; returns ``{term: {option: value}}``.

    An option goes to every term that declares it; an option no term takes, or a value outside its
    declared range, raises ``ObjectiveOptionError`` naming the option, the valid values and the terms.
    """
    terms = parse_spec(text)
    resolved: dict[str, dict[str, Any]] = {name: {} for name, _ in terms}
    for option, value in given.items():
        takers = [name for name, _ in terms if option in options_of(name)]
        if not takers:
            takes = {name: sorted(options_of(name)) for name, _ in terms}
            described = "; ".join(f"{name} takes {', '.join(opts) or 'none'}" for name, opts in takes.items())
            raise ObjectiveOptionError(f"option {option} does not apply to objective {text!r} ({described})")
        for name in takers:
            resolved[name][option] = options_of(name)[option].coerce(option, value)
    for chosen in resolved.values():
        alpha = chosen.get("f_alpha_divergence_coef", 0.5)
        if alpha != 0.5 and chosen.get("f_divergence_type") != "alpha_divergence":
            raise ObjectiveOptionError("f_alpha_divergence_coef needs f_divergence_type=alpha_divergence")
    return resolved


def _instantiate(name: str, options: Mapping[str, Any]) -> Objective:
    """The objective ``name`` with its keyword options bound and its modifiers applied."""
    registered = entry(name)
    target = registered.objective
    loss = target() if inspect.isclass(target) else target  # a class: a fresh state per run (BCO)
    state = loss if isinstance(loss, Stateful) else None
    inputs = batch_inputs_of(loss)
    options = dict(options)
    f_type = options.pop("f_divergence_type", "reverse_kl")
    f_alpha = options.pop("f_alpha_divergence_coef", 0.5)
    weighting = options.pop("use_weighting", False)
    options.pop("ld_alpha", None)  # a log-prob transform: applied by the step function, not the loss
    if options:
        loss = functools.partial(loss, **options)
    loss = with_f_divergence(loss, f_type, f_alpha)
    if weighting:
        loss = with_wpo_weighting(loss)
        inputs |= WPO_INPUTS
    return Objective(
        name,
        loss,
        inputs,
        reference_free=registered.reference_free,
        unpaired=registered.unpaired,
        state=state,
    )


class Combination:
    """A weighted sum of objectives: ``losses = sum_i w_i losses_i`` (TRL's ``loss_type`` list with
    ``loss_weights``). Diagnostics are the first term's, except the gradient weights, which are the
    weighted sums (the derivative of the sum); each term's losses are kept in ``terms`` so the step
    logs them as ``loss/<name>``."""

    def __init__(self, terms: list[tuple[str, float, Objective]]) -> None:
        self.terms = terms

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None,
        *,
        beta: float,
        **batch: Any,
    ) -> ObjectiveOutput:
        outputs = [
            objective(
                policy_chosen_logps,
                policy_rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                beta=beta,
                **batch,
            )
            for _, _, objective in self.terms
        ]
        weights = [weight for _, weight, _ in self.terms]
        first = outputs[0]
        return ObjectiveOutput(
            losses=sum(w * out.losses for w, out in zip(weights, outputs)),
            chosen_rewards=first.chosen_rewards,
            rejected_rewards=first.rejected_rewards,
            rejected_mask=first.rejected_mask,
            mi_bound=first.mi_bound,
            chosen_grad_weight=sum(w * out.chosen_grad_weight for w, out in zip(weights, outputs)),
            rejected_grad_weight=sum(w * out.rejected_grad_weight for w, out in zip(weights, outputs)),
            terms={name: out.losses.detach() for (name, _, _), out in zip(self.terms, outputs)},
        )


def _with_sft_term(terms: list[tuple[str, float]], sft_weight: float) -> list[tuple[str, float]]:
    """``--sft-weight w``: the chosen-answer NLL as the term ``sft:w`` (added to an ``sft`` term already
    there), the one way every objective gains it (RPO, Pang et al. 2024, eq. 3)."""
    if sft_weight < 0:
        raise ObjectiveOptionError(f"sft_weight must be >= 0, got {sft_weight}")
    if sft_weight == 0:
        return terms
    if any(name == "sft" for name, _ in terms):
        return [(name, weight + sft_weight if name == "sft" else weight) for name, weight in terms]
    if any(_REGISTRY[name].unpaired for name, _ in terms):
        raise ObjectiveOptionError("sft_weight does not apply to an objective on unpaired data (kto)")
    return [*terms, ("sft", sft_weight)]


def build(text: str, options: Mapping[str, Any] | None = None, sft_weight: float = 0.0) -> Objective:
    """The objective of spec ``text`` with ``options`` (checked by :func:`resolve_options`) bound; with
    ``sft_weight``, plus the term ``sft:sft_weight`` (the chosen response's mean token NLL). A spec of
    several terms (``mio:1,sft:0.5``, ``rpo``) is a :class:`Combination`."""
    resolved = resolve_options(text, options or {})
    terms = _with_sft_term(parse_spec(text), sft_weight)
    if len(terms) == 1 and terms[0][1] == 1.0:
        return _instantiate(terms[0][0], resolved[terms[0][0]])
    built = [(name, weight, _instantiate(name, resolved.get(name, {}))) for name, weight in terms]
    return Objective(
        ",".join(f"{name}:{weight:g}" for name, weight, _ in built),
        Combination(built),
        frozenset().union(*(objective.inputs for _, _, objective in built)),
        reference_free=all(objective.reference_free for _, _, objective in built),
        state=combined_state((name, objective) for name, _, objective in built),
    )


def get(name: str, sft_weight: float = 0.0) -> Objective:
    """Deprecated: :func:`build` (the one lookup), kept for code written before it."""
    warnings.warn(
        "miopt.objectives.get is deprecated; use miopt.objectives.build", DeprecationWarning, stacklevel=2
    )
    return build(name, sft_weight=sft_weight)

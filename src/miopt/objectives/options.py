"""Declared options of the objectives: each registry entry lists the keywords it takes, with
their type and valid values, so that every option is checked before any data or model is loaded
(``miopt.objectives.resolve_options``) without per-objective code in the commands."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class ObjectiveOptionError(ValueError):
    """A bad objective option: unknown, not taken by the objective, or outside its valid values."""


@dataclass(frozen=True)
class OptionSpec:
    """One keyword option: its type, valid values (``choices`` or the interval ``low..high``) and help."""

    kind: type
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False

    def describe(self) -> str:
        """The accepted values in words, e.g. ``one of marginal, rejected`` or ``in (0, 1)``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        if self.low is None and self.high is None:
            return f"any {self.kind.__name__}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"a number in {left}{low}, {high}{right}"

    def coerce(self, name: str, value: Any) -> Any:
        """``value`` as this option's type (strings from the command line are parsed), or an error."""
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    lowered = value.lower()
                    if lowered not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = lowered in ("true", "1", "yes")
                elif not isinstance(value, bool):
                    raise ValueError(value)
            elif self.kind is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                value = float(value)
            elif self.kind is str:
                if not isinstance(value, str):
                    raise ValueError(value)
        except (TypeError, ValueError):
            raise ObjectiveOptionError(f"{name} must be {self.describe()}, got {value!r}") from None
        self.check(name, value)
        return value

    def check(self, name: str, value: Any) -> None:
        bad = False
        if self.choices is not None:
            bad = value not in self.choices
        elif self.kind is float:
            bad = not math.isfinite(value)
            bad |= self.low is not None and (value < self.low or (self.low_open and value == self.low))
            bad |= self.high is not None and (value > self.high or (self.high_open and value == self.high))
        if bad:
            raise ObjectiveOptionError(f"{name} must be {self.describe()}, got {value!r}")


NEGATIVES = OptionSpec(
    str,
    "negative distribution: 'marginal' (chosen and rejected, the paper's) or 'rejected'",
    choices=("marginal", "rejected"),
)
ROBUST_SMOOTHING = OptionSpec(
    float, "label-noise rate eps (Chowdhury et al. 2024)", low=0.0, high=0.5, high_open=True
)
AOT_SMOOTHING = OptionSpec(
    float,
    "label smoothing of the AOT logistic loss, as TRL's label_smoothing",
    low=0.0,
    high=0.5,
    high_open=True,
)
EXO_SMOOTHING = OptionSpec(
    float,
    "eps of the target distribution [1 - eps, eps] (EXO, Ji et al. 2024); TRL's label_smoothing",
    low=0.0,
    high=1.0,
    low_open=True,
    high_open=True,
)
SIMPO_GAMMA = OptionSpec(float, "SimPO target reward margin gamma (Meng et al. 2024)")
DISCOPOP_TAU = OptionSpec(
    float, "DiscoPOP temperature tau of the mixing sigmoid (TRL's discopop_tau)", low=0.0, low_open=True
)
DPOP_LAMBDA = OptionSpec(float, "DPO-Positive penalty weight lambda (Pal et al. 2024)", low=0.0)
KTO_WEIGHT = OptionSpec(
    float, "weight of this side's KTO losses (Ethayarajh et al. 2024)", low=0.0, low_open=True
)

# TRL's modifiers (``DPOConfig`` fields of the same names).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_TYPE = OptionSpec(
    str,
    "f-divergence of the reward (Wang et al. 2023, 'Beyond Reverse KL'); TRL's f_divergence_type",
    choices=F_DIVERGENCES,
)
F_ALPHA = OptionSpec(
    float,
    "alpha of f_divergence_type=alpha_divergence (TRL's f_alpha_divergence_coef)",
    low=0.0,
    low_open=True,
)
USE_WEIGHTING = OptionSpec(bool, "WPO weights (Zhou et al. 2024, eq. 2); TRL's use_weighting")
LD_ALPHA = OptionSpec(
    float,
    "LD-DPO weight of the tokens beyond the shared length (Liu et al. 2024); TRL's ld_alpha",
    low=0.0,
    high=1.0,
)

# The modifiers and their options; a registry entry that supports them takes these keywords.
F_DIVERGENCE_OPTIONS = {"f_divergence_type": F_DIVERGENCE_TYPE, "f_alpha_divergence_coef": F_ALPHA}
WEIGHTING_OPTIONS = {"use_weighting": USE_WEIGHTING}
LD_OPTIONS = {"ld_alpha": LD_ALPHA}

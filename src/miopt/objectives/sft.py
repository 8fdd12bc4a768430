"""The optional supervised (NLL) term on the chosen response, addable to any objective."""

from __future__ import annotations

from torch import Tensor

from miopt.objectives.base import Objective, ObjectiveOutput, accepts


def with_sft_term(objective: Objective, weight: float) -> Objective:
    """Wrap ``objective`` so its losses gain ``weight * (-log pi(y_w|x) / |y_w|)``.

    The chosen response's mean token NLL, as in RPO (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", eq. 3; TRL's ``rpo_alpha``). The wrapped objective needs
    ``chosen_lengths``; diagnostics are those of ``objective``.
    """
    if weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {weight}")
    passes_lengths = accepts(objective, "chosen_lengths")

    def wrapped(policy_chosen_logps: Tensor, *args, chosen_lengths: Tensor, **kwargs) -> ObjectiveOutput:
        if passes_lengths:
            kwargs["chosen_lengths"] = chosen_lengths
        output = objective(policy_chosen_logps, *args, **kwargs)
        nll = -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
        output.losses = output.losses + weight * nll
        return output

    wrapped.__name__ = f"{getattr(objective, '__name__', type(objective).__name__)}+sft"
    wrapped.__doc__ = f"{objective.__doc__}\n\nPlus {weight} x chosen NLL (with_sft_term)."
    wrapped.reference_free = getattr(objective, "reference_free", False)  # type: ignore[attr-defined]
    wrapped.inner = objective  # type: ignore[attr-defined]
    return wrapped

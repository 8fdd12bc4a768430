"""What the training step holds: an :class:`Objective`, which says what it needs and computes.

A *loss function* (``LossFunction``, every function of :mod:`miopt.objectives`) maps the summed
log-probs of a batch to an :class:`~miopt.objectives.base.ObjectiveOutput`. An :class:`Objective` is
one with its options bound and its modifiers applied (the registry's :func:`~miopt.objectives.build`
makes them), plus what a caller must know before the first batch: which batch inputs it reads,
whether it needs reference log-probs, whether its rows are unpaired, and the state it keeps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from miopt.objectives.base import ObjectiveOutput

# Every loss function: (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
# *, beta, **options) -> ObjectiveOutput.
LossFunction = Callable[..., ObjectiveOutput]

# Inputs the training step takes from the batch (never set by users); an objective gets those it reads.
BATCH_INPUTS = frozenset(
    {
        "rejected_mask",
        "chosen_lengths",
        "rejected_lengths",
        "labels",
        "chosen_wpo_logps",
        "rejected_wpo_logps",
    }
)


@runtime_checkable
class Stateful(Protocol):
    """State an objective carries across steps (BCO's running offset), saved in every checkpoint."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def batch_inputs_of(loss: LossFunction) -> frozenset[str]:
    """The batch inputs (:data:`BATCH_INPUTS`) that ``loss`` takes as keywords."""
    return frozenset(inspect.signature(loss).parameters) & BATCH_INPUTS


@dataclass(frozen=True)
class Objective:
    """A preference objective ready for the training step.

    ``loss``: the loss function with options bound; ``inputs``: the batch inputs it reads (the others
    are not passed); ``reference_free``: it ignores reference log-probs (SimPO), so no reference pass
    is made; ``unpaired``: its rows are (prompt, completion, label) (KTO); ``state``: what it keeps
    across steps (BCO), saved and restored with the checkpoints.
    """

    name: str
    loss: LossFunction
    inputs: frozenset[str] = frozenset({"rejected_mask"})
    reference_free: bool = False
    unpaired: bool = False
    state: Stateful | None = None

    @classmethod
    def of(cls, loss: LossFunction, name: str | None = None, **needs: Any) -> Objective:
        """A bare loss function as an objective (its batch inputs read from its signature)."""
        name = name or getattr(loss, "__name__", type(loss).__name__)
        state = loss if isinstance(loss, Stateful) else None
        return cls(name, loss, batch_inputs_of(loss), state=state, **needs)

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
        """The loss of a batch; batch inputs the objective does not read (or that are None) are dropped,
        any other keyword goes to the loss function."""
        passed = {
            key: value
            for key, value in batch.items()
            if key not in BATCH_INPUTS or (key in self.inputs and value is not None)
        }
        return self.loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=beta,
            **passed,
        )


class CombinedState:
    """The states of a combination's stateful terms, saved as ``{term name: state}``."""

    def __init__(self, states: dict[str, Stateful]) -> None:
        self.states = states

    def state_dict(self) -> dict[str, Any]:
        return {name: state.state_dict() for name, state in self.states.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, inner in self.states.items():
            inner.load_state_dict(state[name])


def combined_state(terms: Iterable[tuple[str, Objective]]) -> CombinedState | None:
    states = {name: objective.state for name, objective in terms if objective.state is not None}
    return CombinedState(states) if states else None

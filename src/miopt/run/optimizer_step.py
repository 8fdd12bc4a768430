"""One optimizer step of the training loop: accumulate the micro-batches' gradients, stop on a
non-finite loss, gradient norm or weight (before it reaches the weights), clip, step the optimizer and
schedule, and the logged row of a window of steps. :mod:`miopt.run.loop` runs these steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from miopt.errors import MioptError
from miopt.run.checkpoint import latest_checkpoint
from miopt.run.data_order import DataOrder

# (model, example indices of this process's micro-batch) -> (loss, {metric name: scalar tensor})
StepFunction = Callable[[Any, Sequence[int]], tuple[Tensor, dict[str, Tensor]]]


class NonFiniteError(MioptError):
    """A loss, gradient norm or weight became NaN or infinite: the run stops before it is used."""


def newest_checkpoint_note(options) -> str:
    newest = latest_checkpoint(options.output_dir)
    if newest is None:
        return "no checkpoint was written"
    return f"the newest checkpoint, {newest}, holds the last finite weights"


def weights_finite(model, accelerator) -> bool:
    """Whether every parameter is finite (on every process); one host synchronisation."""
    device = accelerator.device
    flags = [
        torch.isfinite(p.detach()).all().to(device)
        for p in model.parameters()
        if p.numel() and p.is_floating_point()
    ]
    bad = (~torch.stack(flags).all()).float() if flags else torch.zeros((), device=device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return not bool(bad)


class Optimisation:
    """One run's prepared pieces and its optimizer steps: accumulate micro-batches, guard against
    non-finite values, clip, step."""

    def __init__(self, options, accelerator, model, optimizer, scheduler, order: DataOrder):
        from accelerate.utils import DistributedType

        self.options, self.accelerator, self.order = options, accelerator, order
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.world, self.accumulation = accelerator.num_processes, options.gradient_accumulation_steps

    def _step_weight(self, step: int, example_weights: Sequence[float] | None) -> float | None:
        if example_weights is None:
            return None
        micro = range((step - 1) * self.accumulation, step * self.accumulation)
        return sum(example_weights[i] for m in micro for i in self.order.global_micro_batch(m))

    def accumulate(
        self, step: int, batches: Iterator[list[int]], step_fn: StepFunction, example_weights
    ) -> tuple[list[dict[str, Tensor]], int]:
        """Forward and backward over the step's micro-batches; (metrics per micro-batch, examples)."""
        accelerator, rows, examples = self.accelerator, [], 0
        step_weight = self._step_weight(step, example_weights)
        for micro in range(self.accumulation):
            indices = next(batches)
            sync = micro == self.accumulation - 1
            if self.deepspeed:
                # The engine accumulates (dividing by its own count) and steps when told it is the last.
                accelerator.gradient_state._set_sync_gradients(sync)
            with nullcontext() if sync or self.deepspeed else accelerator.no_sync(self.model):
                with accelerator.autocast():
                    loss, metrics = step_fn(self.model, indices)
                if step_weight is not None:
                    # DDP averages processes and we divide by the micro-steps: undo both, then weigh.
                    share = sum(example_weights[i] for i in indices) / max(step_weight, 1e-12)
                    loss = loss * (share * self.world * self.accumulation)
                if self.deepspeed:  # the engine steps inside backward: check before it
                    self.guard(step, loss.detach().reshape(1), None)
                accelerator.backward(loss if self.deepspeed else loss / self.accumulation)
            rows.append({"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}})
            examples += len(indices) * self.world
        return rows, examples

    def guard(self, step: int, losses: Tensor, grad_norm: Tensor | None) -> None:
        """Stop the run (NonFiniteError) when a loss or the gradient norm is NaN or infinite, on any
        process, before the optimizer step could write it into the weights."""
        bad = ~torch.isfinite(losses.float()).all()
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.float())
        bad = bad.float()
        if self.world > 1:
            bad = self.accelerator.reduce(bad.to(self.accelerator.device), "sum")
        if not bool(bad):
            return
        norm = "" if grad_norm is None else f", gradient norm {float(grad_norm):.4g}"
        raise NonFiniteError(
            f"step {step}: non-finite loss or gradient (loss {[round(float(x), 4) for x in losses]}{norm}); "
            f"stopped before the optimizer step, no final model saved; {newest_checkpoint_note(self.options)}; "
            "a smaller --learning-rate or --beta, or clipping (--max-grad-norm), usually avoids it"
        )

    def step(self, step: int, rows: list[dict[str, Tensor]]) -> None:
        """Clip (or just measure) the gradient norm, guard, then the optimizer and schedule steps."""
        limit = self.options.max_grad_norm if self.options.max_grad_norm > 0 else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), limit)
        if grad_norm is not None and not torch.is_tensor(grad_norm):
            grad_norm = torch.tensor(float(grad_norm))
        if not self.deepspeed:
            self.guard(step, torch.stack([row["loss"].float().reshape(()) for row in rows]), grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if grad_norm is not None:
            for row in rows:
                row["grad_norm"] = grad_norm.detach()

    def record(self, step: int, window: list[dict[str, Tensor]], examples: int, seconds: float) -> dict:
        """The logged row of a window of steps: metrics averaged over it and across processes.
        The loop's only host synchronisation besides the guard."""
        stacked = {key: torch.stack([row[key].float() for row in window]).mean() for key in window[0]}
        reduced = {
            key: self.accelerator.reduce(value.to(self.accelerator.device), "mean")
            for key, value in stacked.items()
        }
        record = {"step": step, **{key: float(value) for key, value in sorted(reduced.items())}}
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["pairs_per_second"] = examples / max(seconds, 1e-9)
        record["epoch"] = step * self.accumulation / self.order.per_epoch
        return record

"""The training loop shared by ``miopt train`` and ``miopt sft``, on Accelerate.

The loop knows nothing of objectives: it asks a step function for a loss and a dict of
scalar metrics on a list of example indices, and owns everything around it: data order,
gradient accumulation, clipping, AdamW with warmup and a linear or cosine schedule, mixed
precision, the non-finite guard, and (through :mod:`miopt.run.checkpoint` and
:mod:`miopt.run.metrics_sink`) atomic checkpoints, exact resume and ``metrics.jsonl``. A SIGTERM or
SIGINT stops it after the optimizer step under way, with a checkpoint (:mod:`miopt.run.preemption`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from miopt.config import check_finite_floats, option
from miopt.errors import MioptError, OptionError, require
from miopt.run.atomic_io import check_free_space
from miopt.run.checkpoint import (
    CHECKPOINT_PREFIX,
    checkpoint_bytes,
    checkpoint_dir,
    checkpoint_space,
    kept_note,
    read_state,
    remove_stale_temporaries,
    resume_checkpoint,
    save_checkpoint,
)
from miopt.run.data_order import DataOrder
from miopt.run.engine import (
    fused_adamw,
    make_accelerator,
)
from miopt.run.metrics_sink import MetricsSink
from miopt.run.optimizer_step import (
    NonFiniteError,
    Optimisation,
    StepFunction,
    newest_checkpoint_note,
    weights_finite,
)
from miopt.run.preemption import Preempted, StopSignals
from miopt.run.run_folder import check_output_dir
from miopt.run.trackers import check_trackers

SEED_LIMIT = 2**32 - 1


@dataclass
class LoopOptions:
    """Options of the optimisation loop (shared by ``train`` and ``sft``)."""

    output_dir: str = option(
        "runs/miopt",
        "Folder for metrics.jsonl, checkpoints, the final model and summary (one run per folder).",
    )
    overwrite: bool = option(False, "Remove another run's files from --output-dir before starting.")
    max_steps: int = option(-1, "Optimizer steps to run (>= 1); -1 derives them from --epochs.")
    epochs: float = option(1.0, "Passes over the data (used when --max-steps is -1).")
    batch_size: int = option(8, "Prompts per device per micro-step.")
    gradient_accumulation_steps: int = option(1, "Micro-steps accumulated per optimizer step.")
    learning_rate: float = option(1e-6, "Peak AdamW learning rate.")
    lr_scheduler: str = option("linear", "Decay after warmup.", choices=["linear", "cosine", "constant"])
    warmup_ratio: float = option(0.1, "Fraction of the steps spent in linear warmup.")
    min_lr_ratio: float = option(
        0.0, "With --lr-scheduler cosine: the fraction of the peak learning rate the decay ends at (0: zero)."
    )
    weight_decay: float = option(0.0, "AdamW weight decay (>= 0).")
    adam_beta1: float = option(0.9, "AdamW beta1, in [0, 1).")
    adam_beta2: float = option(0.999, "AdamW beta2, in [0, 1).")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm (0 disables).")
    seed: int = option(42, "Seed of data order, initialisation and sampling.")
    bf16: bool = option(
        False, "bf16 mixed precision (autocast); fast on GPUs and on CPUs with AMX/AVX512-BF16."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    logging_steps: int = option(10, "Append a line to metrics.jsonl every N optimizer steps.")
    save_steps: int = option(0, "Write a checkpoint every N optimizer steps (0: none but the final model).")
    save_total_limit: int = option(2, "Checkpoints kept (oldest removed first; 0 keeps all).")
    resume: str | None = option(
        None,
        "Resume from a checkpoint folder, or 'latest' (the newest intact one in --output-dir; none yet: "
        "start from scratch); bare --resume = latest.",
        nargs="?",
        const="latest",
    )
    report_to: list[str] = option(
        ["none"], "Also log metrics to trackers: tensorboard, wandb, trackio (several at once) or none."
    )
    progress: bool = option(True, "Show a progress bar with ETA.")


@dataclass
class LoopResult:
    history: list[dict[str, float]]
    steps: int
    seconds: float
    resumed_from: int


def check_loop_options(options: LoopOptions) -> None:
    """Fail fast on values no run can use (before anything is loaded or written)."""
    check_finite_floats(options)
    o = options
    require(o.batch_size >= 1, "--batch-size", ">= 1", o.batch_size)
    require(
        o.gradient_accumulation_steps >= 1,
        "--gradient-accumulation-steps",
        ">= 1",
        o.gradient_accumulation_steps,
    )
    require(o.max_steps == -1 or o.max_steps >= 1, "--max-steps", "-1 (use --epochs) or >= 1", o.max_steps)
    if o.max_steps == -1:
        require(o.epochs > 0, "--epochs", "> 0 (or set --max-steps)", o.epochs)
    require(o.learning_rate > 0, "--learning-rate", "> 0", o.learning_rate)
    require(0 <= o.min_lr_ratio < 1, "--min-lr-ratio", "in [0, 1)", o.min_lr_ratio)
    if o.min_lr_ratio > 0 and o.lr_scheduler != "cosine":
        raise OptionError(f"--min-lr-ratio applies to --lr-scheduler cosine, not {o.lr_scheduler}")
    require(0 <= o.warmup_ratio < 1, "--warmup-ratio", "in [0, 1)", o.warmup_ratio)
    require(o.weight_decay >= 0, "--weight-decay", ">= 0", o.weight_decay)
    require(0 <= o.adam_beta1 < 1, "--adam-beta1", "in [0, 1)", o.adam_beta1)
    require(0 <= o.adam_beta2 < 1, "--adam-beta2", "in [0, 1)", o.adam_beta2)
    require(o.max_grad_norm >= 0, "--max-grad-norm", ">= 0 (0 disables clipping)", o.max_grad_norm)
    require(0 <= o.seed <= SEED_LIMIT, "--seed", f"in [0, {SEED_LIMIT}]", o.seed)
    require(o.logging_steps >= 1, "--logging-steps", ">= 1", o.logging_steps)
    require(o.save_steps >= 0, "--save-steps", ">= 0 (0: no checkpoints)", o.save_steps)
    require(o.save_total_limit >= 0, "--save-total-limit", ">= 0 (0 keeps all)", o.save_total_limit)
    check_trackers(o.report_to)
    check_output_dir(o.output_dir)


def _configure_deepspeed(accelerator, options: LoopOptions) -> None:
    """miopt's flags are the truth for batch size, accumulation and clipping: written into the
    DeepSpeed config (there is no DataLoader from which Accelerate could fill in 'auto')."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = options.batch_size
    config["gradient_accumulation_steps"] = options.gradient_accumulation_steps
    config["train_batch_size"] = (
        options.batch_size * options.gradient_accumulation_steps * accelerator.num_processes
    )
    config["gradient_clipping"] = max(options.max_grad_norm, 0.0)


def _total_steps(options: LoopOptions, order: DataOrder) -> int:
    if options.max_steps > 0:
        return options.max_steps
    return max(1, math.ceil(options.epochs * order.per_epoch / options.gradient_accumulation_steps))


def _set_up_optimizer(options: LoopOptions, model, accelerator, total_steps: int):
    """(prepared model, prepared AdamW, schedule): warmup, then linear, cosine (to a floor) or constant."""
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=options.learning_rate,
        betas=(options.adam_beta1, options.adam_beta2),
        weight_decay=options.weight_decay,
        fused=fused_adamw(accelerator, trainable),
    )
    floor = options.lr_scheduler == "cosine" and options.min_lr_ratio > 0
    scheduler = get_scheduler(
        "cosine_with_min_lr" if floor else options.lr_scheduler,
        optimizer,
        num_warmup_steps=int(options.warmup_ratio * total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs={"min_lr_rate": options.min_lr_ratio} if floor else None,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, options)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped once per optimizer step by us (Accelerate's wrapper would step it
    # once per process), and saved with the checkpoint.
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler


def _resume(options: LoopOptions, accelerator, output_dir: Path) -> int | None:
    """Load the checkpoint ``--resume`` names (the newest intact one for 'latest') and return its
    step; None for a fresh run, also when --resume finds no checkpoint yet (said on stderr)."""
    if not options.resume:
        return None
    source = _on_main(accelerator, lambda: resume_checkpoint(output_dir, options.resume))
    if source is None:
        if accelerator.is_main_process:
            print(f"--resume: no checkpoint in {output_dir} yet; starting from scratch", file=sys.stderr)
        return None
    try:
        accelerator.load_state(str(source))
        step = int(read_state(source)["step"])
    except Exception as error:  # noqa: BLE001 - any failure names the checkpoint, not a traceback
        raise MioptError(f"--resume: cannot load {source}: {type(error).__name__}: {error}") from error
    if accelerator.is_main_process:
        print(f"resumed from {source} (step {step})", file=sys.stderr)
    return step


def _on_main(accelerator, work: Callable[[], Any]) -> Any:
    """``work()`` on the main process only (checksums read every file once, not once per process),
    its result or its MioptError handed to every process."""
    if accelerator.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    holder: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            holder = [("ok", work())]
        except MioptError as error:
            holder = [("error", str(error))]
    broadcast_object_list(holder)
    kind, value = holder[0]
    if kind == "error":
        raise MioptError(value)
    return value


def _save(options: LoopOptions, accelerator, model, step: int, expected_bytes: int | None) -> Path:
    """A checkpoint at ``step``, refused when the weights are no longer finite (so a good older one is
    never pruned for it)."""
    if not weights_finite(model, accelerator):
        raise NonFiniteError(
            f"step {step}: the weights are no longer finite; checkpoint not written, "
            f"{newest_checkpoint_note(options)}"
        )
    return save_checkpoint(
        accelerator, Path(options.output_dir), step, options.save_total_limit, expected_bytes
    )


def _check_space(
    options: LoopOptions, accelerator, output_dir: Path, checkpoint_estimate: int, final_estimate: int
) -> None:
    """Before the first step: room for the next checkpoint (with --save-steps) or else the final
    weights, so a run never trains for hours towards a save that cannot fit."""
    if options.save_steps:
        needed, what = (
            checkpoint_space(output_dir, checkpoint_estimate),
            "a checkpoint (weights and optimizer)",
        )
    else:
        needed, what = final_estimate, "the final model"
    if needed:
        _on_main(
            accelerator,
            lambda: check_free_space(
                output_dir, needed, what, kept=f"nothing was trained; {kept_note(output_dir)}"
            ),
        )


def run_loop(
    options: LoopOptions,
    *,
    model,
    num_examples: int,
    step_fn: StepFunction,
    stateful: dict[str, Any] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    accelerator=None,
    example_weights: Sequence[float] | None = None,
    checkpoint_last: bool = False,
) -> LoopResult:
    """Optimise ``model`` with ``step_fn`` over ``num_examples`` examples; returns the logged history.

    ``example_weights``: when ``step_fn`` returns a weighted mean over its micro-batch (e.g. a mean per
    completion token, weight = tokens), each micro-batch's loss is rescaled so that the optimizer step
    follows the weighted mean over the whole step, across micro-steps and processes; without it the
    step follows the plain mean of the micro-batch losses. The logged loss is that rescaled one.

    ``stateful`` objects (``state_dict``/``load_state_dict``) are saved in checkpoints and restored
    on resume, next to the model, optimizer, scheduler and RNG states. A non-finite loss, gradient
    norm or weight raises :class:`NonFiniteError` before it reaches the weights or a checkpoint.
    ``checkpoint_last``: the last step is checkpointed too (on the ``--save-steps`` grid), so that a
    later call with a larger ``max_steps`` continues this one exactly (training in segments).
    """
    started = time.perf_counter()
    accelerator = accelerator or make_accelerator(options.bf16)
    plan = _plan(options, accelerator, model, num_examples, stateful)
    sink = MetricsSink(plan.output_dir, accelerator, options, on_log=on_log)
    history = sink.start(plan.start_step or None)
    try:
        _train_steps(options, plan, history, sink, step_fn, example_weights, checkpoint_last)
    finally:
        sink.close()
    if not weights_finite(plan.run.model, accelerator):
        raise NonFiniteError(
            f"step {plan.total_steps}: the final weights are not finite; no final model saved, "
            f"{newest_checkpoint_note(options)}"
        )
    return LoopResult(history, plan.total_steps, time.perf_counter() - started, plan.start_step)


@dataclass
class _Plan:
    """What the steps run on: the prepared optimisation, its data order, where it starts and ends."""

    output_dir: Path
    run: Optimisation
    order: DataOrder
    total_steps: int
    start_step: int
    checkpoint_estimate: int | None


def _plan(options: LoopOptions, accelerator, model, num_examples: int, stateful) -> _Plan:
    """Seed, data order, optimizer and schedule, free space and resume: everything before step one."""
    from accelerate.utils import set_seed

    output_dir = Path(options.output_dir)
    set_seed(options.seed)
    world = accelerator.num_processes
    order = DataOrder(
        num_examples, options.batch_size * world, options.seed, accelerator.process_index, world
    )
    total_steps = _total_steps(options, order)
    estimate = checkpoint_bytes(model)  # of the model as given: prepare may shard or wrap it
    final_estimate = checkpoint_bytes(model, optimizer=False)
    model, optimizer, scheduler = _set_up_optimizer(options, model, accelerator, total_steps)
    for state in (stateful or {}).values():
        accelerator.register_for_checkpointing(state)
    if accelerator.is_main_process:
        remove_stale_temporaries(output_dir, prefix=f".{CHECKPOINT_PREFIX}")
    _check_space(options, accelerator, output_dir, estimate, final_estimate)
    start_step = _resume(options, accelerator, output_dir) or 0
    if start_step > total_steps:
        raise OptionError(
            f"--resume: the checkpoint is at step {start_step}, beyond this run's {total_steps} steps"
        )
    run = Optimisation(options, accelerator, model, optimizer, scheduler, order)
    return _Plan(output_dir, run, order, total_steps, start_step, estimate)


def _train_steps(
    options: LoopOptions,
    plan: _Plan,
    history: list,
    sink: MetricsSink,
    step_fn,
    example_weights,
    checkpoint_last,
) -> None:
    """The optimizer steps from ``plan.start_step + 1``: log on the ``--logging-steps`` grid, save on
    ``--save-steps``, and after a step that a SIGTERM or SIGINT came during, checkpoint and stop."""

    run, accelerator = plan.run, plan.run.accelerator
    batches = plan.order.iterate(plan.start_step * run.accumulation)
    progress = tqdm(
        total=plan.total_steps,
        initial=plan.start_step,
        desc="train",
        disable=not (options.progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    window: list[dict[str, Tensor]] = []
    window_examples, window_start = 0, time.perf_counter()
    with progress, StopSignals() as stop:
        for step in range(plan.start_step + 1, plan.total_steps + 1):
            rows, examples = run.accumulate(step, batches, step_fn, example_weights)
            run.step(step, rows)
            window += rows
            window_examples += examples
            progress.update(1)
            if step % options.logging_steps == 0 or step == plan.total_steps:
                record = run.record(step, window, window_examples, time.perf_counter() - window_start)
                window, window_examples, window_start = [], 0, time.perf_counter()
                history.append(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                sink.write(record)
            last = step == plan.total_steps
            saved = (
                bool(options.save_steps) and step % options.save_steps == 0 and (not last or checkpoint_last)
            )
            if saved:
                _save(options, accelerator, run.model, step, plan.checkpoint_estimate)
            signum = stop.agreed(accelerator)
            if signum:
                checkpoint = checkpoint_dir(plan.output_dir, step)
                if not saved:
                    checkpoint = _save(options, accelerator, run.model, step, plan.checkpoint_estimate)
                raise Preempted(signum, step, checkpoint, plan.output_dir)

"""The training loop shared by ``miopt train`` and ``miopt sft``, on Accelerate.

The loop knows nothing of objectives: it asks a step function for a loss and a dict of
scalar metrics on a list of example indices, and owns everything around it: data order,
gradient accumulation, clipping, AdamW with warmup and a linear or cosine schedule, mixed
precision, logging to ``metrics.jsonl``, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from miopt.checkpoint import (
    STATE_FILE,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    checkpoint_dir,
    commit_directory,
    latest_checkpoint,
    prune_checkpoints,
    read_state,
)
from miopt.config import option
from miopt.errors import OptionError
from miopt.trackers import check_trackers, finish_trackers, log_metrics, start_trackers

# (model, example indices of this process's micro-batch) -> (loss, {metric name: scalar tensor})
StepFunction = Callable[[Any, Sequence[int]], tuple[Tensor, dict[str, Tensor]]]
METRICS_FILE = "metrics.jsonl"


@dataclass
class LoopOptions:
    """Options of the optimisation loop (shared by ``train`` and ``sft``)."""

    output_dir: str = option(
        "runs/miopt", "Folder for metrics.jsonl, checkpoints, the final model and summary."
    )
    max_steps: int = option(-1, "Optimizer steps to run; -1 derives them from --epochs.")
    epochs: float = option(1.0, "Passes over the data (used when --max-steps is -1).")
    batch_size: int = option(8, "Prompts per device per micro-step.")
    gradient_accumulation_steps: int = option(1, "Micro-steps accumulated per optimizer step.")
    learning_rate: float = option(1e-6, "Peak AdamW learning rate.")
    lr_scheduler: str = option("linear", "Decay after warmup.", choices=["linear", "cosine", "constant"])
    warmup_ratio: float = option(0.1, "Fraction of the steps spent in linear warmup.")
    min_lr_ratio: float = option(
        0.0, "With --lr-scheduler cosine: the fraction of the peak learning rate the decay ends at (0: zero)."
    )
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm (0 disables).")
    seed: int = option(42, "Seed of data order, initialisation and sampling.")
    bf16: bool = option(
        False, "bf16 mixed precision (autocast); fast on GPUs and on CPUs with AMX/AVX512-BF16."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    logging_steps: int = option(10, "Append a line to metrics.jsonl every N optimizer steps.")
    save_steps: int = option(0, "Write a checkpoint every N optimizer steps (0: none but the final model).")
    save_total_limit: int = option(2, "Checkpoints kept (oldest removed first).")
    resume: str | None = option(
        None,
        "Resume from a checkpoint folder, or 'latest' (the newest in --output-dir); bare --resume = latest.",
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
    if options.batch_size < 1 or options.gradient_accumulation_steps < 1:
        raise OptionError("--batch-size and --gradient-accumulation-steps must be >= 1")
    if options.max_steps == 0 or (options.max_steps < 0 and options.epochs <= 0):
        raise OptionError("nothing to train: set --max-steps > 0 or --epochs > 0")
    if options.learning_rate <= 0:
        raise OptionError(f"--learning-rate must be positive, got {options.learning_rate}")
    if not 0 <= options.min_lr_ratio < 1:
        raise OptionError(f"--min-lr-ratio must be in [0, 1), got {options.min_lr_ratio}")
    if options.min_lr_ratio > 0 and options.lr_scheduler != "cosine":
        raise OptionError(f"--min-lr-ratio applies to --lr-scheduler cosine, not {options.lr_scheduler}")
    if not 0 <= options.warmup_ratio < 1:
        raise OptionError(f"--warmup-ratio must be in [0, 1), got {options.warmup_ratio}")
    if options.logging_steps < 1:
        raise OptionError("--logging-steps must be >= 1")
    check_trackers(options.report_to)


def _distributed_on_cpu() -> bool:
    """Launched as several processes (``torchrun``, ``accelerate launch --multi_gpu``) on a machine
    without an accelerator: Accelerate then needs ``cpu=True`` to join them with gloo; without it
    each process would silently train alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    devices = getattr(torch, "accelerator", None)
    return not (devices.is_available() if devices is not None else torch.cuda.is_available())


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(bf16: bool = False):
    """The run's ``Accelerator`` (DDP, FSDP or DeepSpeed as ``accelerate launch`` configured it),
    refusing set-ups that Accelerate would silently run as something else."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    on_cpu, handlers = _distributed_on_cpu(), []
    if on_cpu and _flag("ACCELERATE_USE_DEEPSPEED"):
        # DeepSpeed on CPU: Accelerate's CPU mode would drop DeepSpeed (MULTI_CPU), and without it
        # Accelerate finds no backend and counts one process; naming gloo (DeepSpeed's own choice on
        # CPU without oneCCL) gives a DeepSpeed run of the launched processes.
        on_cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=on_cpu, kwargs_handlers=handlers)
    kind = accelerator.distributed_type
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes != world:
        raise OptionError(
            f"launched as {world} processes but Accelerate set up {accelerator.num_processes} "
            f"({kind.value}); each would train alone"
        )
    if _flag("ACCELERATE_USE_FSDP") and kind != DistributedType.FSDP:
        raise OptionError(
            f"FSDP was requested but Accelerate runs this as {kind.value}: Accelerate enables FSDP only "
            "on GPUs (and other accelerators), not on CPU; use the DDP config there (docs/distributed.md)"
        )
    if _flag("ACCELERATE_USE_DEEPSPEED") and kind != DistributedType.DEEPSPEED:
        raise OptionError(f"DeepSpeed was requested but Accelerate runs this as {kind.value}")
    return accelerator


def shards_parameters(accelerator) -> bool:
    """Whether parameters live sharded outside the forward pass (FSDP, DeepSpeed ZeRO-3): then the
    output head cannot be called on its own and the full state dict must be gathered to save."""
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", DistributedType.NO)
    if kind == DistributedType.FSDP:
        return True
    if kind == DistributedType.DEEPSPEED:
        return getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
    return False


def sharded_setup(accelerator, *, logprob_chunk: int, merge_lora: bool) -> int:
    """The log-prob chunk size a run can use under ``accelerator``, refusing what sharded weights
    (FSDP, ZeRO-3) cannot do. The chunked path calls the output head outside the wrapped forward,
    where its weight is sharded, so those engines take the full-logits path (0) instead."""
    if not shards_parameters(accelerator):
        return logprob_chunk
    if merge_lora:
        raise OptionError(
            f"--merge-lora is not supported with {accelerator.distributed_type.value} (sharded weights); "
            "save the adapter and merge it afterwards (docs/distributed.md)"
        )
    if logprob_chunk > 0 and accelerator.is_main_process:
        print(
            f"note: {accelerator.distributed_type.value} shards weights: full-logits log-probs",
            file=sys.stderr,
        )
    return 0


def full_state_dict(accelerator, model) -> dict | None:
    """The whole state dict on the main process when weights are sharded (every process must call this:
    it is a collective), else None (the model saves its own). Under DeepSpeed the gathering is the
    engine's (run_loop's prepared model), not the bare module's."""
    if not shards_parameters(accelerator):
        return None
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return accelerator.get_state_dict(engine.engine if engine else model)


_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _fused_adamw(accelerator, parameters: list[torch.nn.Parameter]) -> bool:
    """Use torch's fused AdamW kernel (one pass over each tensor instead of a dozen elementwise ops;
    measured 3.5 to 4.7x faster than the default single-tensor loop on CPU, docs/performance.md)
    when the parameters are plain tensors; sharded engines (FSDP, DeepSpeed) keep the default."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return False
    return bool(parameters) and all(
        p.device.type in _FUSED_ADAMW_DEVICES and p.is_floating_point() for p in parameters
    )


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


def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


class DataOrder:
    """Deterministic micro-batches: a seeded permutation per epoch, cut into global batches;
    each process takes its share. Micro-batch ``i`` is the same on every run, so a resumed run
    continues at exactly the data it would have seen."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, rank: int, world: int) -> None:
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.rank, self.world = rank, world
        self.per_epoch = max(1, num_examples // global_batch) if num_examples >= global_batch else 1

    def global_micro_batch(self, index: int) -> list[int]:
        """Micro-batch ``index`` of every process together."""
        epoch, position = divmod(index, self.per_epoch)
        order = _epoch_order(self.num_examples, self.seed, epoch)
        return order[position * self.global_batch : (position + 1) * self.global_batch]

    def micro_batch(self, index: int) -> list[int]:
        return self.global_micro_batch(index)[self.rank :: self.world]

    def iterate(self, start: int) -> Iterator[list[int]]:
        index = start
        while True:
            yield self.micro_batch(index)
            index += 1


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {key for row in rows for key in row}
    return {
        key: sum(row[key] for row in rows if key in row) / sum(key in row for row in rows) for key in keys
    }


def _metrics_path(output_dir: Path) -> Path:
    return output_dir / METRICS_FILE


def _truncate_metrics(output_dir: Path, step: int) -> list[dict[str, float]]:
    """Keep the metrics lines of steps <= ``step`` (those a resumed run would not write again)."""
    path = _metrics_path(output_dir)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


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
) -> LoopResult:
    """Optimise ``model`` with ``step_fn`` over ``num_examples`` examples; returns the logged history.

    ``example_weights``: when ``step_fn`` returns a weighted mean over its micro-batch (e.g. a mean per
    completion token, weight = tokens), each micro-batch's loss is rescaled so that the optimizer step
    follows the weighted mean over the whole step, across micro-steps and processes; without it the
    step follows the plain mean of the micro-batch losses. The logged loss is that rescaled one.

    ``stateful`` objects (``state_dict``/``load_state_dict``) are saved in checkpoints and restored
    on resume, next to the model, optimizer, scheduler and RNG states.
    """
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    output_dir = Path(options.output_dir)
    accelerator = accelerator or make_accelerator(options.bf16)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    set_seed(options.seed)
    world = accelerator.num_processes
    global_batch = options.batch_size * world
    order = DataOrder(num_examples, global_batch, options.seed, accelerator.process_index, world)
    accumulation = options.gradient_accumulation_steps
    if options.max_steps > 0:
        total_steps = options.max_steps
    else:
        total_steps = max(1, math.ceil(options.epochs * order.per_epoch / accumulation))

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
        fused=_fused_adamw(accelerator, trainable),
    )
    floor = options.lr_scheduler == "cosine" and options.min_lr_ratio > 0
    scheduler = get_scheduler(
        "cosine_with_min_lr" if floor else options.lr_scheduler,
        optimizer,
        num_warmup_steps=int(options.warmup_ratio * total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs={"min_lr_rate": options.min_lr_ratio} if floor else None,
    )
    if deepspeed:
        _configure_deepspeed(accelerator, options)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped once per optimizer step by us (Accelerate's wrapper would step it
    # once per process), and saved with the checkpoint.
    accelerator.register_for_checkpointing(scheduler)
    for state in (stateful or {}).values():
        accelerator.register_for_checkpointing(state)

    start_step = 0
    history: list[dict[str, float]] = []
    if options.resume:
        source = latest_checkpoint(output_dir) if options.resume == "latest" else Path(options.resume)
        if source is None:
            raise OptionError(f"--resume: no checkpoint in {output_dir}")
        if not (source / STATE_FILE).is_file():
            raise OptionError(f"--resume: {source} is not a complete checkpoint")
        accelerator.load_state(str(source))
        start_step = int(read_state(source)["step"])
        if accelerator.is_main_process:
            history = _truncate_metrics(output_dir, start_step)
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _metrics_path(output_dir).unlink(missing_ok=True)

    trackers = start_trackers(accelerator, options, output_dir)
    batches = order.iterate(start_step * accumulation)
    progress = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        disable=not (options.progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    window: list[dict[str, Tensor]] = []
    window_examples = 0
    window_start = time.perf_counter()
    started = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        step_metrics: list[dict[str, Tensor]] = []
        step_weight = None
        if example_weights is not None:
            micro_indices = range((step - 1) * accumulation, step * accumulation)
            step_weight = sum(example_weights[i] for m in micro_indices for i in order.global_micro_batch(m))
        for micro in range(accumulation):
            indices = next(batches)
            sync = micro == accumulation - 1
            if deepspeed:
                # The engine accumulates (dividing by its own count) and steps when told it is the last.
                accelerator.gradient_state._set_sync_gradients(sync)
            with nullcontext() if sync or deepspeed else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss, metrics = step_fn(model, indices)
                if step_weight is not None:
                    # DDP averages processes and we divide by the micro-steps: undo both, then weigh.
                    share = sum(example_weights[i] for i in indices) / max(step_weight, 1e-12)
                    loss = loss * (share * world * accumulation)
                accelerator.backward(loss if deepspeed else loss / accumulation)
            step_metrics.append({"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}})
            window_examples += len(indices) * world
        grad_norm = None
        if options.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for row in step_metrics:
            if grad_norm is not None:
                row["grad_norm"] = (
                    grad_norm.detach() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
                )
            window.append(row)
        progress.update(1)

        if step % options.logging_steps == 0 or step == total_steps:
            # The only host synchronisation of the loop: metrics reduced across processes and read.
            stacked = {key: torch.stack([row[key].float() for row in window]).mean() for key in window[0]}
            reduced = {
                key: accelerator.reduce(value.to(accelerator.device), "mean")
                for key, value in stacked.items()
            }
            elapsed = time.perf_counter() - window_start
            record = {"step": step, **{key: float(value) for key, value in sorted(reduced.items())}}
            record["lr"] = scheduler.get_last_lr()[0]
            record["pairs_per_second"] = window_examples / max(elapsed, 1e-9)
            record["epoch"] = step * accumulation / order.per_epoch
            window, window_examples, window_start = [], 0, time.perf_counter()
            history.append(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if accelerator.is_main_process:
                with _metrics_path(output_dir).open("a") as file:
                    file.write(json.dumps(record) + "\n")
                log_metrics(accelerator, record)
            if on_log is not None:
                on_log(record)

        if options.save_steps and step % options.save_steps == 0 and step < total_steps:
            save_checkpoint(accelerator, output_dir, step, options.save_total_limit)
    progress.close()
    if trackers:
        finish_trackers(accelerator)
    return LoopResult(history, total_steps, time.perf_counter() - started, start_step)


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """Model, optimizer, scheduler, RNG and registered states, under a temporary name renamed when whole."""
    final = checkpoint_dir(output_dir, step)
    temporary = atomic_directory(final) if accelerator.is_main_process else None
    temporary = _broadcast_path(accelerator, temporary)
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(temporary / STATE_FILE, {"step": step})
        commit_directory(temporary, final)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _broadcast_path(accelerator, path: Path | None) -> Path:
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    holder = [str(path) if path is not None else None]
    broadcast_object_list(holder)
    return Path(holder[0])

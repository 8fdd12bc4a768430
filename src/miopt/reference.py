"""Reference log-probabilities: computed once before training and cached on disk.

The cache key covers the reference model's identity, every token id of the data (which fixes
the tokenizer, the data and the truncation settings) and the precision, so a second run on the
same data reads the file and never loads the reference model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from miopt.checkpoint import atomic_write_bytes
from miopt.data.tokenize import TokenizedExample
from miopt.logprobs import pair_logps
from miopt.packing import make_batch


def default_cache_dir() -> Path:
    """``$MIOPT_CACHE`` or ``~/.cache/miopt``."""
    return Path(os.environ.get("MIOPT_CACHE", Path.home() / ".cache" / "miopt"))


@dataclass
class ReferenceLogps:
    """Summed reference log-probs per example: chosen ``[N]``, rejected ``[N, K]`` (0 where absent)."""

    chosen: Tensor
    rejected: Tensor

    def select(self, indices: Sequence[int], num_rejected: int) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return self.chosen[index], self.rejected[index, :num_rejected]


def cache_key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(
    model,
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    *,
    batch_size: int = 16,
    chunk_tokens: int = 1024,
    autocast: Callable | None = None,
    progress: bool = True,
    accelerator=None,
    packing: str = "padded",
) -> ReferenceLogps:
    """Summed response log-probs of every example under ``model`` (eval mode, no gradients), in the
    batch layout ``packing`` (:func:`miopt.packing.make_batch`; training passes its own, so the
    critic is exactly zero at the first step).

    With an ``accelerator`` of several processes, each computes a contiguous share of the examples
    and the shares are gathered, so every process returns the whole result.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(e.rejected_ids) for e in examples)
    chosen = torch.zeros(len(examples))
    rejected = torch.zeros(len(examples), width)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    first, last = len(examples) * rank // world, len(examples) * (rank + 1) // world
    starts = range(first, last, batch_size)
    for start in tqdm(starts, desc="reference log-probs", disable=not progress, leave=False):
        context = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with context:
            batch = make_batch(examples[start : min(start + batch_size, last)], pad_token_id, packing, model)
            result = pair_logps(model, batch.to(device), chunk_tokens=chunk_tokens)
        stop = start + batch.num_prompts
        chosen[start:stop] = result.chosen.float().cpu()
        rejected[start:stop, : result.rejected.shape[1]] = result.rejected.float().cpu()
    model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        shares = gather_object([(first, last, chosen[first:last], rejected[first:last])])
        for share_first, share_last, share_chosen, share_rejected in shares:
            chosen[share_first:share_last] = share_chosen
            rejected[share_first:share_last] = share_rejected
    return ReferenceLogps(chosen, rejected)


def load_or_compute(
    path: Path, compute: Callable[[], ReferenceLogps], accelerator=None
) -> tuple[ReferenceLogps, bool]:
    """Read the cached file at ``path``, or compute and write it atomically. Returns (logps, was_cached).

    With several processes the main one decides (its file system holds the cache), reads or writes
    the file, and hands a cached result to the others; ``compute`` is called on every process
    (it shares the work out and gathers it).
    """
    from safetensors.torch import load, save

    distributed = accelerator is not None and accelerator.num_processes > 1
    main = not distributed or accelerator.is_main_process
    tensors = load(path.read_bytes()) if main and path.is_file() else None
    if distributed:
        from accelerate.utils import broadcast_object_list

        holder = [tensors]
        broadcast_object_list(holder)
        tensors = holder[0]
    if tensors is not None:
        return ReferenceLogps(tensors["chosen"], tensors["rejected"]), True
    logps = compute()
    if main:
        atomic_write_bytes(
            path, save({"chosen": logps.chosen.contiguous(), "rejected": logps.rejected.contiguous()})
        )
    if distributed:
        accelerator.wait_for_everyone()
    return logps, False

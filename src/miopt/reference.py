"""Reference log-probabilities: computed once before training and cached on disk.

The cache key covers the reference model's identity, every token id of the data (which fixes
the tokenizer, the data and the truncation settings) and the precision, so a second run on the
same data reads the file and never loads the reference model. Each entry carries the SHA-256 of
its tensors; an entry whose checksum, shapes or values (NaN, infinity) are wrong is named,
discarded and recomputed (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from miopt.checkpoint import atomic_write_bytes
from miopt.data.tokenize import TokenizedExample
from miopt.logprobs import pair_logps
from miopt.modeling import unwrap
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


def _tensors_sha256(chosen: Tensor, rejected: Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (chosen, rejected):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def encode_entry(logps: ReferenceLogps) -> bytes:
    """The cache file's bytes: safetensors with the tensors' checksum in its metadata."""
    from safetensors.torch import save

    chosen, rejected = logps.chosen.contiguous().float(), logps.rejected.contiguous().float()
    return save(
        {"chosen": chosen, "rejected": rejected}, metadata={"sha256": _tensors_sha256(chosen, rejected)}
    )


def decode_entry(data: bytes, shape: tuple[int, int] | None = None) -> tuple[ReferenceLogps | None, str]:
    """(logps, "") for an intact entry of ``shape`` (examples, rejected per example), else (None, why)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_length = int.from_bytes(data[:8], "little")  # safetensors: u64 length, then a JSON header
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    except Exception as error:  # noqa: BLE001 - any unreadable file is damage
        return None, f"unreadable ({type(error).__name__}: {error})"
    if set(tensors) != {"chosen", "rejected"}:
        return None, f"holds {sorted(tensors)}, not chosen and rejected"
    chosen, rejected = tensors["chosen"], tensors["rejected"]
    if chosen.dim() != 1 or rejected.dim() != 2 or rejected.shape[0] != chosen.shape[0]:
        return None, f"shapes {tuple(chosen.shape)} and {tuple(rejected.shape)} do not fit together"
    if shape is not None and (chosen.shape[0], rejected.shape[1]) != shape:
        return None, f"shape ({chosen.shape[0]}, {rejected.shape[1]}) is not the data's {shape}"
    if "sha256" not in metadata:
        return None, "it carries no checksum"
    if metadata["sha256"] != _tensors_sha256(chosen, rejected):
        return None, "its values do not match their checksum"
    if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        return None, "it holds NaN or infinite values"
    return ReferenceLogps(chosen, rejected), ""


def load_or_compute(
    path: Path,
    compute: Callable[[], ReferenceLogps],
    accelerator=None,
    shape: tuple[int, int] | None = None,
) -> tuple[ReferenceLogps, bool]:
    """Read the cached file at ``path``, or compute and write it atomically. Returns (logps, was_cached).

    ``shape``: (examples, rejected per example) the entry must have. A damaged entry (checksum,
    shape, non-finite values) is named on stderr, removed and recomputed.

    With several processes the main one decides (its file system holds the cache), reads or writes
    the file, and hands a cached result to the others; ``compute`` is called on every process
    (it shares the work out and gathers it).
    """
    distributed = accelerator is not None and accelerator.num_processes > 1
    main = not distributed or accelerator.is_main_process
    tensors = None
    if main and path.is_file():
        logps, problem = decode_entry(path.read_bytes(), shape)
        if logps is None:
            print(f"reference cache {path}: {problem}; discarded, recomputing", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
        else:
            tensors = {"chosen": logps.chosen, "rejected": logps.rejected}
    if distributed:
        from accelerate.utils import broadcast_object_list

        holder = [tensors]
        broadcast_object_list(holder)
        tensors = holder[0]
    if tensors is not None:
        return ReferenceLogps(tensors["chosen"], tensors["rejected"]), True
    logps = compute()
    if main:
        atomic_write_bytes(path, encode_entry(logps))
    if distributed:
        accelerator.wait_for_everyone()
    return logps, False


@torch.no_grad()
def on_the_fly_reference(model, reference_model, batch, chunk_tokens: int, pair_fn=pair_logps):
    """Reference log-probs by a forward pass: a frozen model, or the policy with LoRA adapters off."""
    if reference_model is None:
        with unwrap(model).disable_adapter():
            result = pair_fn(model, batch, chunk_tokens=chunk_tokens)
    else:
        result = pair_fn(reference_model, batch, chunk_tokens=chunk_tokens)
    return result.chosen.detach(), result.rejected.detach()

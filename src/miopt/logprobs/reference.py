"""Reference log-probabilities: computed once before training and cached on disk.

The cache key covers the reference model's identity, every token id of the data (which fixes
the tokenizer, the data and the truncation settings) and the precision, so a second run on the
same data reads the file and never loads the reference model. Beside each response's summed
log-prob the entry keeps its LD-DPO tail sum (:mod:`miopt.logprobs.length_desensitised`), so ``ld_alpha``
trains from the cache too. Each entry carries the SHA-256 of
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
from tqdm.auto import tqdm

from miopt.data.tokenize import TokenizedExample
from miopt.logprobs.forward import as_pairs, pair_logps, sequence_logps
from miopt.logprobs.length_desensitised import tail_logps
from miopt.logprobs.packing import make_batch
from miopt.model.modeling import unwrap
from miopt.objectives import ld_combine
from miopt.run.atomic_io import atomic_write_bytes

ENTRY_FORMAT = 2  # part of the cache key: entries of another format are never read
ENTRY_TENSORS = ("chosen", "rejected", "chosen_tail", "rejected_tail")


def default_cache_dir() -> Path:
    """``$MIOPT_CACHE`` or ``~/.cache/miopt``."""
    return Path(os.environ.get("MIOPT_CACHE", Path.home() / ".cache" / "miopt"))


@dataclass
class ReferenceLogps:
    """Summed reference log-probs per example: chosen ``[N]``, rejected ``[N, K]`` (0 where absent);
    ``chosen_tail``/``rejected_tail`` (same shapes) the sums beyond LD-DPO's shared length."""

    chosen: Tensor
    rejected: Tensor
    chosen_tail: Tensor | None = None
    rejected_tail: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        named = {name: getattr(self, name) for name in ENTRY_TENSORS}
        return {name: tensor for name, tensor in named.items() if tensor is not None}

    def select(
        self, indices: Sequence[int], num_rejected: int, ld_alpha: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Chosen ``[B]`` and rejected ``[B, K]`` of the examples ``indices``: summed, or LD-DPO's
        log-probs with ``ld_alpha`` (:func:`miopt.objectives.ld_combine`)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        chosen, rejected = self.chosen[index], self.rejected[index, :num_rejected]
        if ld_alpha is None:
            return chosen, rejected
        if self.chosen_tail is None or self.rejected_tail is None:
            raise ValueError("these reference log-probs carry no tail sums, which ld_alpha needs")
        return (
            ld_combine(chosen, self.chosen_tail[index], ld_alpha),
            ld_combine(rejected, self.rejected_tail[index, :num_rejected], ld_alpha),
        )


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
    progress: bool = True,
    accelerator=None,
    packing: str = "padded",
) -> ReferenceLogps:
    """Summed response log-probs of every example under ``model`` (eval mode, no gradients), and their
    LD-DPO tail sums, in the batch layout ``packing`` (:func:`miopt.logprobs.packing.make_batch`; training
    passes its own, so the critic is exactly zero at the first step).

    With an ``accelerator``, the passes run under its autocast (bf16 when it trains in bf16); with
    several processes, each computes a contiguous share of the examples and the shares are gathered,
    so every process returns the whole result.
    """

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(e.rejected_ids) for e in examples)
    result = ReferenceLogps(
        torch.zeros(len(examples)),
        torch.zeros(len(examples), width),
        torch.zeros(len(examples)),
        torch.zeros(len(examples), width),
    )
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    first, last = len(examples) * rank // world, len(examples) * (rank + 1) // world
    starts = range(first, last, batch_size)
    for start in tqdm(starts, desc="reference log-probs", disable=not progress, leave=False):
        context = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        with context:
            batch = make_batch(examples[start : min(start + batch_size, last)], pad_token_id, packing, model)
            batch = batch.to(device)
            logps = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
        stop = start + batch.num_prompts
        summed, tails = as_pairs(logps, batch), as_pairs(logps, batch, tail_logps(logps, batch))
        for name, pair in (("", summed), ("_tail", tails)):
            getattr(result, f"chosen{name}")[start:stop] = pair.chosen.float().cpu()
            getattr(result, f"rejected{name}")[start:stop, : pair.rejected.shape[1]] = (
                pair.rejected.float().cpu()
            )
    model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        shares = gather_object([(first, last, {name: t[first:last] for name, t in result.tensors().items()})])
        for share_first, share_last, share in shares:
            for name, tensor in share.items():
                getattr(result, name)[share_first:share_last] = tensor
    return result


def _tensors_sha256(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors.values():  # in ENTRY_TENSORS order
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def encode_entry(logps: ReferenceLogps) -> bytes:
    """The cache file's bytes: safetensors with the tensors' checksum in its metadata."""
    from safetensors.torch import save

    tensors = {name: tensor.contiguous().float() for name, tensor in logps.tensors().items()}
    return save(tensors, metadata={"sha256": _tensors_sha256(tensors)})


def decode_entry(data: bytes, shape: tuple[int, int] | None = None) -> tuple[ReferenceLogps | None, str]:
    """(logps, "") for an intact entry of ``shape`` (examples, rejected per example), else (None, why)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_length = int.from_bytes(data[:8], "little")  # safetensors: u64 length, then a JSON header
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    except Exception as error:  # noqa: BLE001 - any unreadable file is damage
        return None, f"unreadable ({type(error).__name__}: {error})"
    if set(tensors) not in ({"chosen", "rejected"}, set(ENTRY_TENSORS)):
        return None, f"holds {sorted(tensors)}, not chosen and rejected (and their tails)"
    logps = ReferenceLogps(**tensors)
    chosen, rejected = logps.chosen, logps.rejected
    if chosen.dim() != 1 or rejected.dim() != 2 or rejected.shape[0] != chosen.shape[0]:
        return None, f"shapes {tuple(chosen.shape)} and {tuple(rejected.shape)} do not fit together"
    if logps.chosen_tail is not None and (
        logps.chosen_tail.shape != chosen.shape or logps.rejected_tail.shape != rejected.shape
    ):
        return None, "its tail sums do not have the shapes of its log-probs"
    if shape is not None and (chosen.shape[0], rejected.shape[1]) != shape:
        return None, f"shape ({chosen.shape[0]}, {rejected.shape[1]}) is not the data's {shape}"
    if "sha256" not in metadata:
        return None, "it carries no checksum"
    if metadata["sha256"] != _tensors_sha256(logps.tensors()):
        return None, "its values do not match their checksum"
    if not all(torch.isfinite(tensor).all() for tensor in logps.tensors().values()):
        return None, "it holds NaN or infinite values"
    return logps, ""


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
            tensors = logps.tensors()
    if distributed:
        from accelerate.utils import broadcast_object_list

        holder = [tensors]
        broadcast_object_list(holder)
        tensors = holder[0]
    if tensors is not None:
        return ReferenceLogps(**tensors), True
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

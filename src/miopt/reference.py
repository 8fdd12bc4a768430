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
from miopt.data.tokenize import TokenizedExample, collate
from miopt.logprobs import pair_logps


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
) -> ReferenceLogps:
    """Summed response log-probs of every example under ``model`` (eval mode, no gradients)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(e.rejected_ids) for e in examples)
    chosen = torch.zeros(len(examples))
    rejected = torch.zeros(len(examples), width)
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="reference log-probs", disable=not progress, leave=False):
        batch = collate(examples[start : start + batch_size], pad_token_id).to(device)
        context = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with context:
            result = pair_logps(model, batch, chunk_tokens=chunk_tokens)
        stop = start + batch.num_prompts
        chosen[start:stop] = result.chosen.float().cpu()
        rejected[start:stop, : result.rejected.shape[1]] = result.rejected.float().cpu()
    model.train(was_training)
    return ReferenceLogps(chosen, rejected)


def load_or_compute(path: Path, compute: Callable[[], ReferenceLogps]) -> tuple[ReferenceLogps, bool]:
    """Read the cached file at ``path``, or compute and write it atomically. Returns (logps, was_cached)."""
    from safetensors.torch import load, save

    if path.is_file():
        tensors = load(path.read_bytes())
        return ReferenceLogps(tensors["chosen"], tensors["rejected"]), True
    logps = compute()
    atomic_write_bytes(
        path, save({"chosen": logps.chosen.contiguous(), "rejected": logps.rejected.contiguous()})
    )
    return logps, False

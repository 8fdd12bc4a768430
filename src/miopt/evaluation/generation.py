"""Batched generation with a KV cache: greedy or sampled, with stop strings.

Prompts are sorted by length, left-padded into batches and passed to Hugging Face
``model.generate`` (which keeps a KV cache, so each new token costs one position of attention);
generation of a row ends at the end-of-sequence token or at the first stop string, and the text
is cut just before that stop string. Greedy decoding of a batch gives the same text as decoding
each prompt alone: left padding is masked and positions come from the attention mask.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for string in stop or ():
        if string:
            index = text.find(string)
            if 0 <= index < end:
                end = index
    return text[:end]


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text contains a stop string.

    Only the last few tokens of each unfinished row are decoded at each step (enough to hold the
    longest stop string), so the check costs little; the final text is cut by :func:`cut_at_stop`.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [string for string in stop if string]
        self.prompt_length = prompt_length
        self.window = max(len(string) for string in self.stop) + 8
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.done is None or self.done.shape[0] != input_ids.shape[0]:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = input_ids[:, self.prompt_length :]
        start = max(0, generated.shape[1] - self.window)
        rows = (~self.done).nonzero().flatten().tolist()
        if rows:
            tails = self.tokenizer.batch_decode(generated[rows, start:], skip_special_tokens=True)
            for row, tail in zip(rows, tails):
                if any(string in tail for string in self.stop):
                    self.done[row] = True
        return self.done.clone()


@contextlib.contextmanager
def _eval_mode(model: Any, tokenizer: Any) -> Iterator[None]:
    """Evaluation mode, no gradients and left padding; the caller's settings come back after."""
    was_training = model.training
    padding_side = tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        with torch.no_grad():
            yield
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    stop: Sequence[str] | None = None,
    batch_size: int = 32,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    add_special_tokens: bool = True,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> list[list[str]]:
    """Complete each prompt; returns, per prompt, ``num_samples`` completions (prompt excluded).

    ``temperature == 0`` is greedy decoding (then ``num_samples`` must be 1); otherwise tokens are
    sampled at that temperature with nucleus ``top_p`` (Holtzman et al. 2020, "The Curious Case of
    Neural Text Degeneration"), reproducibly for a given ``seed``. Each completion ends at the
    end-of-sequence token, at ``max_new_tokens``, or just before the first of the ``stop`` strings.
    ``batch_size`` counts prompts; with sampling a batch holds ``batch_size * num_samples`` rows.
    ``dtype`` (e.g. ``torch.bfloat16``): decode with a copy of the model's weights in that dtype (the
    model itself is not changed; fp32 -> bf16 -> fp32 would lose bits). None: the model's own.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be at least 1")
    if temperature <= 0 and num_samples > 1:
        raise ValueError("num_samples > 1 needs sampling: give a temperature above 0")
    if not prompts:
        return []
    from tqdm.auto import tqdm

    stop = [string for string in (stop or []) if string]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    encoded = [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] for prompt in prompts]
    empty = [index for index, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no tokens; give a non-empty prompt")
    order = sorted(range(len(prompts)), key=lambda index: -len(encoded[index]))
    results: list[list[str]] = [[] for _ in prompts]
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    device = next(model.parameters()).device
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    rng = torch.random.fork_rng(devices=cuda)
    with _eval_mode(model, tokenizer), rng:
        torch.manual_seed(seed)
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, leave=False)
        for batch in _batches(order, batch_size):
            rows = [encoded[index] for index in batch]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, tokens in enumerate(rows):  # left padding: the prompts end where generation starts
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            prompt_length = width
            criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, prompt_length)] if stop else [])
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                stopping_criteria=criteria,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                use_cache=True,
                **sampling,
            )
            texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
            for position, index in enumerate(batch):
                chunk = texts[position * num_samples : (position + 1) * num_samples]
                results[index] = [cut_at_stop(text, stop) for text in chunk]
            bar.update(len(batch))
        bar.close()
    return results

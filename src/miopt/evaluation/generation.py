"""Batched generation with a KV cache: greedy or sampled, with stop strings.

Prompts are sorted by length, left-padded into batches and passed to Hugging Face
``model.generate`` (which keeps a KV cache, so each new token costs one position of attention);
generation of a row ends at the end-of-sequence token or at the first stop string, and the text
is cut just before that stop string. Greedy decoding of a batch gives the same text as decoding
each prompt alone: left padding is masked and positions come from the attention mask.

Rows that have finished leave the batch: ``generate`` runs ``compact_every`` new tokens at a time and
continues the rows still going from their KV cache (``DynamicCache.batch_select_indices``), so a batch
of short answers does not decode as long as its longest one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

try:  # transformers >= 5.2x names the KV cache argument of generate ``cache``, before ``past_key_values``
    from transformers.generation.utils import ALL_CACHE_NAMES

    _CACHE_KEYWORD = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
except ImportError:
    _CACHE_KEYWORD = "past_key_values"


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


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How :func:`generate` completes prompts.

    ``temperature == 0`` is greedy decoding (then ``num_samples`` must be 1); otherwise tokens are
    sampled at that temperature with nucleus ``top_p`` (Holtzman et al. 2020, "The Curious Case of
    Neural Text Degeneration"), reproducibly for a given ``seed``. Each completion ends at the
    end-of-sequence token, at ``max_new_tokens``, or just before the first of the ``stop`` strings.
    ``batch_size`` counts prompts; with sampling a batch holds ``batch_size * num_samples`` rows.
    ``dtype`` (e.g. ``torch.bfloat16``): decode with a copy of the model's weights in that dtype (the
    model itself is not changed; fp32 -> bf16 -> fp32 would lose bits). None: the model's own.
    ``compact_every``: finished rows leave the batch after every this many new tokens (0: never).
    """

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    batch_size: int = 32
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    add_special_tokens: bool = True
    progress: bool = False
    dtype: torch.dtype | None = None
    compact_every: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(string for string in (self.stop or ()) if string))
        if self.num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        if self.temperature <= 0 and self.num_samples > 1:
            raise ValueError("num_samples > 1 needs sampling: give a temperature above 0")
        if self.compact_every < 0:
            raise ValueError("compact_every must be >= 0")

    def sampling(self) -> dict[str, Any]:
        if self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        return {"do_sample": False}


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, left-padded: every prompt ends where generation starts."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def _finished(
    new_tokens: torch.Tensor, generated: list[list[int]], tokenizer: Any, stop, eos_id
) -> list[bool]:
    """Which rows ended in this chunk: an end-of-sequence token, or a stop string in their text."""
    done = [False] * len(generated)
    for row, tokens in enumerate(new_tokens.tolist()):
        if eos_id is not None and eos_id in tokens:
            done[row] = True
    if stop:
        texts = tokenizer.batch_decode([tokens for tokens in generated], skip_special_tokens=True)
        for row, text in enumerate(texts):
            done[row] = done[row] or any(string in text for string in stop)
    return done


def _complete_batch(
    model: Any, tokenizer: Any, rows: Sequence[list[int]], options: GenerationOptions, ids_of
):
    """The generated token ids of each row (``rows``: prompts, each repeated ``num_samples`` times),
    ``compact_every`` tokens at a time, the unfinished rows continued from the KV cache."""
    pad_id, eos_id = ids_of
    device = next(model.parameters()).device
    ids, mask = _left_padded(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    prompt_length = ids.shape[1]
    generated: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))  # positions in ``generated`` of the rows still in the batch
    cache = DynamicCache() if options.compact_every else None
    remaining = options.max_new_tokens
    while remaining > 0 and active:
        chunk = min(options.compact_every or remaining, remaining)
        criteria = [_StopOnStrings(tokenizer, options.stop, prompt_length)] if options.stop else []
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **{_CACHE_KEYWORD: cache},
            max_new_tokens=chunk,
            stopping_criteria=StoppingCriteriaList(criteria),
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            use_cache=True,
            return_dict_in_generate=True,
            **options.sampling(),
        )
        new_tokens = output.sequences[:, ids.shape[1] :]
        for position, tokens in zip(active, new_tokens.tolist()):
            generated[position].extend(tokens)
        remaining -= new_tokens.shape[1]
        done = _finished(new_tokens, [generated[p] for p in active], tokenizer, options.stop, eos_id)
        if new_tokens.shape[1] < chunk:  # generate stopped early: every row has ended
            break
        # the rows still going carry on from here: every token they generated is real (mask 1)
        ids, mask = output.sequences, torch.cat([mask, torch.ones_like(new_tokens)], 1)
        cache = output.cache if hasattr(output, "cache") else output.past_key_values
        keep = [row for row, finished in enumerate(done) if not finished]
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            ids, mask = ids[index], mask[index]
            active = [active[row] for row in keep]
    return generated


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    options: GenerationOptions | None = None,
    **overrides: Any,
) -> list[list[str]]:
    """Complete each prompt; returns, per prompt, ``num_samples`` completions (prompt excluded).

    ``options`` (:class:`GenerationOptions`) with any of its fields given as keywords on top
    (``generate(model, tokenizer, prompts, max_new_tokens=64, stop=["\\n"])``).
    """
    options = dataclasses.replace(options or GenerationOptions(), **overrides)
    if not prompts:
        return []

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        tokenizer(prompt, add_special_tokens=options.add_special_tokens)["input_ids"] for prompt in prompts
    ]
    empty = [index for index, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no tokens; give a non-empty prompt")
    order = sorted(range(len(prompts)), key=lambda index: -len(encoded[index]))
    results: list[list[str]] = [[] for _ in prompts]
    if options.dtype is not None and options.dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(options.dtype)
    with _eval_mode(model, tokenizer), _seeded(model, options.seed):
        bar = tqdm(
            total=len(prompts), desc="generate", unit="prompt", disable=not options.progress, leave=False
        )
        for batch in _batches(order, options.batch_size):
            rows = [encoded[index] for index in batch for _ in range(options.num_samples)]
            generated = _complete_batch(model, tokenizer, rows, options, (pad_id, tokenizer.eos_token_id))
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            for position, index in enumerate(batch):
                chunk = texts[position * options.num_samples : (position + 1) * options.num_samples]
                results[index] = [cut_at_stop(text, options.stop) for text in chunk]
            bar.update(len(batch))
        bar.close()
    return results


@contextlib.contextmanager
def _seeded(model: Any, seed: int) -> Iterator[None]:
    """torch's RNG seeded with ``seed`` inside, the caller's state (CPU and the model's GPU) restored after."""
    device = next(model.parameters()).device
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield

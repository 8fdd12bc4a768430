"""Log-probabilities: the chunked path equals a naive full log-softmax computation."""

from __future__ import annotations

import torch

from miopt.data.tokenize import collate, tokenize_examples
from miopt.logprobs import full_sequence_logps, pair_logps, sequence_logps


def _batch(tokenizer):
    examples, _ = tokenize_examples(
        ["Q: 1+2=?\n", "Q: 30+4-5=?\n", "Q: 7-1=?\n"],
        [("1+2=3. A: 3", "1+2=4. A: 4"), ("30+4=34. 34-5=29. A: 29", "x", "30+4=35. A: 30"), ("6", "A: 5")],
        ["a", "b", "c"],
        tokenizer,
        max_length=64,
    )
    return collate(examples, tokenizer.pad_token_id)


def naive_logps(model, batch) -> torch.Tensor:
    """Sum over response tokens of log_softmax(logits)[next token], written out by hand."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    totals = []
    for row in range(batch.input_ids.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[row, t]:
                total = total + torch.log_softmax(logits[row, t - 1], -1)[batch.input_ids[row, t]]
        totals.append(total)
    return torch.stack(totals)


def test_chunked_logps_equal_naive_full_softmax(tiny_model, tokenizer):
    batch = _batch(tokenizer)
    expected = naive_logps(tiny_model, batch)
    for chunk in (1, 3, 1024):
        result = sequence_logps(tiny_model, batch, chunk_tokens=chunk)
        torch.testing.assert_close(result.summed.double(), expected, atol=1e-4, rtol=1e-5)
    full = full_sequence_logps(tiny_model, batch)
    torch.testing.assert_close(full.summed.double(), expected, atol=1e-4, rtol=1e-5)


def test_chunked_gradients_equal_full_path(tiny_model, tokenizer):
    batch = _batch(tokenizer)
    grads = []
    for chunk in (2, 0):
        tiny_model.zero_grad()
        sequence_logps(tiny_model, batch, chunk_tokens=chunk).summed.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_token_counts_and_per_token_cover_only_response(tiny_model, tokenizer):
    batch = _batch(tokenizer)
    result = sequence_logps(tiny_model, batch)
    assert result.token_counts.tolist() == batch.response_mask.sum(1).tolist()
    assert torch.all(result.per_token[~batch.response_mask] == 0)
    torch.testing.assert_close(result.per_token.sum(1), result.summed)


def test_pair_logps_splits_rows_into_chosen_and_masked_rejected(tiny_model, tokenizer):
    batch = _batch(tokenizer)
    rows = sequence_logps(tiny_model, batch).summed
    pairs = pair_logps(tiny_model, batch)
    assert pairs.rejected.shape == (3, 2)
    assert pairs.rejected_mask.tolist() == [[True, False], [True, True], [True, False]]
    torch.testing.assert_close(pairs.chosen, rows[:3])
    torch.testing.assert_close(pairs.rejected[1], rows[4:6])
    assert pairs.rejected[0, 1] == 0

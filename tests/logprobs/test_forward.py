"""Log-probabilities: the chunked path equals a naive full log-softmax computation."""

from __future__ import annotations

import torch

from miopt.data.tokenize import collate, tokenize_examples
from miopt.logprobs.forward import full_sequence_logps, pair_logps, sequence_logps


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


def naive_log_sum_sq(model, batch) -> torch.Tensor:
    """``[N, L]``: log sum_v p_v^2 of the distribution predicting each response token, by hand in float64."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
    for row, t in batch.response_mask.nonzero().tolist():
        if t > 0:
            probs = torch.softmax(logits[row, t - 1], -1)
            out[row, t] = torch.log((probs**2).sum())
    return out


def test_log_sum_sq_probs_of_every_path_equal_a_hand_computation(tiny_model, tokenizer):
    """WPO's per-token normaliser comes out of the same head pass, chunked or not, padded or packed."""
    from miopt.logprobs.packing import make_batch

    batch = _batch(tokenizer)
    expected = naive_log_sum_sq(tiny_model, batch)
    for chunk in (0, 1, 3, 1024):
        result = sequence_logps(tiny_model, batch, chunk_tokens=chunk, with_log_sum_sq=True)
        assert not result.log_sum_sq.requires_grad
        torch.testing.assert_close(result.log_sum_sq.double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(
            result.token_mask, batch.response_mask & (torch.arange(batch.response_mask.shape[1]) > 0)
        )
    examples, _ = tokenize_examples(
        ["Q: 1+2=?\n", "Q: 30+4-5=?\n"],
        [("1+2=3. A: 3", "1+2=4. A: 4"), ("30+4=34. 34-5=29. A: 29", "x")],
        ["a", "b"],
        tokenizer,
        max_length=64,
    )
    padded = collate(examples, tokenizer.pad_token_id)
    want = sequence_logps(tiny_model, padded, chunk_tokens=0, with_log_sum_sq=True)
    for packing in ("packed", "shared-prompt"):
        got = sequence_logps(tiny_model, make_batch(examples, tokenizer.pad_token_id, packing, tiny_model),
                             chunk_tokens=3, with_log_sum_sq=True)  # fmt: skip
        for name in ("summed", "token_counts"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-4, rtol=1e-5)
        # per-token columns: each row's response tokens in order, whatever the layout
        for row in range(want.summed.shape[0]):
            torch.testing.assert_close(
                got.log_sum_sq[row][got.token_mask[row]], want.log_sum_sq[row][want.token_mask[row]],
                atol=1e-5, rtol=1e-5,
            )  # fmt: skip


def test_log_sum_sq_leaves_log_probs_and_gradients_unchanged():
    """Asking for WPO's extra output changes neither the log-probs nor their gradients, on the fused
    linear head and on a head that goes through activation checkpointing."""
    from miopt.logprobs.forward import chunked_token_stats

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 5, generator=g)
    targets = torch.randint(0, 11, (7,), generator=g)
    for head in (torch.nn.Linear(5, 11), torch.nn.Sequential(torch.nn.Linear(5, 11))):
        results = []
        for with_log_sum_sq in (False, True):
            leaf = hidden.clone().requires_grad_(True)
            logps, log_sum_sq = chunked_token_stats(leaf, targets, head, 3, with_log_sum_sq)
            (grad,) = torch.autograd.grad((logps * torch.arange(7.0)).sum(), leaf)
            results.append((logps.detach(), grad))
            if with_log_sum_sq:
                assert log_sum_sq is not None and not log_sum_sq.requires_grad
                probs = torch.softmax(head(hidden).double(), -1)
                torch.testing.assert_close(
                    log_sum_sq.double(), torch.log((probs**2).sum(-1)), atol=1e-6, rtol=1e-6
                )
            else:
                assert log_sum_sq is None
        torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
        torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0)

"""Tokenisation and the truncation rule."""

from __future__ import annotations

import pytest

from miopt.data.tokenize import collate, fingerprint, tokenize_examples
from miopt.errors import DataError


def test_prompt_tokens_are_masked_and_eos_appended(tokenizer):
    examples, report = tokenize_examples(["ab"], [("cd", "ef")], ["f:1"], tokenizer, max_length=16)
    batch = collate(examples, tokenizer.pad_token_id)
    assert examples[0].chosen_ids[-1] == tokenizer.eos_token_id
    assert batch.response_mask[0].tolist()[:5] == [False, False, True, True, True]
    assert report.truncated == 0


def test_truncation_rule_cuts_prompt_left_and_response_right(tokenizer):
    examples, report = tokenize_examples(
        ["0123456789"], [("abcdefgh", "xy")], ["f:1"], tokenizer, max_length=12, max_prompt_length=6
    )
    example = examples[0]
    assert tokenizer.decode(example.prompt_ids) == "456789"
    assert tokenizer.decode(example.chosen_ids) == "abcdef"  # 12 - 6 tokens; EOS lost
    assert report.truncated == 1


def test_prompt_longer_than_max_length_is_an_error_naming_the_record(tokenizer):
    with pytest.raises(DataError, match=r"f\.jsonl:3: field 'prompt'.*max_length is 5"):
        tokenize_examples(["0123456789"], [("a", "b")], ["f.jsonl:3"], tokenizer, max_length=5)
    examples, report = tokenize_examples(
        ["0123456789", "1"],
        [("a", "b"), ("c", "d")],
        ["x:1", "x:2"],
        tokenizer,
        max_length=5,
        skip_invalid=True,
    )
    assert len(examples) == 1 and report.skipped == 1


def test_fingerprint_changes_with_truncation(tokenizer):
    long, _ = tokenize_examples(["ab"], [("cdefgh", "x")], ["s"], tokenizer, max_length=16)
    short, _ = tokenize_examples(["ab"], [("cdefgh", "x")], ["s"], tokenizer, max_length=5)
    assert fingerprint(long) != fingerprint(short)

"""Tiny random models of eleven architecture families (tests/logprobs/test_model_families.py, tests/logprobs/test_fast_paths.py)."""

from __future__ import annotations

import torch
import transformers

WINDOW = 12  # below the longest sequence of the examples

FAMILIES = {
    # family: (extra config, LoRA target modules)
    "llama": ({}, ["q_proj", "v_proj"]),
    "qwen2": ({}, ["q_proj", "v_proj"]),
    "qwen3": ({"head_dim": 8}, ["q_proj", "v_proj"]),
    "mistral": ({"sliding_window": WINDOW}, ["q_proj", "v_proj"]),
    "gemma2": ({"head_dim": 8, "sliding_window": WINDOW}, ["q_proj", "v_proj"]),
    "gemma3_text": ({"head_dim": 8, "sliding_window": WINDOW}, ["q_proj", "v_proj"]),
    "phi3": ({}, ["qkv_proj"]),
    "olmo2": ({}, ["q_proj", "v_proj"]),
    "gpt2": ({}, ["c_attn"]),
    "gpt_neox": ({}, ["query_key_value"]),
    "qwen3_moe": (
        {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        ["q_proj", "v_proj"],
    ),
}


def zoo_config(family: str, tokenizer):
    """A tiny config of ``family`` (2 layers, width 32) for the built-in tokenizer; dropout as default."""
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    if family != "gpt_neox":
        sizes["num_key_value_heads"] = 2
    return transformers.AutoConfig.for_model(family, **sizes, **FAMILIES[family][0], **ids)


def zoo_model(family: str, tokenizer, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(zoo_config(family, tokenizer))

"""What miopt reads from a model, and the one setting it changes on it (dropout).

The bottom of the model-facing modules: :mod:`miopt.logprobs.packing`, :mod:`miopt.model.attention` and
:mod:`miopt.logprobs.forward` all ask here whether a forward takes extra keyword arguments or
``logits_to_keep``, which attention the model runs, and whether its kernels keep one compiled
kernel per shape. Nothing here imports another miopt module.
"""

from __future__ import annotations

import inspect

import torch

SHAPE_MULTIPLE = 64
"""Lengths are rounded up to this multiple where :func:`rounds_shapes` says so."""


def unwrap(model):
    """The model inside distributed wrappers (DDP's ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def base_model(model):
    """The Hugging Face model under distributed wrappers and a peft ``PeftModel``."""
    inner = unwrap(model)
    return getattr(inner, "get_base_model", lambda: inner)()


def _forward_parameters(model) -> list[inspect.Parameter]:
    forward = getattr(base_model(model), "forward", None)
    try:
        return list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return []


def forward_takes_kwargs(model) -> bool:
    """Whether the forward passes extra keyword arguments on (to the attention, in transformers 5)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _forward_parameters(model))


def uses_plain_head(model) -> bool:
    """Whether logits are exactly ``lm_head(last hidden state)`` and the forward takes ``logits_to_keep``
    (no soft-capping or logit scaling)."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    takes_keep = any(p.name == "logits_to_keep" for p in _forward_parameters(model))
    return (
        takes_keep
        and inner.get_output_embeddings() is not None
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", 1.0) in (None, 1.0)
    )


def attention_implementation(model) -> str | None:
    """The attention the model runs (``config._attn_implementation``: ``"sdpa"``, ``"eager"``, ...)."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def sliding_window(model) -> int | None:
    """The sliding window of the model's attention (a key at most ``window - 1`` positions back), or None
    where no layer has one (Qwen2's ``sliding_window`` is off unless ``use_sliding_window``)."""
    config = getattr(unwrap(model), "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def rounds_shapes(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether lengths (batch width, attention blocks, scored-token chunks) are rounded up to
    :data:`SHAPE_MULTIPLE` for tensors of ``dtype`` on ``device`` (or autocast's dtype where autocast
    is enabled there: float32 tensors, e.g. after RoPE, still reach the kernels in bf16).

    bf16/fp16 matmuls and attention on CPU run oneDNN kernels that are compiled and kept for each
    distinct shape, and are never freed. We measured about 1 MB per shape for a 128-wide linear layer,
    3.5 MB with a 32k-vocabulary head, and 4 MB per sequence length in sdpa. A run whose lengths vary from
    batch to batch therefore grows by gigabytes (docs/performance.md). float32 and GPU kernels keep nothing
    per shape, so their lengths stay exact.
    """
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def model_rounds_shapes(model) -> bool:
    """:func:`rounds_shapes` for ``model``'s matmuls: its weights' dtype, or autocast's where enabled."""
    if not isinstance(model, torch.nn.Module):
        return False
    parameter = next(unwrap(model).parameters(), None)
    return parameter is not None and rounds_shapes(parameter.device, parameter.dtype)


_DROPOUT_MODULES = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0, as TRL's ``disable_dropout`` does; returns how
    many were non-zero.

    Two kinds exist in transformers: ``nn.Dropout`` modules (GPT-2's ``attn_pdrop``, ``resid_pdrop``,
    ``embd_pdrop``) and a float a module hands to its attention function in training mode only
    (``dropout=0.0 if not self.training else self.attention_dropout``, Llama and most others). With
    either left on, the policy's log-probs in training mode differ from the reference's (computed in
    eval mode) before any update, and are noisy. The saved config keeps the model's own values.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if "drop" in name and isinstance(value, float) and not isinstance(value, bool):
                changed += value > 0
                setattr(module, name, 0.0)
    return int(changed)

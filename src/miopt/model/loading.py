"""Loading models and tokenizers: any Hugging Face causal LM by path or id, or the built-in one.

Every model goes through ``AutoModelForCausalLM.from_pretrained(path_or_id)``; the name
``builtin`` means the embedded tiny model of :mod:`miopt.model.builtin` (freshly initialised), and
``builtin:arith`` the shipped start: that model trained on the built-in arithmetic task, a Hugging
Face folder inside the package (``miopt/assets/arith-start``, recipe in docs/experiments.md).
A ``.gguf`` file (``PATH/TO/FILE.gguf``, or ``owner/repo/FILE.gguf`` on the hub) is converted once to
a safetensors folder in the cache (:mod:`miopt.model.gguf`) and loaded from there. :func:`resolve_model`
turns such names into what ``from_pretrained`` takes; every command calls it, and
:func:`check_model_source` checks a name before any data or model is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from importlib.resources import files
from pathlib import Path

import torch

from miopt.errors import OptionError
from miopt.model import gguf
from miopt.run.ranks import local_rank

BUILTIN = "builtin"
BUILTIN_ARITH = "builtin:arith"
SHIPPED_MODELS = {BUILTIN_ARITH: "arith-start"}  # name -> folder under miopt/assets
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def shipped_model_dir(name: str = BUILTIN_ARITH) -> Path:
    """The package folder of a shipped model (through ``importlib.resources``, so an installed wheel
    finds it too)."""

    if name not in SHIPPED_MODELS:
        raise OptionError(f"unknown shipped model {name!r}; valid: {', '.join(SHIPPED_MODELS)}")
    folder = Path(str(files("miopt").joinpath("assets", SHIPPED_MODELS[name])))
    if not (folder / "config.json").is_file():
        raise OptionError(f"the shipped model {name!r} is missing from the package ({folder})")
    return folder


def resolve_model(path_or_id: str) -> str:
    """``builtin:arith`` (any name of ``SHIPPED_MODELS``) -> its package folder; a ``.gguf`` file -> its
    converted safetensors folder (converted on first use); others unchanged."""
    if path_or_id in SHIPPED_MODELS:
        return str(shipped_model_dir(path_or_id))
    if gguf.is_gguf(path_or_id):
        return str(gguf.to_folder(path_or_id))
    return path_or_id


def check_model_source(path_or_id: str | None) -> None:
    """Fail fast, before any data or model is loaded, on a model name that cannot load: a missing
    local path, a shipped name that is not in the package, a GGUF file that is not one (or the
    ``gguf`` package missing)."""
    if not path_or_id:
        return
    if path_or_id in SHIPPED_MODELS:
        shipped_model_dir(path_or_id)
    elif gguf.is_gguf(path_or_id):
        gguf.check(path_or_id)
    else:
        _check_exists(path_or_id)


def _check_exists(path_or_id: str) -> None:
    """Fail fast on a local-looking path that does not exist (before anything is written)."""
    if path_or_id == BUILTIN or Path(path_or_id).exists():
        return
    if not _HUB_ID.match(path_or_id) or path_or_id.startswith((".", "/", "~")):
        raise OptionError(f"model path {path_or_id!r} does not exist")


def load_tokenizer(path_or_id: str):
    """The tokenizer of ``path_or_id``, with a pad token (the EOS token when it has none)."""
    path_or_id = resolve_model(path_or_id)
    _check_exists(path_or_id)
    if path_or_id == BUILTIN:
        from miopt.model.builtin import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except OSError as error:
        raise OptionError(f"cannot load a tokenizer from {path_or_id!r}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_4bit_available() -> None:
    """4-bit loading needs bitsandbytes and a CUDA GPU; say which is missing."""

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is available")
    if missing:
        raise OptionError(f"--load-in-4bit needs bitsandbytes and a CUDA GPU: {'; '.join(missing)}")


def load_model(
    path_or_id: str, tokenizer=None, *, dtype: str | None = None, seed: int = 0, load_in_4bit: bool = False
):
    """``AutoModelForCausalLM.from_pretrained(path_or_id)``, or the built-in model for ``builtin``.

    ``load_in_4bit``: NF4 weights (bitsandbytes, QLoRA's recipe) computed in ``dtype`` (default
    bfloat16), placed whole on this process's GPU."""
    path_or_id = resolve_model(path_or_id)
    _check_exists(path_or_id)
    if load_in_4bit:
        check_4bit_available()
        if path_or_id == BUILTIN:
            raise OptionError("--load-in-4bit needs a saved model folder or hub id, not 'builtin'")
    if path_or_id == BUILTIN:
        from miopt.model.builtin import build_model, build_tokenizer

        return build_model(tokenizer or build_tokenizer(), seed=seed)
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype or "bfloat16"),
        )
        kwargs["device_map"] = {"": local_rank()}
    try:
        return AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    except OSError as error:
        raise OptionError(
            f"cannot load model {path_or_id!r}: not a local folder and the hub could not be reached ({error})"
        ) from error
    except ValueError as error:  # e.g. a config transformers does not recognise
        raise OptionError(f"cannot load model {path_or_id!r}: {error}") from error
    except Exception as error:  # noqa: BLE001 - a damaged weight file (SafetensorError, unpickling, ...)
        if not Path(path_or_id).exists():
            raise
        raise OptionError(
            f"cannot load model {path_or_id!r}: its weight files are damaged or unreadable "
            f"({type(error).__name__}: {error})"
        ) from error


def model_fingerprint(path_or_id: str, seed: int = 0) -> str:
    """Identifies a model's weights for caches: the built-in seed, a GGUF file's path, size and time,
    or the local folder's config and weight files (name, size, modification time), or the hub id."""
    if gguf.is_gguf(path_or_id):
        return gguf.fingerprint(path_or_id)
    path_or_id = resolve_model(path_or_id)
    digest = hashlib.sha256()
    path = Path(path_or_id)
    if path_or_id == BUILTIN:
        digest.update(f"builtin-seed{seed}".encode())
    elif path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in (".json", ".safetensors", ".bin") or file.name.endswith(".index.json"):
                stat = file.stat()
                digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        config = path / "config.json"
        if config.is_file():
            digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    else:
        digest.update(path_or_id.encode())
    return digest.hexdigest()[:16]

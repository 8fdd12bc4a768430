"""GGUF files in, plain safetensors folders out.

A model named ``PATH/TO/FILE.gguf`` (a local file, or ``owner/repo/FILE.gguf`` for a file in a hub
repository) is read once by transformers' GGUF support (``from_pretrained(folder, gguf_file=name)``,
which dequantises every tensor to float32), its weights are copied into a model built from the same
config without the GGUF quantizer (``save_pretrained`` refuses a model that still carries one), and
model and tokenizer are saved as a safetensors folder in the cache
(``$MIOPT_CACHE/gguf/<stem>-<fingerprint>/``). Every command then loads that folder, so the
dequantisation happens once per file, and whatever miopt saves afterwards is a folder that
``AutoModelForCausalLM.from_pretrained`` loads without miopt.

Reading GGUF needs the ``gguf`` package (``pip install 'miopt[gguf]'``); nothing here is imported by
users who never give a ``.gguf`` path.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

from miopt.errors import OptionError
from miopt.logprobs.reference import default_cache_dir
from miopt.run.atomic_io import atomic_directory, cache_lock, commit_directory

SUFFIX = ".gguf"
MAGIC = b"GGUF"  # the first four bytes of every GGUF file (GGUF specification, "File Structure")
COMPLETE = ".miopt-gguf-complete"  # written last into a converted folder
CONVERSION_FORMAT = 2  # part of the cache key: bump when the conversion changes
_HUB_FILE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+/[\w.-]+\.gguf$", re.IGNORECASE)


def is_gguf(path_or_id: str) -> bool:
    """Whether a ``--model`` value names a GGUF file (by its suffix)."""
    return str(path_or_id).lower().endswith(SUFFIX)


def split(spec: str) -> tuple[str, str]:
    """``FOLDER/FILE.gguf`` -> (``FOLDER``, ``FILE.gguf``): what ``from_pretrained(folder, gguf_file=)``
    takes. The folder is a local directory or a hub repository id."""
    path = Path(spec).expanduser()
    return str(path.parent), path.name


def _is_hub_file(spec: str) -> bool:
    return not Path(spec).expanduser().exists() and bool(_HUB_FILE.match(spec))


def check_available() -> None:
    """Fail with the extra to install when the ``gguf`` package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise OptionError(
            "reading a .gguf model needs the 'gguf' package: pip install 'miopt[gguf]' (or pip install gguf)"
        )


def check(spec: str) -> None:
    """Cheap checks before any work: the package is installed, and a local file exists and starts
    with the GGUF magic bytes."""
    check_available()
    if _is_hub_file(spec):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise OptionError(f"GGUF file {spec!r} does not exist")
    if not path.is_file():
        raise OptionError(f"GGUF model {spec!r} is not a file")
    with path.open("rb") as handle:
        head = handle.read(len(MAGIC))
    if head != MAGIC:
        raise OptionError(
            f"{path}: not a GGUF file (it starts with {head!r}; a GGUF file starts with {MAGIC!r})"
        )


def fingerprint(spec: str) -> str:
    """Identifies a GGUF file for caches: its resolved path, size and modification time (or the hub
    name), and the conversion format."""
    digest = hashlib.sha256(f"gguf-conversion-{CONVERSION_FORMAT}".encode())
    path = Path(spec).expanduser()
    if path.is_file():
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        digest.update(spec.encode())
    return digest.hexdigest()[:16]


def converted_dir(spec: str, cache_dir: str | Path | None = None) -> Path:
    """Where the converted folder of ``spec`` lives (whether or not it exists yet)."""

    stem = Path(spec).name[: -len(SUFFIX)]
    return Path(cache_dir or default_cache_dir()) / "gguf" / f"{stem}-{fingerprint(spec)}"


def to_folder(spec: str, cache_dir: str | Path | None = None) -> Path:
    """The safetensors folder converted from the GGUF file ``spec``, converting it on first use.

    The folder is written to a temporary sibling and renamed into place when complete, under a lock,
    so concurrent or interrupted conversions never leave a half-written folder behind."""
    check(spec)
    final = converted_dir(spec, cache_dir)
    if (final / COMPLETE).is_file():
        return final
    with cache_lock(final):
        if (final / COMPLETE).is_file():
            return final
        print(f"[miopt] converting {spec} to a safetensors folder (once): {final}", file=sys.stderr)
        temporary = atomic_directory(final)
        try:
            _convert(spec, temporary)
            (temporary / COMPLETE).write_text(spec + "\n")
            commit_directory(temporary, final)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return final


def _read(spec: str):
    """Model and tokenizer through transformers' GGUF reader; its errors become located ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = split(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except OSError as error:
        raise OptionError(f"cannot read GGUF model {spec!r}: {error}") from None
    except ValueError as error:  # transformers: "GGUF model with architecture X is not supported yet"
        if "not supported" in str(error).lower():
            raise OptionError(f"{spec}: unsupported GGUF model: {error}") from None
        raise OptionError(f"{spec}: damaged or unreadable GGUF file ({error})") from None
    except Exception as error:  # noqa: BLE001 - the gguf reader fails on truncated or corrupt files
        raise OptionError(
            f"{spec}: damaged or unreadable GGUF file ({type(error).__name__}: {error})"
        ) from None
    return model, tokenizer


def _convert(spec: str, folder: Path) -> None:
    """Read ``spec``, copy its weights into a plain model of the same config, save both into ``folder``."""
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = _read(spec)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = (
        {name for name in missing if name.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    )
    if set(missing) - tied or unexpected:
        raise OptionError(
            f"{spec}: the GGUF tensors do not match the {type(plain).__name__} they describe "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    if getattr(gguf_model, "generation_config", None) is not None:
        plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _drop_tokens_past_vocab(folder / "tokenizer.json", config.vocab_size)


def _drop_tokens_past_vocab(tokenizer_file: Path, vocab_size: int) -> None:
    """Remove added tokens that have no embedding row. transformers' byte-level GGUF tokenizer adds
    GPT-2's ``<|endoftext|>`` when the file's vocabulary lacks it, at id ``vocab_size``: a text holding
    that string would then index past the embedding matrix."""
    if not tokenizer_file.is_file():
        return
    state = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    added = state.get("added_tokens") or []
    kept = [token for token in added if token["id"] < vocab_size]
    if len(kept) < len(added):
        state["added_tokens"] = kept
        tokenizer_file.write_text(json.dumps(state, ensure_ascii=False, indent=2), encoding="utf-8")

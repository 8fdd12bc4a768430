"""Response log-probabilities: the forward pass and its chunked head (``forward``), batch layouts
(``packing``), the cached reference (``reference``), and the LD-DPO and WPO inputs.

``miopt.logprobs.sequence_logps`` and the other names of ``forward`` stay importable from here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


def __getattr__(name: str) -> Any:
    # lazy, so that importing a submodule (``packing``) does not load the forward pass and its torch
    # a submodule's name is left to the import system (``from miopt.online import verifiers``)
    if not name.startswith("__") and not (Path(__file__).parent / f"{name}.py").exists():
        module = importlib.import_module("miopt.logprobs.forward")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'miopt.logprobs' has no attribute {name!r}")

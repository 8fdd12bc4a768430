"""Online training with verifiable rewards (``miopt online``): rounds of sample -> score -> pair ->
update (``rounds``), their options, pairing rules, scorers, verifiers and run folder.

``miopt.online.run_online`` and the other names of ``rounds`` stay importable from here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


def __getattr__(name: str) -> Any:
    # lazy, so that importing ``miopt.online.verifiers`` does not load the whole online job
    # a submodule's name is left to the import system (``from miopt.online import verifiers``)
    if not name.startswith("__") and not (Path(__file__).parent / f"{name}.py").exists():
        module = importlib.import_module("miopt.online.rounds")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'miopt.online' has no attribute {name!r}")

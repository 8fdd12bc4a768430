"""miopt: preference alignment of language models by mutual-information optimisation.

The package's rooms (docs/architecture.md): ``objectives`` (the maths), ``logprobs``, ``model``,
``data``, ``tasks``, ``run`` (the loop and its files), ``training``, ``online``, ``evaluation``,
``experiments``, ``commands`` and ``cli``.

Modules that lived at the top level before 0.2 (``miopt.train``, ``miopt.loop``, ``miopt.models``,
...) are still importable under their old names, as the same module objects, with a
``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

# old top-level module -> its home now
MOVED_MODULES = {
    "models": "model.loading",
    "modeling": "model.modeling",
    "builtin": "model.builtin",
    "attention": "model.attention",
    "gguf": "model.gguf",
    "fetch": "model.fetch",
    "packing": "logprobs.packing",
    "reference": "logprobs.reference",
    "length_desensitised": "logprobs.length_desensitised",
    "weighted_pairs": "logprobs.weighted_pairs",
    "loop": "run.loop",
    "engine": "run.engine",
    "checkpoint": "run.checkpoint",
    "atomic_io": "run.atomic_io",
    "run_folder": "run.run_folder",
    "metrics_sink": "run.metrics_sink",
    "trackers": "run.trackers",
    "plots": "run.plots",
    "preemption": "run.preemption",
    "data_order": "run.data_order",
    "train": "training.preference",
    "preference_step": "training.preference_step",
    "unpaired_training": "training.unpaired",
    "sft": "training.sft",
    "reward": "training.reward",
    "option_checks": "training.option_checks",
    "objective_flags": "training.objective_flags",
    "online_options": "online.options",
    "online_output": "online.output",
    "online_pairs": "online.pairs",
    "online_scoring": "online.scoring",
    "verifiers": "online.verifiers",
    "default_run": "experiments.default_run",
    "toy": "experiments.toy",
    "gsm8k_model": "experiments.gsm8k_model",
    "compare": "experiments.compare",
}


def _new_name(fullname: str) -> str | None:
    """``miopt.compare.runs`` -> ``miopt.experiments.compare.runs``; None for a name that did not move."""
    parts = fullname.split(".")
    if len(parts) < 2 or parts[0] != __name__ or parts[1] not in MOVED_MODULES:
        return None
    return ".".join([__name__, MOVED_MODULES[parts[1]], *parts[2:]])


def names_of(package: str, module: str):
    """A package's ``__getattr__`` that hands out the names of its submodule ``module`` (the module that
    stood where the package now is), imported on first use so that importing a sibling submodule does
    not load it; a submodule's own name is left to the import system."""
    folder = Path(sys.modules[package].__file__).parent

    def __getattr__(name: str):
        if not name.startswith("__") and not (folder / f"{name}.py").exists():
            target = importlib.import_module(f"{package}.{module}")
            if hasattr(target, name):
                return getattr(target, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new_name}; import it from there", DeprecationWarning, stacklevel=2
        )
        return importlib.import_module(self.new_name)

    def exec_module(self, module: ModuleType) -> None:
        """The module was executed under its new name; the old name is only bound to it."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the pre-0.2 flat names to the same module objects under their new names."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        new_name = _new_name(fullname)
        if new_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(new_name))


# first on the path: otherwise ``miopt.compare.runs`` would be found again as a file under the alias
# ``miopt.compare``'s folder and run a second time
if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())

"""The package's layering: no import cycles (function-local imports included), no private transformers
attention mapping, and every Accelerate ``Accelerator`` made by ``run.engine.make_accelerator``."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """miopt modules ``name`` imports anywhere in its file (top level or inside functions). Importing
    a package's submodule (``from miopt.evaluation import answers``) counts as the submodule only."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(modules)
            found |= submodules or {base}
    return {target for target in found if target in modules and target != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    result = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return result


def test_no_import_cycles_even_through_function_local_imports():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    for name in graph:
        graph[name] = {
            t for t in graph[name] if not t.startswith(name + ".") and not name.startswith(t + ".")
        }
    assert (
        graph["miopt.logprobs.forward"] and graph["miopt.logprobs.packing"]
    )  # the graph is not empty by mistake
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_attention_mapping_and_accelerators_from_make_accelerator():
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        assert "_global_mapping" not in text, path
        if path.name != "engine.py":  # where make_accelerator lives
            assert "Accelerator(" not in text, path


def test_eval_loads_through_the_one_model_loader(monkeypatch, tokenizer):
    import miopt.model.loading as models
    from miopt.commands.evaluate import load_model

    calls = []
    original = models.load_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    model, loaded_tokenizer = load_model("builtin", device="cpu")
    assert calls == ["builtin"] and loaded_tokenizer.pad_token_id is not None
    assert model.config.vocab_size == len(tokenizer)


def test_only_the_entry_points_sit_outside_a_package():
    top = sorted(path.name for path in (SOURCE / "miopt").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "config.py", "errors.py"]


def test_moved_modules_import_under_their_old_names_as_the_same_module():
    import importlib
    import warnings

    import miopt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_train = importlib.import_module("miopt.train")
        old_runs = importlib.import_module("miopt.compare.runs")
    from miopt.experiments.compare import runs
    from miopt.training import preference

    assert old_train is preference and old_runs is runs
    assert any("miopt.training.preference" in str(w.message) for w in caught)
    assert all(w.category is DeprecationWarning for w in caught)
    for old, new in miopt.MOVED_MODULES.items():  # every old name leads somewhere real
        assert (SOURCE / "miopt" / (new.replace(".", "/") + ".py")).is_file() or (
            SOURCE / "miopt" / new.replace(".", "/") / "__init__.py"
        ).is_file(), old
    from miopt.logprobs import sequence_logps
    from miopt.logprobs.forward import sequence_logps as forward_sequence_logps

    assert sequence_logps is forward_sequence_logps


def test_no_function_is_longer_than_a_reader_holds_in_their_head():
    long = []
    for path in (SOURCE / "miopt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.name}")
    assert long == []

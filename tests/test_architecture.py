"""The package's shape (ARCHITECTURE.md): every module imports, and no two modules import each other.

An import cycle makes the result depend on which module is imported first, and it is what pulled
unrelated code (checkpoint.py, with ``torch.load``) into exported transformers folders, whose code
is chosen by following imports. The graph is read from the sources with :mod:`ast`.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "pldr_llm"
# Extras that some modules need; a module that fails to import only for want of one is skipped.
OPTIONAL = {"matplotlib", "transformers", "lm_eval", "tensorboard", "fastapi", "uvicorn"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package __init__)}`` of every module under src/pldr_llm."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _imports(tree: ast.Module, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements: all of them, or only those run when the module is imported."""
    if not module_level:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found: list[ast.Import | ast.ImportFrom] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # never executed
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def import_graph(module_level: bool) -> dict[str, set[str]]:
    """``{module: the package modules it imports}`` (``from a import b`` names ``a.b`` if a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), module_level):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                candidates = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            targets.update(t for t in candidates if t in modules and t != name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_the_package() -> None:
    graph = import_graph(module_level=True)
    assert len(graph) > 50
    assert "pldr_llm.model.plga" in graph["pldr_llm.model.model"]
    assert "pldr_llm.model.state_dict" in graph["pldr_llm.model.model"]


def test_no_import_cycle_at_module_level() -> None:
    assert find_cycle(import_graph(module_level=True)) is None


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    """A deferred import that closes a cycle still ties two modules to each other."""
    assert find_cycle(import_graph(module_level=False)) is None


@pytest.mark.parametrize("name", sorted(set(_modules()) - {"pldr_llm.__main__"}))  # runs the CLI
def test_every_module_imports(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {exc.name}")
        raise


def test_exported_model_code_carries_only_the_model() -> None:
    """A transformers folder's code: the model, its config and tokenizer -- no training, no CLI,
    no original-format checkpoint reader."""
    from pldr_llm.hf.code_bundle import build_from_package

    files = set(build_from_package())
    assert {"modeling_pldrllm.py", "pldr_model_model.py", "pldr_model_plga.py"} <= files
    for name in files:
        assert not name.startswith(("pldr_train", "pldr_commands", "pldr_serve", "pldr_deductive"))
    assert "pldr_checkpoint.py" not in files and "pldr_bundle.py" not in files
    # Nor the tokenizer package (the folder's tokenizer class stands alone), nor the generation
    # package's front door, which would pull in every user call.
    assert "pldr_tokenizer.py" not in files and "pldr_generation.py" not in files

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
    assert "pldr_llm.core.plga" in graph["pldr_llm.core.model"]
    assert "pldr_llm.core.state_dict" in graph["pldr_llm.core.model"]


@pytest.mark.slow
def test_no_import_cycle_at_module_level() -> None:
    assert find_cycle(import_graph(module_level=True)) is None


@pytest.mark.slow
def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    """A deferred import that closes a cycle still ties two modules to each other."""
    assert find_cycle(import_graph(module_level=False)) is None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(_modules()) - {"pldr_llm.__main__"}))  # runs the CLI
def test_every_module_imports(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {exc.name}")
        raise


def test_the_core_imports_only_its_own_modules_and_only_relatively() -> None:
    """What lets an exported transformers folder carry the core's files unchanged: its modules
    import each other as ``from .x import y`` and nothing else of the package (ARCHITECTURE.md)."""
    from pldr_llm.core.code_bundle import sibling_imports

    core = SRC / PACKAGE / "core"
    names = {p.stem for p in core.glob("*.py")}
    for path in sorted(core.glob("*.py")):
        assert sibling_imports(path.name, path.read_text(encoding="utf-8")) <= names, path.name


# core/'s rows in ARCHITECTURE.md: a flat folder, so its layers are an order of its modules.
CORE_ROWS = (
    {"errors", "fileio", "config"},
    {"rope", "layers", "plga", "cache", "state_dict", "losses", "model", "variants", "compile"}
    | {"fused", "fused_kernels"},
    {"sampling", "processing", "graphs", "text", "generate", "engine", "engine_cache"}
    | {"decode_buffers", "decode_step", "step_graphs", "step_output", "slots", "reference_loop"}
    | {"engine_options", "metric_graphs"},
    {"hf_folder", "configuration_pldrllm", "modeling_pldrllm", "tokenization_pldrllm"}
    | {"continuations", "hf_static_cache"}
    | {"code_bundle"},
)


@pytest.mark.slow
def test_the_core_rows_import_only_their_own_row_or_the_rows_above() -> None:
    graph = import_graph(module_level=False)
    core = {p.stem for p in (SRC / PACKAGE / "core").glob("*.py")} - {"__init__"}
    assert set().union(*CORE_ROWS) == core  # a new core module takes its place in a row
    for index, row in enumerate(CORE_ROWS):
        allowed = set().union(*CORE_ROWS[: index + 1])
        for name in row:
            imported = {m.rpartition(".")[2] for m in graph[f"{PACKAGE}.core.{name}"]}
            assert imported <= allowed, (name, imported - allowed)


@pytest.mark.slow
def test_exported_model_code_carries_only_the_model() -> None:
    """A transformers folder's code: the model, its config, tokenizer and decoding loop -- no
    training, no CLI, no original-format checkpoint reader, no compile helpers."""
    from pldr_llm.core.code_bundle import code_files

    files = set(code_files())
    core = {p.name for p in (SRC / PACKAGE / "core").glob("*.py")}
    assert files <= core
    assert {"modeling_pldrllm.py", "configuration_pldrllm.py", "tokenization_pldrllm.py"} <= files
    assert {"model.py", "plga.py", "engine.py", "code_bundle.py"} <= files
    # Not needed by the model: the package's front door, per-layer compile, the variants' helpers.
    assert not {"__init__.py", "compile.py", "variants.py"} & files


def test_the_size_counter_counts_from_def_to_last_line(tmp_path: Path) -> None:
    from sizes import over_limit, units

    body = "\n".join(f"        x{i} = {i}" for i in range(100))  # 100 lines under the def
    (tmp_path / "m.py").write_text(
        f"class C:\n    @staticmethod\n    def f():\n{body}\n\n\ndef g():\n    pass\n"
    )
    found = {u.name: (u.kind, u.lines) for u in units(tmp_path)}
    assert found == {
        "m.py": ("module", 107),
        "m.py:C": ("class", 103),  # the class line, the decorator, the def and its 100 lines
        "m.py:C.f": ("function", 101),
        "m.py:g": ("function", 2),
    }
    assert [u.name for u in over_limit(units(tmp_path))] == ["m.py:C.f"]


def test_no_function_over_100_lines_and_no_class_over_400() -> None:
    """Each unit small enough to read in one sitting (issue 26), in all of src/."""
    from sizes import over_limit, units

    assert not over_limit(units()), over_limit(units())


def test_every_module_over_500_lines_says_why_in_the_architecture() -> None:
    """ARCHITECTURE.md's "Modules over 500 lines, and why" names exactly the modules over 500."""
    from sizes import ARCHITECTURE, MODULE_LIMIT, explained_modules, units

    over = {u.name for u in units() if u.kind == "module" and u.lines > MODULE_LIMIT}
    explained = explained_modules(ARCHITECTURE.read_text(encoding="utf-8"))
    assert over - explained == set(), "add a line saying why"
    assert explained - over == set(), "now under the limit: remove its line"


def test_the_size_table_in_the_architecture_is_current() -> None:
    from sizes import ARCHITECTURE, table, table_in, units

    assert table_in(ARCHITECTURE.read_text(encoding="utf-8")) == table(units()), (
        "run: python tests/sizes.py --write"
    )

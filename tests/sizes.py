"""Sizes of src/'s modules, classes and functions, and ARCHITECTURE.md's table of the largest.

``python tests/sizes.py`` prints the table; ``python tests/sizes.py --write`` puts it in
ARCHITECTURE.md between its ``sizes`` markers. tests/test_architecture.py checks the limits
(a function 100 lines, a class 400, a module 500 unless ARCHITECTURE.md says why) and that the
table is current. A unit's lines run from its ``def``/``class`` line (decorators not counted)
to its last line (:mod:`ast`'s ``end_lineno``), docstring and comments included.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "pldr_llm"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
FUNCTION_LIMIT = 100
CLASS_LIMIT = 400
MODULE_LIMIT = 500
#: rows of each kind in the table
TABLE_ROWS = 8
BEGIN, END = "<!-- sizes:begin -->", "<!-- sizes:end -->"


@dataclass(frozen=True)
class Unit:
    """A module, class or function of src/pldr_llm and its length in lines."""

    kind: str  # "module", "class" or "function"
    name: str  # "core/model.py", "core/model.py:PLDRModel", "core/model.py:PLDRModel.forward"
    lines: int


def _units_of(relative: str, tree: ast.AST, prefix: str) -> list[Unit]:
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            qualified = f"{prefix}{node.name}"
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            found.append(Unit(kind, f"{relative}:{qualified}", lines))
            found += _units_of(relative, node, f"{qualified}.")
        elif not isinstance(node, (ast.expr, ast.expr_context)):
            found += _units_of(relative, node, prefix)  # e.g. a def inside an if/try block
    return found


@lru_cache(maxsize=4)  # three tests read the same tree
def units(package_dir: Path = PACKAGE_DIR) -> list[Unit]:
    """Every module, class and function (nested ones too) under ``package_dir``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir).as_posix()
        text = path.read_text(encoding="utf-8")
        found.append(Unit("module", relative, len(text.splitlines())))
        found += _units_of(relative, ast.parse(text), "")
    return found


def over_limit(found: list[Unit]) -> list[Unit]:
    """The classes and functions longer than their limit."""
    limits = {"class": CLASS_LIMIT, "function": FUNCTION_LIMIT}
    return [u for u in found if u.kind in limits and u.lines > limits[u.kind]]


def explained_modules(architecture: str) -> set[str]:
    """The modules ARCHITECTURE.md's "Modules over 500 lines, and why" names (``- `path`: ...``)."""
    section = architecture.split("## Modules over 500 lines, and why", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^- `([^`]+\.py)`:", section, flags=re.MULTILINE))


def table(found: list[Unit]) -> str:
    """The markdown table of the largest modules, classes and functions."""
    rows = ["| kind | largest (lines) |", "| --- | --- |"]
    for kind, limit in (("module", MODULE_LIMIT), ("class", CLASS_LIMIT)):
        rows.append(_row(found, kind, limit))
    rows.append(_row(found, "function", FUNCTION_LIMIT))
    return "\n".join(rows)


def _row(found: list[Unit], kind: str, limit: int) -> str:
    largest = sorted((u for u in found if u.kind == kind), key=lambda u: (-u.lines, u.name))
    cells = ", ".join(f"`{u.name}` {u.lines}" for u in largest[:TABLE_ROWS])
    return f"| {kind} (limit {limit}) | {cells} |"


def table_in(architecture: str) -> str:
    """The table now between ARCHITECTURE.md's markers."""
    return architecture.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update ARCHITECTURE.md's table")
    args = parser.parse_args()
    current = table(units())
    if not args.write:
        print(current)
        return 0
    text = ARCHITECTURE.read_text(encoding="utf-8")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    ARCHITECTURE.write_text(f"{before}{BEGIN}\n{current}\n{END}{after}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

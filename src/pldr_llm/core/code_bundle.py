"""The Python files a saved transformers folder carries, so it loads with ``trust_remote_code``.

A folder written by :func:`pldr_llm.hf.export.export_hf` (or by ``save_pretrained`` of a
:class:`PldrllmForCausalLM`) holds, besides the weights, the code of the model: the three
transformers modules and the core modules they import (the configuration, the decoder, PLGA,
the caches, rotary embedding, the decoding loop, errors). With that code,
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works where the
``pldr_llm`` package is not installed.

The files are this package's own, copied unchanged: every module of :mod:`pldr_llm.core`
imports its siblings only as ``from .name import ...`` and nothing else from ``pldr_llm``, which
is the one form transformers' dynamic-module loader follows (it copies a folder's flat files and
their relative imports). Which files: the three transformers modules and every module they reach
through those imports, found with :mod:`ast` (imports inside functions included, as transformers'
line scan finds them too). The same code runs where this module was itself loaded from a
folder: the files beside it are then that folder's code.

This module uses the standard library only and is part of the copied code itself.
"""

import ast
import re
from pathlib import Path

from .fileio import atomic_write_text

# The modules a model folder needs, by role; their relative imports are followed from here.
ROOT_MODULES = ("configuration_pldrllm", "modeling_pldrllm", "tokenization_pldrllm")
# auto_map entries (file name without .py, then class name) written into the folder's json files.
AUTO_MAP_CONFIG = {
    "AutoConfig": "configuration_pldrllm.PldrllmConfig",
    "AutoModel": "modeling_pldrllm.PldrllmModel",
    "AutoModelForCausalLM": "modeling_pldrllm.PldrllmForCausalLM",
}
AUTO_MAP_TOKENIZER = {"AutoTokenizer": ["tokenization_pldrllm.PldrllmTokenizer", None]}

# transformers reads a file's imports with line regexes, docstrings included: absolute imports
# must be installed packages (check_imports), and relative ones name the files to copy.
_PACKAGE_LINE = re.compile(r"^\s*(?:from|import)\s+pldr_llm(?:[.\s]|$)", re.MULTILINE)
_RELATIVE_LINE = re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE)


class CodeBundleError(RuntimeError):
    """The core's sources cannot be carried, unchanged, by a model folder."""


def sibling_imports(name: str, source: str) -> set[str]:
    """The sibling modules ``source`` (the file ``name``) imports, as transformers will find them.

    Raises :class:`CodeBundleError` for any import a flat folder cannot satisfy: one of
    ``pldr_llm`` (not installed where the folder is used), a parent-package import
    (``from ..x``), ``from . import x`` (transformers does not follow it), or a line that
    transformers' scan would read as an import that the code does not make.
    """
    tree = ast.parse(source, filename=name)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pldr_llm":
                    raise CodeBundleError(f"{name} line {node.lineno}: 'import {alias.name}'")
        elif isinstance(node, ast.ImportFrom):
            where = f"{name} line {node.lineno}"
            if node.level == 0 and (node.module or "").split(".")[0] == "pldr_llm":
                raise CodeBundleError(f"{where}: imports pldr_llm; use 'from .<module> import'")
            if node.level > 1 or (node.level == 1 and (not node.module or "." in node.module)):
                raise CodeBundleError(f"{where}: only 'from .<module> import ...' can be carried")
            if node.level == 1 and node.module:  # (a module: checked above)
                found.add(node.module)
    if (line := _PACKAGE_LINE.search(source)) is not None:
        raise CodeBundleError(
            f"{name}: the line {line.group(0).strip()!r} (code or docstring) would make "
            "transformers require pldr_llm where the folder is used"
        )
    if stray := set(_RELATIVE_LINE.findall(source)) - found:
        raise CodeBundleError(f"{name}: a docstring line reads as an import of {sorted(stray)}")
    return found


def code_files(directory: str | Path | None = None) -> dict[str, str]:
    """``{file name: source}`` of the modules a model folder needs, read unchanged from
    ``directory`` (default: the folder of this file, the core package or a loaded folder)."""
    here = Path(directory) if directory is not None else Path(__file__).resolve().parent
    files: dict[str, str] = {}
    pending = list(ROOT_MODULES)
    while pending:
        module = pending.pop()
        if f"{module}.py" in files:
            continue
        path = here / f"{module}.py"
        if not path.is_file():
            if module in ROOT_MODULES:
                # In a folder loaded by transformers, each auto class's module sits with its own
                # imports in a cache folder of its own; the tokenizer's file is then elsewhere,
                # and transformers saves it with the tokenizer.
                continue
            raise CodeBundleError(f"{path} is missing: the model folder's code is incomplete")
        source = path.read_text(encoding="utf-8")
        files[path.name] = source
        pending.extend(sorted(sibling_imports(path.name, source)))
    return dict(sorted(files.items()))


def write_code_files(directory: str | Path) -> list[Path]:
    """Write the model's code files into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in code_files().items():
        path = directory / name
        atomic_write_text(path, text)  # an export may replace an older copy
        written.append(path)
    return written

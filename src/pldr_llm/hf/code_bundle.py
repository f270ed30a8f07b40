"""The Python files a saved transformers folder carries, so it loads with ``trust_remote_code``.

A folder written by :func:`pldr_llm.hf.export.export_hf` (or by ``save_pretrained`` of a
:class:`PldrllmForCausalLM`) holds, besides the weights, the code of the model: the three
transformers classes and the few core modules they import (the configuration, the decoder, PLGA,
the caches, rotary embedding, errors). With that code, ``AutoModelForCausalLM.from_pretrained(
folder, trust_remote_code=True)`` works where the ``pldr_llm`` package is not installed.

Design: the copies are *built* from the package sources when a folder is saved, never written by
hand, so there is one implementation of the model. The build starts from the three transformers
modules, follows every ``from pldr_llm.X import ...`` statement (with :mod:`ast`, including
imports inside functions), and writes each module it reaches as one flat file, its ``pldr_llm``
imports rewritten to relative ones (``from pldr_llm.model.plga import ...`` becomes
``from .pldr_model_plga import ...``): transformers' dynamic-module loader copies a folder's files
and their relative imports, and it refuses absolute imports of packages that are not installed.
Any other use of ``pldr_llm`` (``import pldr_llm``, ``from pldr_llm import X``) in those modules is
an error at build time, not a broken folder later.

When the running code is itself such a copy (a model loaded with ``trust_remote_code`` and saved
again), the files are copied from where it was loaded, unchanged.

This module uses the standard library only and is part of the copied code itself.
"""

import ast
import importlib.util
import re
from pathlib import Path

PACKAGE = "pldr_llm"
HF_PACKAGE = "pldr_llm.hf"
# The modules a model folder needs, by role; their pldr_llm imports are followed from here.
ROOT_MODULES = (
    "pldr_llm.hf.configuration_pldrllm",
    "pldr_llm.hf.modeling_pldrllm",
    "pldr_llm.hf.tokenization_pldrllm",
)
# auto_map entries (file name without .py, then class name) written into the folder's json files.
AUTO_MAP_CONFIG = {
    "AutoConfig": "configuration_pldrllm.PldrllmConfig",
    "AutoModelForCausalLM": "modeling_pldrllm.PldrllmForCausalLM",
}
AUTO_MAP_TOKENIZER = {"AutoTokenizer": ["tokenization_pldrllm.PldrllmTokenizer", None]}

# transformers' own scan (check_imports) reads import statements with line regexes, even inside
# docstrings, so a leftover must be caught the same way.
_LEFTOVER = re.compile(rf"^\s*(?:from|import)\s+{PACKAGE}(?:[.\s]|$)", re.MULTILINE)


class CodeBundleError(RuntimeError):
    """The package sources cannot be turned into a self-contained model folder."""


def flat_name(module: str) -> str:
    """File stem of ``module`` in a folder (``pldr_llm.model.plga`` -> ``pldr_model_plga``)."""
    if module.startswith(HF_PACKAGE + "."):
        return module[len(HF_PACKAGE) + 1 :].replace(".", "_")
    if module == PACKAGE or not module.startswith(PACKAGE + "."):
        raise CodeBundleError(f"{module!r} is not a module of {PACKAGE}")
    return "pldr_" + module[len(PACKAGE) + 1 :].replace(".", "_")


def _source_of(module: str) -> tuple[Path, str]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise CodeBundleError(f"cannot find the source file of {module}")
    path = Path(spec.origin)
    return path, path.read_text(encoding="utf-8")


def _package_imports(module: str, source: str) -> tuple[set[str], list[int]]:
    """The pldr_llm modules ``source`` imports, and the line numbers of those import statements."""
    tree = ast.parse(source, filename=module)
    found: set[str] = set()
    lines: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    raise CodeBundleError(
                        f"{module} line {node.lineno}: 'import {alias.name}' cannot be bundled; "
                        "use 'from pldr_llm.<module> import <name>'"
                    )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == PACKAGE:
                raise CodeBundleError(
                    f"{module} line {node.lineno}: 'from pldr_llm import ...' pulls in the whole "
                    "package; import from the defining module instead"
                )
            if node.module.startswith(PACKAGE + "."):
                found.add(node.module)
                lines.append(node.lineno)
    return found, lines


def _rewrite(module: str, source: str, lines: list[int]) -> str:
    out = source.splitlines(keepends=True)
    for lineno in lines:
        line = out[lineno - 1]
        match = re.match(rf"(\s*from\s+)({PACKAGE}(?:\.\w+)+)(\s+import\b.*)", line, re.DOTALL)
        if match is None:
            raise CodeBundleError(
                f"{module} line {lineno}: unexpected import layout: {line.strip()}"
            )
        out[lineno - 1] = f"{match.group(1)}.{flat_name(match.group(2))}{match.group(3)}"
    text = "".join(out)
    leftover = _LEFTOVER.search(text)
    if leftover is not None:
        raise CodeBundleError(
            f"{module}: a line still names {PACKAGE} after rewriting "
            f"({leftover.group(0).strip()!r}); "
            "transformers would refuse the folder without the package installed"
        )
    return text


def build_from_package() -> dict[str, str]:
    """``{file name: source}`` of every module a model folder needs, built from the package."""
    files: dict[str, str] = {}
    pending = list(ROOT_MODULES)
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        _, source = _source_of(module)
        imports, lines = _package_imports(module, source)
        files[flat_name(module) + ".py"] = _rewrite(module, source, lines)
        pending.extend(sorted(imports - seen))
    return dict(sorted(files.items()))


def _running_from_package() -> bool:
    return __name__.startswith(HF_PACKAGE + ".")


def code_files() -> dict[str, str]:
    """The code files of a model folder: built from the package, or copied from a loaded folder."""
    if _running_from_package():
        return build_from_package()
    # A copy loaded by transformers: the files beside this one are the folder's code. transformers
    # copies each auto class's module with its relative imports into its own cache folder, so
    # the tokenizer's file may live elsewhere (transformers saves it with the tokenizer).
    here = Path(__file__).resolve().parent
    names = [flat_name(m) + ".py" for m in ROOT_MODULES] + ["code_bundle.py"]
    names += sorted(p.name for p in here.glob("pldr_*.py"))
    return {
        name: (here / name).read_text(encoding="utf-8")
        for name in dict.fromkeys(names)
        if (here / name).is_file()
    }


def write_code_files(directory: str | Path) -> list[Path]:
    """Write the model's code files into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in code_files().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written

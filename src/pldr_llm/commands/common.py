"""Pieces shared by the subcommands that load a model: its options, prompt files, logging."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pldr_llm.errors import PLDRError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--tokenizer`` (used with models)."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)"
    )
    p.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer instead of the model's")


def log(args: argparse.Namespace, message: str) -> None:
    """A ``pldr-llm: ...`` line on stderr unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(f"pldr-llm: {message}", file=sys.stderr, flush=True)


def read_prompt_lines(prompt_file: str) -> list[str]:
    """The non-blank lines of a prompt file (``-``: standard input), one prompt each."""
    if prompt_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(prompt_file)
        if not path.is_file():
            raise PLDRError(f"prompt file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PLDRError(f"prompt file {path} is not UTF-8 text") from None
    return [line for line in text.splitlines() if line.strip()]


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str]:
    """The ``--prompt`` texts (in order), then the lines of ``--prompt-file``."""
    out = list(prompts or [])
    if prompt_file is not None:
        out.extend(read_prompt_lines(prompt_file))
    return out

"""Pieces shared by the subcommands that load a model: its options, prompt files, logging."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pldr_llm.core.errors import PLDRError


def add_model_arguments(p: argparse.ArgumentParser, model: bool = True) -> None:
    """``--model`` (required; ``model=False`` where the command names its model another way),
    ``--device``, ``--dtype`` and ``--tokenizer``: the options of a command that runs a model."""
    if model:
        p.add_argument(
            "--model", "-m", required=True, metavar="X", help="model folder or hub repo id"
        )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)"
    )
    p.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer instead of the model's")


def add_prompt_arguments(
    p: argparse.ArgumentParser, prompt_help: str, file_help: str, ids: bool = False
) -> None:
    """``--prompt`` (repeatable), ``--prompt-file`` and, with ``ids``, ``--prompt-ids``: the
    prompts of a command that runs a model (read back by :func:`read_prompts`)."""
    p.add_argument(
        "--prompt", "-p", action="append", default=None, metavar="TEXT", help=prompt_help
    )
    p.add_argument("--prompt-file", metavar="FILE", help=file_help)
    if ids:
        p.add_argument(
            "--prompt-ids",
            action="append",
            default=None,
            metavar="IDS",
            help="a prompt as token ids, e.g. '12 7 99' or '12,7,99' (repeatable; no tokenizer "
            "needed)",
        )


def options_for(function: Callable[..., Any], args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options named like ``function``'s keyword parameters (give an option the
    parameter's name as its ``dest``), so that a command passes them on without listing each."""
    names = inspect.signature(function).parameters
    return {name: value for name, value in vars(args).items() if name in names}


def log(args: argparse.Namespace, message: str) -> None:
    """A ``pldr-llm: ...`` line on stderr unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(f"pldr-llm: {message}", file=sys.stderr, flush=True)


def read_prompt_lines(prompt_file: str) -> list[str]:
    """The non-blank lines of a prompt file (``-``: standard input), one prompt each."""
    if prompt_file == "-":
        text = sys.stdin.read()
    else:
        text = read_text_file(prompt_file, "prompt file")
    return [line for line in text.splitlines() if line.strip()]


def read_text_file(name: str, what: str) -> str:
    """The UTF-8 text of file ``name``; ``what`` names it in the one-line error (a folder, a
    missing file, or the first byte that is not UTF-8 and where it is)."""
    path = Path(name)
    if path.is_dir():
        raise PLDRError(f"{what} {path} is a directory; give a text file")
    if not path.is_file():
        raise PLDRError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PLDRError(
            f"{what} {path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start} ({exc.reason})"
        ) from None


def read_prompts(
    prompts: Sequence[str] | None, prompt_file: str | None, required: bool = False
) -> list[str]:
    """The ``--prompt`` texts (in order), then the non-blank lines of ``--prompt-file``.

    ``required``: at least one prompt must be given, and a prompt file must hold one (PLDRError).
    """
    out = list(prompts or [])
    if prompt_file is not None:
        lines = read_prompt_lines(prompt_file)
        if required and not lines:
            raise PLDRError(f"prompt file {prompt_file} holds no prompt")
        out.extend(lines)
    if required and not out and prompt_file is None:
        raise PLDRError("give a prompt with --prompt TEXT or --prompt-file FILE")
    return out


def progress_bars_only_on_a_terminal() -> None:
    """Turn off the progress bars of tqdm, transformers, huggingface_hub and datasets when stderr
    is not a terminal: a redirected log gets no ``\\r`` bar redraws. Call before they import."""
    if sys.stderr.isatty():
        return
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66: every bar not told otherwise
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()

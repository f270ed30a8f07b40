"""The ``pldr-llm`` command line.

Each subcommand lives in its own module under :mod:`pldr_llm.commands`, named as the command, and
exposes ``HELP`` and ``DESCRIPTION`` (and optionally ``PARSER_OPTIONS``, more keywords of its
parser), ``add_arguments(parser)`` and ``run(args)``, which runs it with the parsed
``argparse.Namespace``. :func:`build_parser` makes the parsers from them. Heavy imports happen
inside the run function, so ``pldr-llm --help`` stays fast.

Any :class:`~pldr_llm.core.errors.PLDRError` (and a few standard input errors) is printed as
one line, ``pldr-llm: error: ...``, on stderr with exit status 2 — never a traceback.

``args.clock`` is the call's :class:`~pldr_llm.clock.CallClock`, with the laps ``"startup"``
(the process's start to :func:`main`, when ``main`` runs as the process's command) and
``"parse"``; a command hands it to the library, which times the rest (``generate --timing``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from pldr_llm.clock import CallClock
from pldr_llm.core.errors import PLDRError

# Order here is the order in `pldr-llm --help`.
COMMAND_MODULES = [
    "pldr_llm.commands.generate",
    "pldr_llm.commands.convert",
    "pldr_llm.commands.tokenizer",
    "pldr_llm.commands.train",
    "pldr_llm.commands.plot",
    "pldr_llm.commands.inspect",
    "pldr_llm.commands.compare",
    "pldr_llm.commands.eval",
    "pldr_llm.commands.serve",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _version() -> str:
    from pldr_llm import __version__

    return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parsers of every command; with ``command``, only that command's options are added (the
    others are listed, unparsable): ``generate`` then does not build ``train``'s hundreds."""
    parser = _Parser(
        prog="pldr-llm",
        description="Build, pretrain, run, evaluate and study PLDR-LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"pldr-llm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        short = name.rpartition(".")[2]
        p = sub.add_parser(
            short,
            help=module.HELP,
            description=module.DESCRIPTION,
            **getattr(module, "PARSER_OPTIONS", {}),
        )
        if command is None or command == short:
            module.add_arguments(p)
            p.set_defaults(func=module.run)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first word; the top level has no option with a value)."""
    first = next((word for word in argv if not word.startswith("-")), None)
    names = [name.rpartition(".")[2] for name in COMMAND_MODULES]
    return first if first in names else None


def main(argv: Sequence[str] | None = None) -> int:
    # Without argv this is the process's command: its clock starts with the process.
    clock = CallClock.from_process_start() if argv is None else CallClock()
    clock.lap("startup")
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(words))
    args = parser.parse_args(words)
    clock.lap("parse")
    args.clock = clock
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    from safetensors import SafetensorError  # small; torch-free

    try:
        result = args.func(args)
    except SafetensorError as exc:
        # A failed write inside a library that saves safetensors itself (transformers'
        # save_pretrained for `convert --to hf`): "I/O error: ... (os error 27)". Anything
        # else from safetensors is a bug and keeps its traceback.
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        from pldr_llm.core.fileio import io_error_message

        code = int(found.group(1))
        where = getattr(args, "out", None) or "a safetensors file"
        failure = io_error_message(OSError(code, os.strerror(code)))
        print(f"pldr-llm: error: writing {where}: {failure}", file=sys.stderr)
        return 2
    except PLDRError as exc:
        print(f"pldr-llm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk, a file-size limit, a read-only or unwritable path, a closed output: the
        # user's environment, not a bug. One line naming the path and what to do.
        from pldr_llm.core.fileio import io_error_message

        if exc.filename is None:
            _silence_stdout()  # the failed stream may be stdout: don't fail again at exit
            print(f"pldr-llm: error: writing the output: {io_error_message(exc)}", file=sys.stderr)
        else:
            print(f"pldr-llm: error: {io_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pldr-llm: interrupted", file=sys.stderr)
        return 130
    try:
        sys.stdout.flush()  # `pldr-llm ... > /dev/full` fails here, not at interpreter exit
    except OSError as exc:
        from pldr_llm.core.fileio import io_error_message

        _silence_stdout()
        print(f"pldr-llm: error: standard output: {io_error_message(exc)}", file=sys.stderr)
        return 2
    return int(result or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush of a broken stdout stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or already closed
        pass


if __name__ == "__main__":
    sys.exit(main())

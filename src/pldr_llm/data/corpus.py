"""The embedded default corpus: CPython's own documentation topics.

Every CPython ships ``pydoc_data.topics.topics``, a dictionary from a help topic (``"assert"``,
``"formatstrings"``, ...) to the plain-text reference page that ``help()`` shows. It is English
prose with some code, about half a megabyte, needs no download, and is the same on every machine
that runs the same Python version -- enough to train the ``tiny`` preset offline and see its loss
fall.

The pages are split into documents at their section headings (a title line underlined with ``*``,
``=``, ``-``, ``~`` or ``^``), because whole pages range from 200 characters to 60 kB; sections
shorter than :data:`MIN_DOCUMENT_CHARS` are merged into the next one so that no document is a lone
heading. The order is the sorted topic order, so the corpus is deterministic. It differs between
Python versions (new topics, reworded pages); a run that must be repeatable across machines should
pin the Python version or use its own files.
"""

from __future__ import annotations

import functools

from pldr_llm.core.errors import PLDRError

# Sections shorter than this are merged into the following one (headings alone, tiny stubs).
MIN_DOCUMENT_CHARS = 400

_UNDERLINE_CHARS = frozenset("*=-~^")


def _is_underline(title: str, line: str) -> bool:
    """Whether ``line`` underlines ``title`` (reStructuredText style, as pydoc renders headings)."""
    stripped = line.strip()
    return (
        bool(title.strip())
        and len(stripped) >= 3
        and len(set(stripped)) == 1
        and stripped[0] in _UNDERLINE_CHARS
        # The underline is as long as the title; allow a little slack for wide characters.
        and abs(len(stripped) - len(title.strip())) <= 2
    )


def split_sections(page: str, min_chars: int = MIN_DOCUMENT_CHARS) -> list[str]:
    """Split one documentation page into documents at its section headings.

    A heading is a non-empty line followed by an underline of one repeated character; the heading
    starts a new document. Pieces shorter than ``min_chars`` are merged with the next piece (the
    last piece, if short, is merged into the previous one). Surrounding whitespace is stripped.
    """
    lines = page.splitlines()
    starts = [0]
    for i in range(1, len(lines) - 1):
        if _is_underline(lines[i], lines[i + 1]) and not _is_underline(lines[i - 1], lines[i]):
            starts.append(i)
    starts.append(len(lines))
    pieces = ["\n".join(lines[a:b]).strip() for a, b in zip(starts[:-1], starts[1:], strict=True)]
    pieces = [p for p in pieces if p]
    docs: list[str] = []
    pending = ""
    for piece in pieces:
        pending = f"{pending}\n\n{piece}" if pending else piece
        if len(pending) >= min_chars:
            docs.append(pending)
            pending = ""
    if pending:
        if docs:
            docs[-1] = f"{docs[-1]}\n\n{pending}"
        else:
            docs.append(pending)
    return docs


@functools.lru_cache(maxsize=1)
def _default_corpus() -> tuple[str, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some stripped-down Python builds leave pydoc_data out
        raise PLDRError(
            "the default corpus needs the standard library module pydoc_data, which this Python "
            "lacks; pass your own data files instead"
        ) from exc
    docs: list[str] = []
    for key in sorted(topics):
        docs.extend(split_sections(topics[key]))
    return tuple(docs)


def default_corpus() -> list[str]:
    """The embedded default corpus as a list of documents (deterministic for a Python version).

    Built from the documentation topics that ship inside CPython (``pydoc_data.topics``); see the
    module docstring for how pages are split. Needs no download and no optional dependency.
    """
    return list(_default_corpus())

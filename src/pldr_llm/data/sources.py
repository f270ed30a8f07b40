"""Document sources: where the text comes from.

A :class:`DocumentSource` is an ordered, re-readable stream of documents (strings). Everything
above it -- shuffling, sharding per rank, tokenizing, packing, batching, resuming -- only needs
``iter_documents(start)``: the documents from index ``start`` on, in the same order every time.
Sources:

* :class:`ListSource` -- documents held in memory (the embedded default corpus, tests).
* :class:`FileSource` -- local ``.txt`` / ``.jsonl`` / ``.parquet`` files (a file, a folder or a
  glob; txt and jsonl also compressed: ``.gz``, ``.bz2``, ``.xz``). A txt file holds one document per block of lines
  separated by a blank line (``txt_split="blank_line"``, the default), one per line (``"line"``) or
  one per file (``"file"``). jsonl and parquet take the text from a named column. Needs nothing
  optional except pyarrow for parquet. The tokenizer trainer (:func:`pldr_llm.tokenizer.iter_text`)
  reads its inputs through it too: one reader, one set of errors.
* :class:`HFSource` -- a Hugging Face dataset (streamed or downloaded), through the optional
  ``datasets`` package (``pip install 'pldr-llm[data]'``).
* :class:`SliceSource` -- documents ``[start, stop)`` of another source: the original's
  ``train[a:b]`` / ``train[a%:b%]`` intervals and the validation/test sets taken after them.

Document indices count every record, including empty ones, so that an interval means the same
rows as in the dataset; the batcher skips empty documents.
"""

from __future__ import annotations

import abc
import glob
import io
import itertools
import json
import re
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pldr_llm.core.errors import PLDRError, first_line

TXT_SPLITS = ("blank_line", "line", "file")

# Format -> the file name endings that imply it. A compression ending is allowed on top for txt and
# jsonl (``COMPRESSIONS``).
_ENDINGS = {
    "txt": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "parquet": (".parquet",),
}
FILE_FORMATS = tuple(_ENDINGS)
COMPRESSIONS = (".gz", ".bz2", ".xz")
#: How a missing column is chosen, in the error that names it (``pldr-llm train``'s option).
COLUMN_HINT = "set data.column"
_FORMAT_OF_ENDING = {ending: fmt for fmt, endings in _ENDINGS.items() for ending in endings}


class DocumentSource(abc.ABC):
    """An ordered, re-readable stream of documents; see the module docstring."""

    #: A short human-readable name (used in messages and checked when a data state is loaded).
    description: str = "documents"

    @abc.abstractmethod
    def iter_documents(self, start: int = 0) -> Iterator[str]:
        """Yield the documents from index ``start`` on (the same order on every call)."""

    def num_documents(self) -> int | None:
        """The number of documents, or None when it is unknown without reading everything."""
        return None

    def count_documents(self) -> int:
        """The number of documents, reading the whole source if it has to."""
        n = self.num_documents()
        if n is None:
            n = sum(1 for _ in self.iter_documents())
        return n

    def check(self) -> None:
        """Fail early (PLDRError) on a missing file or column: reads at most the first record."""
        next(iter(self.iter_documents()), None)


class ListSource(DocumentSource):
    """Documents held in a list."""

    def __init__(self, documents: Sequence[str], description: str = "list") -> None:
        self._docs = list(documents)
        self.description = description

    def iter_documents(self, start: int = 0) -> Iterator[str]:
        return iter(self._docs[start:])

    def num_documents(self) -> int:
        return len(self._docs)


class SliceSource(DocumentSource):
    """Documents ``[start, stop)`` of another source (``stop=None``: to the end)."""

    def __init__(self, inner: DocumentSource, start: int, stop: int | None) -> None:
        if start < 0 or (stop is not None and stop < start):
            raise PLDRError(f"bad document interval [{start}:{stop}] of {inner.description}")
        self.inner, self.start, self.stop = inner, start, stop
        self.description = f"{inner.description}[{start}:{'' if stop is None else stop}]"

    def iter_documents(self, start: int = 0) -> Iterator[str]:
        it = self.inner.iter_documents(self.start + start)
        if self.stop is None:
            return it
        return itertools.islice(it, max(0, self.stop - self.start - start))

    def num_documents(self) -> int | None:
        n = self.inner.num_documents()
        if n is None:
            return None
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, stop - self.start)

    def check(self) -> None:
        self.inner.check()


# ---------------------------------------------------------------------------------- local files


def _open_text(path: Path) -> io.TextIOBase:
    """A text file, decompressed on the fly by its ending (``COMPRESSIONS``)."""
    # errors="replace": one bad byte deep inside a web-scale file must not stop a long run.
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if suffix == ".bz2":
        import bz2

        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    if suffix == ".xz":
        import lzma

        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def file_format(path: Path) -> str | None:
    """The format a file name implies (``txt``, ``jsonl``, ``parquet``) or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        fmt = _FORMAT_OF_ENDING.get(suffixes[-2]) if len(suffixes) >= 2 else None
        return fmt if fmt in ("txt", "jsonl") else None
    return _FORMAT_OF_ENDING.get(suffixes[-1]) if suffixes else None


def _txt_documents(
    path: Path, txt_split: str, skip: int, strip: bool = True
) -> Generator[str, None, int]:
    """Yield a txt file's documents after the first ``skip``; return how many were skipped.
    Without ``strip`` a line (``txt_split="line"``) keeps its leading and trailing spaces."""
    seen = 0
    with _open_text(path) as f:
        if txt_split == "file":
            text = f.read().strip()
            if not text:
                return 0
            if skip:
                return 1
            yield text
            return 0
        if txt_split == "line":
            for line in f:
                if not line.strip():
                    continue
                text = line.strip() if strip else line.rstrip("\r\n")
                if seen >= skip:
                    yield text
                seen += 1
            return min(seen, skip)
        block: list[str] = []
        for line in itertools.chain(f, [""]):  # the sentinel closes the last block
            if line.strip():
                block.append(line.rstrip("\r\n"))
                continue
            if block:
                if seen >= skip:
                    yield "\n".join(block)
                seen += 1
                block = []
        return min(seen, skip)


def _as_text(value: Any, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PLDRError(f"{where}: column {column!r} holds {type(value).__name__}, not text")
    return value


def _record_text(record: Any, where: str, column: str, hint: str) -> str:
    if not isinstance(record, dict):
        raise PLDRError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if column not in record:
        cols = ", ".join(map(str, record)) or "none"
        raise PLDRError(f"{where}: no column {column!r} (columns: {cols}); {hint}")
    return _as_text(record[column], where, column)


def _jsonl_documents(
    path: Path, column: str, skip: int, hint: str = COLUMN_HINT
) -> Generator[str, None, int]:
    """Yield the ``column`` of each JSON line after the first ``skip``; return how many skipped."""
    seen = 0
    first = True
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            if first and text.startswith("["):  # a whole JSON array rather than JSON lines
                try:
                    records = json.loads(line + f.read())
                except json.JSONDecodeError as exc:
                    raise PLDRError(
                        f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}"
                    ) from exc
                if not isinstance(records, list):
                    raise PLDRError(f"{path}: expected JSON lines or a JSON array")
                for i, record in enumerate(records):
                    if i >= skip:
                        yield _record_text(record, f"{path} item {i}", column, hint)
                return min(len(records), skip)
            first = False
            if seen >= skip:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise PLDRError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from exc
                yield _record_text(record, f"{path}:{lineno}", column, hint)
            seen += 1
    return min(seen, skip)


def _import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PLDRError(
            "reading parquet files needs pyarrow: pip install 'pldr-llm[data]'"
        ) from exc
    return pq


def _parquet_file(path: Path, column: str, hint: str = COLUMN_HINT) -> Any:
    pq = _import_pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise PLDRError(f"{path}: not a readable parquet file ({first_line(exc)})") from exc
    names = pf.schema_arrow.names
    if column not in names:
        raise PLDRError(f"{path}: no column {column!r} (columns: {', '.join(names)}); {hint}")
    return pf


def _parquet_documents(
    path: Path, column: str, skip: int, hint: str = COLUMN_HINT
) -> Generator[str, None, int]:
    """Yield the ``column`` of each row after the first ``skip``; return how many skipped."""
    pf = _parquet_file(path, column, hint)
    skipped = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if skip - skipped >= rows:  # resuming deep into a file skips whole row groups unread
            skipped += rows
            continue
        values = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
        offset = skip - skipped
        skipped += offset
        for i, value in enumerate(values[offset:], start=offset):
            yield _as_text(value, f"{path} row-group {group} row {i}", column)
    return skipped


@dataclass(frozen=True)
class DataFile:
    """One local data file and its format."""

    path: Path
    format: str


class FileSource(DocumentSource):
    """Documents from local txt/jsonl/parquet files, read in the given order.

    ``column_hint`` ends the error that names a missing column: how the caller's user picks
    another one (``pldr-llm tokenizer``'s is ``--column``). ``strip_lines=False`` keeps each
    line's spaces with ``txt_split="line"`` (the tokenizer trainer reads lines as they are).
    """

    def __init__(
        self,
        files: Sequence[DataFile],
        column: str = "text",
        txt_split: str = "blank_line",
        column_hint: str = COLUMN_HINT,
        strip_lines: bool = True,
    ) -> None:
        if txt_split not in TXT_SPLITS:
            raise PLDRError(f"txt_split must be one of {', '.join(TXT_SPLITS)}, got {txt_split!r}")
        if not files:
            raise PLDRError("no data files given")
        self.files, self.column, self.txt_split = list(files), column, txt_split
        self.column_hint, self.strip_lines = column_hint, strip_lines
        first = str(self.files[0].path)
        more = f" (+{len(self.files) - 1} files)" if len(self.files) > 1 else ""
        self.description = f"{first}{more}"

    def _documents(self, f: DataFile, skip: int) -> Generator[str, None, int]:
        if f.format == "txt":
            return _txt_documents(f.path, self.txt_split, skip, self.strip_lines)
        if f.format == "jsonl":
            return _jsonl_documents(f.path, self.column, skip, self.column_hint)
        return _parquet_documents(f.path, self.column, skip, self.column_hint)

    def _fast_count(self, f: DataFile) -> int | None:
        if f.format == "parquet":
            return _parquet_file(f.path, self.column, self.column_hint).metadata.num_rows
        return None

    def iter_documents(self, start: int = 0) -> Iterator[str]:
        remaining = start
        for f in self.files:
            n = self._fast_count(f)
            if n is not None and remaining >= n:
                remaining -= n
                continue
            remaining -= yield from self._documents(f, remaining)

    def num_documents(self) -> int | None:
        counts = [self._fast_count(f) for f in self.files]
        return None if None in counts else sum(c for c in counts if c is not None)

    def check(self) -> None:
        for f in self.files:
            if not f.path.is_file():
                raise PLDRError(f"data file not found: {f.path}")
            if f.format == "parquet":
                _parquet_file(f.path, self.column, self.column_hint)
        # The first record of a jsonl file tells whether the column is there.
        next(iter(self._documents(self.files[0], 0)), None)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or file_format(Path(source)) is not None
        or bool(re.match(r"^[A-Za-z]:[\\/]", source))
    )


def find_files(source: str, fmt: str = "auto") -> list[DataFile] | None:
    """Resolve ``source`` to local data files, or None when it is not a local path.

    ``source`` is a file, a folder (its files with a known extension, recursively, sorted) or a
    glob pattern. Raises PLDRError for a path that looks local but does not exist, and for a file
    whose format cannot be told from its name (pass ``fmt``).
    """
    if fmt not in ("auto", *FILE_FORMATS):
        return None
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise PLDRError(f"no data files match {source}")
    elif path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p) is not None)
        if fmt != "auto":
            paths = [p for p in paths if file_format(p) == fmt]
        if not paths:
            raise PLDRError(f"no .txt/.jsonl/.parquet data files in folder {source}")
    elif path.is_file():
        paths = [path]
    elif fmt != "auto" or _looks_like_path(source):
        raise PLDRError(f"data file not found: {source}")
    else:
        return None
    files = []
    for p in paths:
        f = fmt if fmt != "auto" else file_format(p)
        if f is None:
            raise PLDRError(
                f"cannot tell the format of {p}; set data.format to txt, jsonl or parquet"
            )
        files.append(DataFile(p, f))
    return files


# -------------------------------------------------------------------------------- Hugging Face


def import_datasets() -> Any:
    """Import the optional ``datasets`` package or raise a PLDRError that says how to get it."""
    try:
        import datasets
    except ImportError as exc:
        raise PLDRError(
            "Hugging Face datasets need the optional package 'datasets': "
            "pip install 'pldr-llm[data]'"
        ) from exc
    return datasets


@dataclass(eq=False)
class HFSource(DocumentSource):
    """A split of a Hugging Face dataset, streamed (default) or downloaded and memory-mapped.

    ``split`` is a plain split name (``"train"``); intervals are applied by :class:`SliceSource`
    because streaming datasets do not accept ``train[a:b]``. With ``streaming=False`` the dataset is
    downloaded once into the Hugging Face cache and resuming at document ``n`` is immediate; when
    streamed, resuming re-reads (without tokenizing) the documents before ``n``. ``subset``,
    ``data_files``, ``trust_remote_code`` and ``cache_dir`` go to ``datasets.load_dataset``.
    """

    name: str
    split: str = "train"
    column: str = "text"
    subset: str | None = None
    data_files: str | list[str] | None = None
    streaming: bool = True
    trust_remote_code: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.description = f"{self.name}{'/' + self.subset if self.subset else ''}:{self.split}"
        self._ds: Any = None

    def _dataset(self) -> Any:
        if self._ds is not None:
            return self._ds
        datasets = import_datasets()
        kwargs: dict[str, Any] = {"split": self.split, "streaming": self.streaming}
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        if self.trust_remote_code:
            # Dataset scripts (and this flag) were removed in datasets 4; older versions need it.
            kwargs["trust_remote_code"] = True
        try:
            ds = datasets.load_dataset(self.name, self.subset, **kwargs)
        except PLDRError:
            raise
        except Exception as exc:  # network, missing dataset, bad split: all are user errors here
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PLDRError(
                f"cannot load Hugging Face dataset {self.description}: {type(exc).__name__}: {msg}"
            ) from exc
        names = ds.column_names
        if names is None:  # some streamed datasets only know their columns after one example
            names = list(next(iter(ds), {}).keys())
        if self.column not in names:
            raise PLDRError(
                f"dataset {self.description} has no column {self.column!r} "
                f"(columns: {', '.join(names) or 'none'}); set data.column"
            )
        self._ds = ds.select_columns([self.column])
        return self._ds

    def iter_documents(self, start: int = 0) -> Iterator[str]:
        ds = self._dataset()
        where = f"dataset {self.description}"
        if self.streaming:
            for example in ds.skip(start) if start else ds:
                yield _as_text(example[self.column], where, self.column)
            return
        n = len(ds)
        step = 1000
        for i in range(start, n, step):
            for value in ds[i : i + step][self.column]:
                yield _as_text(value, where, self.column)

    def num_documents(self) -> int | None:
        ds = self._dataset()
        if not self.streaming:
            return len(ds)
        splits = getattr(ds.info, "splits", None)
        if splits and self.split in splits and splits[self.split].num_examples:
            return int(splits[self.split].num_examples)
        return None

    def count_documents(self) -> int:
        n = self.num_documents()
        if n is None:
            raise PLDRError(
                f"dataset {self.description} does not publish its size, so a percent interval or a "
                "negative index cannot be resolved; use split_style 'index' or streaming false"
            )
        return n

    def check(self) -> None:
        self._dataset()

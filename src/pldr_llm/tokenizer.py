"""SentencePiece tokenizer of PLDR-LLMs: loading (also from published ``*.tar.gz``) and training.

The original implementation tokenizes with a unigram SentencePiece model whose control pieces are
pad 0 ``[PAD]``, unk 1 ``[UNK]``, start 2 ``[START]`` and end 3 ``[END]``, followed by the
user-defined pieces ``[SEP]`` and ``[CLS]``. It encodes a text with the end-of-text id appended and
no start id, and decodes with SentencePiece's own decoder, which drops control ids. This module
reproduces exactly that with the ``sentencepiece`` package alone.

Published PLDR-LLMs ship their tokenizer as a ``*.tar.gz`` holding the ``.model`` and ``.vocab``
files. Archives are untrusted input: :func:`extract_tokenizer_archive` checks every member before it
writes anything, and refuses absolute paths, ``..`` components, links, devices and FIFOs.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pldr_llm.core.errors import PLDRError, first_line
from pldr_llm.core.fileio import atomic_path

__all__ = [
    "PLDRTokenizer",
    "load_tokenizer",
    "extract_tokenizer_archive",
    "train_tokenizer",
    "iter_text",
    "PAD_ID",
    "UNK_ID",
    "START_ID",
    "EOS_ID",
    "USER_SYMBOLS",
]

# The original's special ids and pieces (pldr_data_prep + the paper tokenizer's trainer spec).
PAD_ID, UNK_ID, START_ID, EOS_ID = 0, 1, 2, 3
PAD_PIECE, UNK_PIECE, START_PIECE, EOS_PIECE = "[PAD]", "[UNK]", "[START]", "[END]"
USER_SYMBOLS = ("[SEP]", "[CLS]")

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# A tokenizer archive is a few MB; anything far larger is not a tokenizer (or is a tar bomb).
MAX_ARCHIVE_BYTES = 1 << 30


def _direct_decoder(processor: Any) -> Any:
    """``processor.decode`` of a list of ids, without its Python dispatch where the package has
    the compiled call under it (sentencepiece 0.2.x: ``_processor._DecodeIds``; it is most of
    the time of decoding a few ids, which a streamed row does per token). Checked against
    ``decode`` once; anything else falls back to ``decode``."""
    direct = getattr(getattr(processor, "_processor", None), "_DecodeIds", None)
    if callable(direct):
        sample = list(range(min(64, int(processor.get_piece_size()))))
        try:
            if direct(sample) == processor.decode(sample) and direct([]) == "":
                return direct
        except Exception:  # another binding's signature: the public call
            pass
    return processor.decode


def _spm() -> Any:
    try:
        import sentencepiece
    except ImportError:  # pragma: no cover - a declared dependency
        raise PLDRError(
            "the tokenizer needs the 'sentencepiece' package: pip install sentencepiece"
        ) from None
    return sentencepiece


class PLDRTokenizer:
    """A loaded SentencePiece model with the original PLDR-LLM encode/decode conventions.

    Args:
        model_path: path of the SentencePiece ``.model`` file.
    """

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise PLDRError(f"tokenizer model not found: {path}")
        processor = _spm().SentencePieceProcessor()
        try:
            # Loading from bytes, not from the path: SentencePiece's own file reader cannot open
            # every non-ASCII path, and a read error here must become a one-line PLDRError.
            processor.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as exc:
            raise PLDRError(f"{path} is not a SentencePiece model ({first_line(exc)})") from None
        self._sp = processor
        self._decode_ids = _direct_decoder(processor)
        # The processor never changes after loading: its sizes and special ids are read once.
        #: Number of pieces (ids are ``0 .. vocab_size - 1``).
        self.vocab_size = int(processor.get_piece_size())
        #: Padding id (0 for PLDR-LLM tokenizers).
        self.pad_id = int(processor.pad_id())
        #: End-of-text id (3 for PLDR-LLM tokenizers).
        self.eos_id = int(processor.eos_id())
        #: Unknown-piece id (1 for PLDR-LLM tokenizers).
        self.unk_id = int(processor.unk_id())
        #: Start id (2 for PLDR-LLM tokenizers); the original never adds it.
        self.bos_id = int(processor.bos_id())
        self.model_path: Path = path.resolve()
        self.vocab_path: Path | None = _vocab_file_for(path)
        #: Prompt conventions of a transformers folder's ``tokenizer_config.json``
        #: (``add_bos_token`` / ``add_eos_token``); both off in the original's bundles.
        self.add_bos = False
        self.add_eos = False

    # ------------------------------------------------------------------ properties
    @property
    def processor(self) -> Any:
        """The underlying ``sentencepiece.SentencePieceProcessor``."""
        return self._sp

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"PLDRTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``: no start id, and the end-of-text id appended when ``add_eos``."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        _check_encodable(text)
        return list(self._sp.encode(text, out_type=int, add_bos=False, add_eos=add_eos))

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True) -> list[list[int]]:
        """:meth:`encode` for several texts."""
        return [self.encode(t, add_eos=add_eos) for t in texts]

    def prompt_ids(self, text: str) -> list[int]:
        """The ids the original ``generate_text`` starts generation from.

        It encodes the text with the end-of-text id appended and then drops that id, unless the
        text encodes to nothing else: an empty prompt starts from the end-of-text id alone.
        """
        if self.add_bos or self.add_eos:
            # A transformers folder's convention: the prompt is tokenizer(text), with the start
            # id in front and/or the end-of-text id behind as its tokenizer_config.json says.
            ids = [self.bos_id] * self.add_bos + self.encode(text, add_eos=self.add_eos)
            return ids if ids else [self.eos_id]
        ids = self.encode(text, add_eos=True)
        return ids[:-1] if len(ids) > 1 else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control ids (pad, start, end) are dropped as SentencePiece does.

        Ids outside the vocabulary (a model may have a larger embedding than its tokenizer) are
        decoded as the unknown piece rather than failing.
        """
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        ids = list(ids)
        size = self.vocab_size
        if self._decode_ids is not self._sp.decode and (not ids or 0 <= min(ids) < size > max(ids)):
            try:  # ids in range: as they are (the compiled call refuses anything but integers)
                return str(self._decode_ids(ids))
            except TypeError:
                pass
        unk = self.unk_id
        clean = [int(i) if 0 <= int(i) < size else unk for i in ids]
        return str(self._decode_ids(clean))

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id."""
        return str(self._sp.id_to_piece(int(token_id)))

    def is_control(self, token_id: int) -> bool:
        """Whether ``token_id`` is a control id (decoded as nothing)."""
        return bool(self._sp.is_control(int(token_id)))

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | Path, name: str = "tokenizer") -> Path:
        """Copy the ``.model`` (and any ``.vocab``) into ``directory`` as ``<name>.model``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{name}.model"
        if target.resolve() != self.model_path:
            with atomic_path(target) as tmp:  # an older tokenizer there stays whole on failure
                shutil.copyfile(self.model_path, tmp)
        if self.vocab_path is not None:
            vocab_target = directory / f"{name}.vocab"
            if vocab_target.resolve() != self.vocab_path:
                with atomic_path(vocab_target) as tmp:
                    shutil.copyfile(self.vocab_path, tmp)
        return target


# ---------------------------------------------------------------------- loading


def _check_encodable(text: str) -> None:
    """Refuse text holding lone surrogates, naming the first one.

    Bytes that are not UTF-8 reach Python as lone surrogates (``sys.argv`` and ``sys.stdin`` decode
    with ``surrogateescape``: byte 0xE9 becomes U+DCE9). SentencePiece cannot encode them, and
    guessing an encoding (Latin-1? cp1252?) would silently change the prompt, so they are refused.
    """
    for position, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            code = ord(char)
            what = f"byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            raise PLDRError(
                f"text is not valid UTF-8: {what} at character {position}; "
                "give UTF-8 text (e.g. convert it with iconv -t UTF-8)"
            )


def load_tokenizer(path: str | os.PathLike[str]) -> PLDRTokenizer:
    """Load a tokenizer from a ``.model`` file, a folder holding one, or a ``*.tar.gz`` archive.

    A folder is searched for ``tokenizer.model``, then for a single ``*.model`` file, then for a
    single tokenizer archive. An archive is extracted (after checking every member, see
    :func:`extract_tokenizer_archive`) into a private temporary folder removed at exit.
    """
    path = Path(path)
    if not path.exists():
        raise PLDRError(f"tokenizer not found: {path}")
    if path.is_dir():
        return load_tokenizer(find_tokenizer_file(path))
    if _is_archive(path):
        target = Path(tempfile.mkdtemp(prefix="pldr_llm_tokenizer_"))
        try:
            tokenizer = PLDRTokenizer(extract_tokenizer_archive(path, target))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        # The processor holds the model in memory; the files stay for model_path until exit.
        atexit.register(shutil.rmtree, target, ignore_errors=True)
        return tokenizer
    if path.suffix != ".model":
        raise PLDRError(
            f"{path}: a tokenizer is a SentencePiece '.model' file or a '.tar.gz' archive"
        )
    return PLDRTokenizer(path)


def find_tokenizer_file(directory: str | Path) -> Path:
    """The tokenizer file of a folder: ``tokenizer.model``, a lone ``*.model`` or a lone archive."""
    directory = Path(directory)
    preferred = directory / "tokenizer.model"
    if preferred.is_file():
        return preferred
    models = sorted(p for p in directory.glob("*.model") if p.is_file())
    if len(models) == 1:
        return models[0]
    if len(models) > 1:
        names = ", ".join(p.name for p in models)
        raise PLDRError(f"{directory} holds several tokenizer models ({names}); keep one")
    archives = sorted(p for p in directory.iterdir() if p.is_file() and _is_archive(p))
    if len(archives) == 1:
        return archives[0]
    if len(archives) > 1:
        names = ", ".join(p.name for p in archives)
        raise PLDRError(f"{directory} holds several tokenizer archives ({names}); keep one")
    raise PLDRError(
        f"no tokenizer in {directory}: expected a '.model' file or a tokenizer '.tar.gz'"
    )


def _vocab_file_for(model: Path) -> Path | None:
    # The published archives name the two files differently ("...-model-....model" next to
    # "....vocab"), so fall back to the folder's only .vocab file.
    same_stem = model.with_suffix(".vocab")
    if same_stem.is_file():
        return same_stem.resolve()
    vocabs = [p for p in model.parent.glob("*.vocab") if p.is_file()]
    return vocabs[0].resolve() if len(vocabs) == 1 else None


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member(member: tarfile.TarInfo, archive: Path, target: Path) -> Path:
    """Where ``member`` would land under ``target``; raises for anything unsafe."""
    name = member.name
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise PLDRError(f"unsafe tokenizer archive {archive}: member {name!r} is a {kind}")
    posix = name.replace("\\", "/")
    parts = Path(posix).parts
    if posix.startswith("/") or os.path.isabs(name) or (parts and ":" in parts[0]):
        raise PLDRError(f"unsafe tokenizer archive {archive}: member {name!r} has an absolute path")
    if ".." in parts:
        raise PLDRError(
            f"unsafe tokenizer archive {archive}: member {name!r} escapes the target folder"
        )
    root = target.resolve()
    dest = (root / Path(*parts)).resolve() if parts else root
    # Resolving also catches a folder created earlier that a symlink replaced on disk.
    if dest != root and root not in dest.parents:
        raise PLDRError(
            f"unsafe tokenizer archive {archive}: member {name!r} escapes the target folder"
        )
    return dest


def extract_tokenizer_archive(archive: str | Path, target: str | Path) -> Path:
    """Extract a tokenizer archive into ``target`` and return the path of its ``.model`` file.

    Every member is checked before anything is written: only regular files and folders are
    allowed, and no member may land outside ``target`` (absolute paths, ``..``). Nothing but file
    contents is restored (no owners, modes or times). The archive must hold exactly one
    ``.model`` file.
    """
    archive = Path(archive)
    target = Path(target)
    if not archive.is_file():
        raise PLDRError(f"tokenizer archive not found: {archive}")
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PLDRError(f"{archive} is not a readable tar archive ({first_line(exc)})") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise PLDRError(f"{archive} is a damaged tar archive ({first_line(exc)})") from None
        planned = [(m, _check_member(m, archive, target)) for m in members]
        total = sum(m.size for m, _ in planned if m.isfile())
        if total > MAX_ARCHIVE_BYTES:
            raise PLDRError(f"{archive} unpacks to {total} bytes; not a tokenizer archive")
        models = [dest for m, dest in planned if m.isfile() and dest.suffix == ".model"]
        if not models:
            raise PLDRError(f"tokenizer archive {archive} holds no '.model' file")
        if len(models) > 1:
            names = ", ".join(m.name for m, d in planned if d in models)
            raise PLDRError(f"tokenizer archive {archive} holds several '.model' files ({names})")
        target.mkdir(parents=True, exist_ok=True)
        for member, dest in planned:
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - regular files always have data
                raise PLDRError(f"tokenizer archive {archive}: cannot read member {member.name!r}")
            with source, atomic_path(dest) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out)
    return models[0]


# ---------------------------------------------------------------------- training


def _lines_of(value: str) -> Iterator[str]:
    # One record may span lines; SentencePiece trains on lines, as the original's text dump did.
    for line in value.splitlines():
        if line.strip():
            yield line


def iter_text(
    paths: Sequence[str | Path],
    column: str | None = None,
    progress: bool = True,
) -> Iterator[str]:
    """Stream the non-empty lines of text, JSON-lines and parquet files, one file after another.

    The files are read by :class:`pldr_llm.data.sources.FileSource` (the reader of training data:
    ``.gz``, ``.bz2``, ``.xz`` decompressed on the fly, a JSON array taken as records, the same
    errors); a file whose name implies no format is plain text. Text lines come as they are
    (spaces kept, blank lines skipped); JSON-lines and parquet files yield the ``column`` field of each
    record (default ``"text"``), split into lines. Nothing is read before it is needed, so inputs
    of any size stream through. With ``progress`` a tqdm bar per file counts the lines.
    """
    from tqdm.auto import tqdm

    from pldr_llm.data.sources import DataFile, FileSource, file_format

    files = [Path(p) for p in paths]
    for path in files:
        if not path.exists():
            raise PLDRError(f"input file not found: {path}")
        if path.is_dir():
            raise PLDRError(f"input {path} is a directory: give the text files in it")
    for path in files:
        data = DataFile(path, file_format(path) or "txt")
        source = FileSource(
            [data],
            column=column or "text",
            txt_split="line",  # one line at a time, never a whole block in memory
            column_hint="use --column",
            strip_lines=False,
        )
        with tqdm(unit="lines", desc=path.name, disable=not progress, leave=False) as bar:
            for document in source.iter_documents():
                lines = [document] if data.format == "txt" else _lines_of(document)
                for line in lines:
                    bar.update(1)
                    yield line


def _check_training_options(
    vocab_size: int,
    inputs: Sequence[str | Path],
    input_sentence_size: int,
    character_coverage: float,
) -> None:
    """:func:`train_tokenizer`'s values SentencePiece would abort on (or silently change)."""
    minimum = 4 + len(USER_SYMBOLS) + 256
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise PLDRError(
            f"vocabulary size must be an integer >= {minimum} (special pieces + 256 byte pieces), "
            f"got {vocab_size!r}"
        )
    if not inputs:
        raise PLDRError("no input files given")
    if isinstance(input_sentence_size, bool) or not (
        isinstance(input_sentence_size, int) and input_sentence_size > 0
    ):
        raise PLDRError(
            f"input_sentence_size must be a positive integer, got {input_sentence_size!r}"
        )
    if not 0.0 < character_coverage <= 1.0:
        raise PLDRError(f"character_coverage must be in (0, 1], got {character_coverage!r}")


def _output_prefix(out_prefix: str | Path) -> Path:
    """The ``.model``/``.vocab`` files' path without suffix (``dir/name.model`` accepted too)."""
    prefix = Path(out_prefix)
    if prefix.suffix == ".model":
        prefix = prefix.with_suffix("")
    if prefix.name in ("", ".", ".."):
        raise PLDRError(f"output prefix {str(out_prefix)!r} needs a file name")
    return prefix


def train_tokenizer(
    inputs: Sequence[str | Path],
    vocab_size: int,
    out_prefix: str | Path,
    column: str | None = None,
    input_sentence_size: int = 5_000_000,
    max_sentence_length: int = 125_760,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> PLDRTokenizer:
    """Train a unigram SentencePiece model with the original PLDR-LLM conventions.

    The result has pad 0 ``[PAD]``, unk 1 ``[UNK]``, start 2 ``[START]``, end 3 ``[END]``, the
    user pieces ``[SEP]`` and ``[CLS]``, split digits and byte fallback, like the paper's
    tokenizer (whose trainer spec also sets ``input_sentence_size=5000000``,
    ``max_sentence_length=125760``, input shuffling and a soft vocabulary limit). It writes
    ``<out_prefix>.model`` and ``<out_prefix>.vocab``.

    Args:
        inputs: text, JSON-lines or parquet files (streamed, see :func:`iter_text`).
        vocab_size: number of pieces; at least 262 (6 special pieces + 256 byte pieces).
        out_prefix: output path without suffix.
        column: field of JSON-lines/parquet records holding the text (default ``"text"``).
        input_sentence_size: SentencePiece samples at most this many lines.
        character_coverage: the share of characters the pieces cover (0, 1].
        num_threads: trainer threads (default: the CPU count, at most 16).
        seed: seed of SentencePiece's sampling, for reproducible training.
        progress: tqdm bars on stderr while the inputs are read.
        verbose: keep SentencePiece's own (long) training log on stderr.
    """
    spm = _spm()
    _check_training_options(vocab_size, inputs, input_sentence_size, character_coverage)
    if num_threads is not None and num_threads <= 0:
        raise PLDRError(f"num_threads must be positive, got {num_threads!r}")
    prefix = _output_prefix(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = iter_text(inputs, column=column, progress=progress)
    # Pull the first line now so that an unreadable input fails before SentencePiece starts,
    # and an empty corpus gets a clear message instead of a C++ abort.
    try:
        first = next(lines)
    except StopIteration:
        raise PLDRError("the input files hold no text") from None

    failure: list[BaseException] = []

    def sentences() -> Iterator[str]:
        # SentencePiece wraps an exception raised by the iterator into its own RuntimeError;
        # keep ours to re-raise it unchanged.
        yield first
        try:
            yield from lines
        except Exception as exc:
            failure.append(exc)
            raise

    if seed is not None:
        spm.set_random_generator_seed(int(seed))
    options: dict[str, Any] = {
        "sentence_iterator": sentences(),
        "model_prefix": str(prefix),
        "model_type": "unigram",
        "vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "input_sentence_size": input_sentence_size,
        "max_sentence_length": max_sentence_length,
        "shuffle_input_sentence": True,
        "split_digits": True,
        "byte_fallback": True,
        "hard_vocab_limit": False,
        "user_defined_symbols": list(USER_SYMBOLS),
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": START_ID,
        "eos_id": EOS_ID,
        "pad_piece": PAD_PIECE,
        "unk_piece": UNK_PIECE,
        "bos_piece": START_PIECE,
        "eos_piece": EOS_PIECE,
        "num_threads": num_threads or max(1, min(os.cpu_count() or 1, 16)),
        "minloglevel": 0 if verbose else 2,
    }
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as exc:
        if failure:
            raise failure[0] from None
        raise PLDRError(_training_failure(exc, character_coverage)) from None
    return PLDRTokenizer(Path(f"{prefix}.model"))


def _training_failure(exc: RuntimeError, character_coverage: float) -> str:
    """SentencePiece's failure in this project's words: its text names its own flags
    (``--character_coverage``), which no command of this project has."""
    found = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(exc))
    if found:
        have, need = found.groups()
        return (
            f"tokenizer training failed: covering {character_coverage * 100:g}% of the text's "
            f"characters "
            f"takes {need} pieces, more than the vocabulary size {have}: raise the vocabulary "
            "size or lower --character-coverage"
        )
    return f"tokenizer training failed: {first_line(exc)}"

"""Data configuration (:class:`DataConfig`) and turning it into document sources.

``DataConfig`` holds every data key of a run. The original's data-prep flags are accepted as
aliases by :meth:`DataConfig.from_dict` (``dataset_file``, ``dataset_column_label``,
``train_sample_interval``, ``val_sample_size``, ``test_offset``, ``split_style``, ``split_names``,
``load_from_train``, ``shuffle_set``, ``shuffle_seed``, ``buffer_size``, ``batch_agg_count``,
``padding_type``, ``trust_remote_code``).

Splits follow the original: the train set is ``split`` restricted to ``train_interval`` (document
indices, or percents with ``split_style="percent"``; ``split="train[a:b]"`` / ``"train[a%:b%]"``
works too); the validation set is the ``val_offset`` documents right after the train interval and
the test set the ``test_offset`` documents after those, all from the same split. A separate
validation split or file can be named instead (``val_split``, ``val_source``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.data import sources
from pldr_llm.data.corpus import default_corpus
from pldr_llm.data.packing import check_padding_type

#: ``source`` value that selects the embedded corpus (:func:`pldr_llm.data.default_corpus`).
DEFAULT_SOURCE = "default"

SOURCE_FORMATS = ("auto", *sources.FILE_FORMATS, "hf")
SPLIT_STYLES = ("index", "percent")
SPLITS = ("train", "validation", "test")

# The original's data-prep argument names -> DataConfig fields (split_names, load_from_train are
# handled separately).
ORIGINAL_DATA_KEYS = {
    "dataset_file": "source",
    "dataset_column_label": "column",
    "train_sample_interval": "train_interval",
    "val_sample_size": "val_offset",
    "shuffle_set": "shuffle",
}

# The original's data-prep flags that have no meaning here (loading is always on; batches are never
# counted up front); accepted so that ported configs work.
IGNORED_ORIGINAL_DATA_KEYS = frozenset({"load_dataset", "enable_batch_count"})


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes fixed-length samples.

    Attributes:
        source: ``"default"`` (the embedded corpus), a local file / folder / glob, or a Hugging Face
            dataset name.
        format: ``"auto"`` (from the file extension; a non-path is a Hugging Face name), ``"txt"``,
            ``"jsonl"``, ``"parquet"`` or ``"hf"``.
        column: the text column of jsonl / parquet / Hugging Face data (original:
            ``dataset_column_label``).
        txt_split: a txt file holds one document per ``"blank_line"``-separated block, per
            ``"line"`` or per ``"file"``.
        subset: Hugging Face dataset configuration name.
        data_files: Hugging Face ``data_files`` (for builder datasets such as ``"json"``).
        split: the split to train on, optionally with an interval: ``"train"``, ``"train[:1000]"``,
            ``"train[10%:20%]"``.
        split_style: ``"index"`` or ``"percent"``: the unit of ``train_interval`` and the offsets.
        train_interval: ``[start, end]`` of the train split (original: ``train_sample_interval``).
        val_offset: size of the validation set taken right after the train interval (original:
            ``val_sample_size``); None: no validation set unless ``val_split``/``val_source``.
        test_offset: size of the test set taken after the validation set.
        load_from_train: True (default): validation/test come from the train split by offsets;
            False: from the dataset's own ``validation`` / ``test`` splits, like the original.
        val_split, test_split: explicit split names for validation / test (Hugging Face).
        val_source: a separate source (file, folder, dataset) for validation.
        streaming: stream a Hugging Face dataset (True) or download it to the cache (False).
        cache_dir: the Hugging Face datasets cache folder (default: ``HF_DATASETS_CACHE``).
        trust_remote_code: passed to ``datasets.load_dataset`` for script datasets (datasets < 4).
        shuffle: shuffle the train documents (original: ``shuffle_set``).
        shuffle_seed: the shuffle seed (also varied per epoch).
        buffer_size: documents per shuffle buffer.
        batch_agg_count: documents are packed in groups of ``batch_size * batch_agg_count``.
        padding_type: ``"pack"``, ``"pad"`` or ``"nopad"``.
    """

    source: str = DEFAULT_SOURCE
    format: str = "auto"
    column: str = "text"
    txt_split: str = "blank_line"
    subset: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    split_style: str = "index"
    train_interval: list[int] | None = None
    val_offset: int | None = None
    test_offset: int | None = None
    load_from_train: bool = True
    val_split: str | None = None
    test_split: str | None = None
    val_source: str | None = None
    # Where the data comes from, not what it is: a resumed run may change these two.
    streaming: bool = dataclasses.field(default=True, metadata={"resumable": True})
    cache_dir: str | None = dataclasses.field(default=None, metadata={"resumable": True})
    trust_remote_code: bool = False
    shuffle: bool = False
    shuffle_seed: int = 0
    buffer_size: int = 20000
    batch_agg_count: int = 100
    padding_type: str = "pack"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a dictionary of our keys and/or the original's data-prep keys.

        Raises PLDRError naming the first unknown key or bad value.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "split_names":
                if value is None:
                    continue
                if not isinstance(value, (list, tuple)) or len(value) != 3:
                    raise PLDRError("data key 'split_names' must list 3 names: train, val, test")
                kwargs["split"], kwargs["val_split"], kwargs["test_split"] = map(str, value)
                continue
            if key in IGNORED_ORIGINAL_DATA_KEYS:
                continue
            name = ORIGINAL_DATA_KEYS.get(key, key)
            if name not in fields:
                raise PLDRError(f"unknown data key {key!r}")
            if value is None and name in ("shuffle_seed",):
                continue  # the original's "no seed"; ours must be a number to resume exactly
            kwargs[name] = value
        if kwargs.get("load_from_train") is False:
            # The original then loads the dataset's own validation and test splits.
            kwargs.setdefault("val_split", "validation")
            kwargs.setdefault("test_split", "test")
            kwargs.pop("val_offset", None)
            kwargs.pop("test_offset", None)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Our keys and values (JSON/YAML-serializable)."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise PLDRError naming the first bad key."""

        def want(key: str, ok: bool, what: str) -> None:
            if not ok:
                raise PLDRError(f"data key {key!r} {what}, got {getattr(self, key)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        want("source", isinstance(self.source, str) and bool(self.source), "must be a name/path")
        want("format", self.format in SOURCE_FORMATS, f"must be one of {', '.join(SOURCE_FORMATS)}")
        want("column", isinstance(self.column, str) and bool(self.column), "must be a column name")
        want(
            "txt_split",
            self.txt_split in sources.TXT_SPLITS,
            f"must be one of {', '.join(sources.TXT_SPLITS)}",
        )
        want("split", isinstance(self.split, str) and bool(self.split), "must be a split name")
        want(
            "split_style",
            self.split_style in SPLIT_STYLES,
            f"must be one of {', '.join(SPLIT_STYLES)}",
        )
        if self.train_interval is not None:
            iv = self.train_interval
            want(
                "train_interval",
                isinstance(iv, (list, tuple)) and len(iv) == 2 and all(is_int(v) for v in iv),
                "must be [start, end]",
            )
            want("train_interval", 0 <= iv[0] <= iv[1], "must have 0 <= start <= end")
            if self.split_style == "percent":
                want("train_interval", iv[1] <= 100, "must be within 0..100 percent")
            self.train_interval = [int(iv[0]), int(iv[1])]
        for key in ("val_offset", "test_offset"):
            v = getattr(self, key)
            want(key, v is None or (is_int(v) and v > 0), "must be a positive integer or null")
        for key in ("load_from_train", "streaming", "trust_remote_code", "shuffle"):
            want(key, isinstance(getattr(self, key), bool), "must be true or false")
        want("shuffle_seed", is_int(self.shuffle_seed), "must be an integer")
        want("buffer_size", is_int(self.buffer_size) and self.buffer_size > 0, "must be positive")
        want(
            "batch_agg_count",
            is_int(self.batch_agg_count) and self.batch_agg_count > 0,
            "must be positive",
        )
        try:
            check_padding_type(self.padding_type)
        except PLDRError as exc:
            raise PLDRError(f"data key 'padding_type': {exc}") from None
        base, interval = parse_split(self.split)
        if interval is not None and self.train_interval is not None:
            raise PLDRError("data keys 'split' and 'train_interval' both give an interval")
        if self.test_offset is not None and self.val_offset is None and self.val_split is None:
            # Like the original: the test set is placed after the validation set.
            raise PLDRError("data key 'test_offset' needs 'val_offset'")
        del base

    # ------------------------------------------------------------------ sources

    def train_bounds(self) -> tuple[Bound | None, Bound | None]:
        """The train interval's (start, end) bounds, from ``split`` or ``train_interval``."""
        _, interval = parse_split(self.split)
        if interval is not None:
            return interval
        if self.train_interval is None:
            return None, None
        pct = self.split_style == "percent"
        return Bound(self.train_interval[0], pct), Bound(self.train_interval[1], pct)


@dataclass(frozen=True)
class Bound:
    """One end of a document interval: a document index, or a percent of the split's size."""

    value: int
    percent: bool = False

    def resolve(self, total: int | None, what: str) -> int:
        """The document index, given the split size (needed for percents and negatives)."""
        if not self.percent and self.value >= 0:
            return self.value
        if total is None:
            raise PLDRError(f"{what}: a percent or negative bound needs the size of the split")
        if self.percent:
            # Rounded to the closest index, as the Hugging Face split syntax does.
            return max(0, min(total, round(self.value * total / 100)))
        return max(0, total + self.value)


_SPLIT_RE = re.compile(r"^\s*([^\[\]]+?)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(split: str) -> tuple[str, tuple[Bound | None, Bound | None] | None]:
    """Parse ``"train"``, ``"train[a:b]"`` or ``"train[a%:b%]"`` into a name and bounds."""
    m = _SPLIT_RE.match(split)
    if not m:
        raise PLDRError(f"data key 'split' is not NAME or NAME[start:end]: {split!r}")
    name, a, b = m.groups()
    if a is None and b is None and "[" not in split:
        return name, None

    def bound(text: str | None) -> Bound | None:
        if text is None:
            return None
        return Bound(int(text.rstrip("%")), text.endswith("%"))

    return name, (bound(a), bound(b))


def _base_source(cfg: DataConfig, source: str, split: str) -> sources.DocumentSource:
    if source == DEFAULT_SOURCE and cfg.format == "auto":
        return sources.ListSource(
            default_corpus(), description="default corpus (CPython pydoc topics)"
        )
    files = sources.find_files(source, cfg.format)
    if files is not None:
        return sources.FileSource(files, column=cfg.column, txt_split=cfg.txt_split)
    return sources.HFSource(
        source,
        split=split,
        column=cfg.column,
        subset=cfg.subset,
        data_files=cfg.data_files,
        streaming=cfg.streaming,
        trust_remote_code=cfg.trust_remote_code,
        cache_dir=cfg.cache_dir,
    )


def _sliced(
    base: sources.DocumentSource, start: Bound | None, stop: Bound | None, what: str
) -> sources.DocumentSource:
    if start is None and stop is None:
        return base
    needs_total = any(b is not None and (b.percent or b.value < 0) for b in (start, stop))
    total = base.count_documents() if needs_total else None
    a = start.resolve(total, what) if start is not None else 0
    b = stop.resolve(total, what) if stop is not None else None
    if b is not None and b < a:
        raise PLDRError(f"{what}: interval end {b} is before its start {a}")
    return sources.SliceSource(base, a, b)


def open_source(
    cfg: DataConfig, which: str = "train", check: bool = True
) -> sources.DocumentSource | None:
    """The document source of one split (``"train"``, ``"validation"`` or ``"test"``).

    Returns None when the configuration defines no such split (no offset and no split name). With
    ``check`` the source is opened at once, so a missing file, dataset or column fails here with a
    one-line PLDRError rather than in the middle of a run.
    """
    if which not in SPLITS:
        raise PLDRError(f"unknown data split {which!r}; use one of {', '.join(SPLITS)}")
    name, _ = parse_split(cfg.split)
    start, stop = cfg.train_bounds()
    source: sources.DocumentSource | None
    if which == "train":
        source = _sliced(_base_source(cfg, cfg.source, name), start, stop, "train interval")
    else:
        own_split = cfg.val_split if which == "validation" else cfg.test_split
        own_source = cfg.val_source if which == "validation" else None
        if own_source is not None:
            source = _base_source(cfg, own_source, own_split or name)
        elif own_split is not None:
            source = _base_source(cfg, cfg.source, own_split)
        elif cfg.load_from_train and (
            (which == "validation" and cfg.val_offset) or (which == "test" and cfg.test_offset)
        ):
            if stop is None:
                raise PLDRError(
                    f"data key '{'val' if which == 'validation' else 'test'}_offset' needs the end "
                    "of the train interval (train_interval or split='train[a:b]')"
                )
            # Offsets continue in the train interval's unit, right after its end.
            val = cfg.val_offset or 0
            lo = stop.value if which == "validation" else stop.value + val
            size = cfg.val_offset if which == "validation" else cfg.test_offset
            assert size is not None
            source = _sliced(
                _base_source(cfg, cfg.source, name),
                Bound(lo, stop.percent),
                Bound(lo + size, stop.percent),
                f"{which} interval",
            )
        else:
            source = None
    if source is not None and check:
        source.check()
    return source

"""Pretraining data: sources, tokenized fixed-length samples, resumable per-rank batches.

Typical use (one call per rank)::

    from pldr_llm.data import DataConfig, build_batches

    cfg = DataConfig(source="corpus/", column="text", val_offset=1000, train_interval=[0, 100000])
    train = build_batches(cfg, tokenizer, batch_size=16, context_length=1024,
                          rank=rank, world_size=world_size)
    batch = next(train)                 # LongTensor [16, 1025]
    state = train.state_dict()          # save with the checkpoint (one per rank)
    train.load_state_dict(state)        # on resume: the same batches follow

See ``docs/data.md``.
"""

from typing import TYPE_CHECKING, Any

from pldr_llm.data.byte_tokenizer import ByteTokenizer
from pldr_llm.data.config import (
    DEFAULT_SOURCE,
    IGNORED_ORIGINAL_DATA_KEYS,
    ORIGINAL_DATA_KEYS,
    DataConfig,
    open_source,
    parse_split,
)
from pldr_llm.data.corpus import default_corpus
from pldr_llm.data.default_tokenizer import default_tokenizer_model
from pldr_llm.data.packing import PADDING_TYPES, chunk_group
from pldr_llm.data.sources import (
    DataFile,
    DocumentSource,
    FileSource,
    HFSource,
    ListSource,
    SliceSource,
    find_files,
)

if TYPE_CHECKING:
    from pldr_llm.data.batches import BatchIterator, Tokenizer, build_batches, reshard_states

_BATCH_NAMES = ("BatchIterator", "Tokenizer", "build_batches", "reshard_states")


def __getattr__(name: str) -> Any:
    # The batch iterator needs torch, which takes seconds to import; the config and the sources
    # do not, so config errors are reported before it is loaded.
    if name in _BATCH_NAMES:
        from pldr_llm.data import batches

        return getattr(batches, name)
    raise AttributeError(f"module 'pldr_llm.data' has no attribute {name!r}")


__all__ = [
    "DEFAULT_SOURCE",
    "IGNORED_ORIGINAL_DATA_KEYS",
    "ORIGINAL_DATA_KEYS",
    "PADDING_TYPES",
    "BatchIterator",
    "ByteTokenizer",
    "DataConfig",
    "DataFile",
    "DocumentSource",
    "FileSource",
    "HFSource",
    "ListSource",
    "SliceSource",
    "Tokenizer",
    "build_batches",
    "chunk_group",
    "default_corpus",
    "default_tokenizer_model",
    "find_files",
    "open_source",
    "parse_split",
    "reshard_states",
]

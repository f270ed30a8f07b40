"""Batches of fixed-length samples with an exactly resumable position, sharded per rank.

The pipeline of one rank, for one epoch::

    source documents (global order)
      -> shuffle in blocks of ``buffer_size`` documents (seed, epoch, block)   [if shuffle]
      -> keep every ``world_size``-th document, starting at ``rank``           [sharding]
      -> tokenize (``encode(text, add_eos=True)``), skipping empty documents
      -> groups of ``batch_size * batch_agg_count`` documents
      -> samples of ``sample_length`` ids (pack / pad / nopad, see :mod:`.packing`)
      -> batches of ``batch_size`` samples: LongTensor ``[batch_size, sample_length]``

Why block shuffling: the position of a rank in its stream must fit in a small checkpoint and be
restorable without replaying the run. A classic shuffle buffer's content depends on the whole
history; a block of ``buffer_size`` documents permuted by a seeded generator only depends on the
block index, so the position is just (epoch, document index at the start of the current group,
ids carried into that group, samples of that group already used). Resuming re-reads at most one
block and re-tokenizes at most one group.

Why interleaved sharding: every rank sees a disjoint share of the same global order, the shares
cover every document, and a run can be moved to a different number of ranks
(:func:`reshard_states`).

Epochs: with ``repeat=True`` the iterator never ends; each epoch reshuffles with a new seed. At the
end of an epoch the ids left in ``pack``'s carry and the last incomplete batch are dropped (the
original's DataLoader used ``drop_last=True``). With ``repeat=False`` the iterator stops after one
epoch.
"""

from __future__ import annotations

import array
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pldr_llm.core.errors import PLDRError
from pldr_llm.data.config import DataConfig, open_source
from pldr_llm.data.packing import check_padding_type, chunk_group
from pldr_llm.data.sources import DocumentSource

logger = logging.getLogger(__name__)

STATE_FORMAT = "pldr_llm.data.BatchIterator/1"
#: Ids of tokenized documents kept for the next epochs of a repeated corpus (int32: 64 MB).
MEMO_IDS = 16_000_000


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    If the object also has ``encode_batch(texts, add_eos=True) -> list[list[int]]`` it is used to
    encode a whole group at once.
    """

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``, ending with the end-of-text id when ``add_eos``."""
        ...


@dataclass
class _Position:
    """Where the next sample comes from (see the module docstring)."""

    epoch: int = 0
    doc: int = 0  # this rank's document index (within the epoch) where the current group starts
    carry: list[int] = field(default_factory=list)  # ids carried into the current group (pack)
    row: int = 0  # samples of the current group already used
    exhausted: bool = False  # repeat=False and the epoch is over


def _block_permutation(seed: int, epoch: int, block: int, n: int) -> np.ndarray:
    # SeedSequence mixes the three numbers into independent streams; PCG64's output for a given
    # seed is stable across NumPy versions, so a resumed run on another machine agrees.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, block])))
    return rng.permutation(n)


@dataclass(eq=False)
class BatchIterator:
    """An endless (or one-epoch) iterator of ``[batch_size, sample_length]`` LongTensor batches.

    ``state_dict()`` after any batch captures the exact position; a new iterator built with the same
    arguments and given that state with ``load_state_dict()`` yields exactly the batches the first
    one would have yielded next. Each rank builds its own iterator (``rank``, ``world_size``) and
    saves its own state.

    Attributes (all but ``source`` and ``tokenizer`` are given by keyword):
        source: the documents (all ranks pass the same source).
        tokenizer: any object with ``encode(text, add_eos=True) -> list[int]``.
        batch_size: samples per batch (per rank).
        sample_length: ids per sample; the trainer uses ``context_length + 1`` (inputs are
            ``batch[:, :-1]``, targets ``batch[:, 1:]``).
        padding_type: ``"pack"``, ``"pad"`` or ``"nopad"``.
        batch_agg_count: documents are packed in groups of ``batch_size * batch_agg_count``.
        shuffle, seed, buffer_size: block shuffling of the documents.
        rank, world_size: this rank takes documents ``rank, rank + world_size, ...``.
        repeat: cycle epochs forever (training) or stop after one epoch (evaluation).
        pad_id: the padding id of ``pad`` mode.
    """

    source: DocumentSource
    tokenizer: Tokenizer
    _: KW_ONLY
    batch_size: int
    sample_length: int
    padding_type: str = "pack"
    batch_agg_count: int = 100
    shuffle: bool = False
    seed: int = 0
    buffer_size: int = 20000
    rank: int = 0
    world_size: int = 1
    repeat: bool = True
    pad_id: int = 0

    def __post_init__(self) -> None:
        check_padding_type(self.padding_type)
        for name in ("batch_size", "sample_length", "batch_agg_count", "buffer_size", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PLDRError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise PLDRError(f"rank {self.rank} is outside world size {self.world_size}")
        self._pos = _Position()
        self._batches = 0
        self._gen: Iterator[torch.Tensor] | None = None
        self._memo: dict[str, array.array] = {}  # tokenized documents of a repeated corpus
        self._memo_ids = 0

    # ------------------------------------------------------------------ properties

    @property
    def group_size(self) -> int:
        """Documents per packing group: ``batch_size * batch_agg_count``."""
        return self.batch_size * self.batch_agg_count

    @property
    def batches_yielded(self) -> int:
        """Batches yielded since the start of the stream (counted across resumes)."""
        return self._batches

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._pos.epoch

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> torch.Tensor:
        if self._gen is None:
            self._gen = self._generate()
        return next(self._gen)

    def _own_documents(self, epoch: int, start: int) -> Iterator[str]:
        """This rank's documents of ``epoch`` from its own index ``start`` on."""
        w, r = self.world_size, self.rank
        first = start * w + r  # global (shuffled) position of the first wanted document
        if not self.shuffle:
            docs = self.source.iter_documents(first)
            yield from itertools.islice(docs, 0, None, w)
            return
        size = self.buffer_size
        block = first // size
        docs = self.source.iter_documents(block * size)
        while True:
            items = list(itertools.islice(docs, size))
            if not items:
                return
            perm = _block_permutation(self.seed, epoch, block, len(items))
            base = block * size
            lo = max(first, base)
            lo += (r - lo) % w  # next global position that belongs to this rank
            for q in range(lo, base + len(items), w):
                yield items[perm[q - base]]
            if len(items) < size:
                return
            block += 1

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Tokenize ``texts``; documents seen before come from the memo."""
        memo = self._memo
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        # A tokenizer may offer a faster batched encoder; the result must be the same.
        batch = getattr(self.tokenizer, "encode_batch", None)
        if not todo:
            fresh = []
        elif batch is not None:
            fresh = list(batch(todo, add_eos=True))
        else:
            fresh = [self.tokenizer.encode(t, add_eos=True) for t in todo]
        done = dict(zip(todo, fresh))
        if self.repeat:
            # A small corpus is read again every epoch; its ids are kept (as int32 arrays,
            # MEMO_IDS at most) so that later epochs do not tokenize it again: on a background
            # thread that work holds the interpreter lock the training step needs to launch
            # its kernels.
            for text, ids in done.items():
                if self._memo_ids + len(ids) <= MEMO_IDS:
                    memo[text] = array.array("i", ids)
                    self._memo_ids += len(ids)
        return [done[t] if t in done else memo[t].tolist() for t in texts]

    def _generate(self) -> Iterator[torch.Tensor]:
        pos = self._pos
        if pos.exhausted:
            return
        epoch, doc, carry, skip = pos.epoch, pos.doc, list(pos.carry), pos.row
        fresh_epoch = doc == 0 and skip == 0 and not carry
        batch_size = self.batch_size
        while True:
            docs = self._own_documents(epoch, doc)
            parts: list[torch.Tensor] = []
            filled = 0
            yielded_this_epoch = False
            while True:
                texts = list(itertools.islice(docs, self.group_size))
                if not texts:
                    break
                ids = self._encode([t for t in texts if t])
                rows, carry_out = chunk_group(
                    ids, self.sample_length, self.padding_type, carry, self.pad_id
                )
                next_doc = doc + len(texts)
                i = skip
                skip = 0
                while i < rows.shape[0]:
                    take = min(batch_size - filled, rows.shape[0] - i)
                    parts.append(rows[i : i + take])
                    filled += take
                    i += take
                    if filled == batch_size:
                        batch = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
                        parts, filled = [], 0
                        # The position of the *next* sample, recorded before handing the batch out
                        # so that state_dict() between two next() calls is exact.
                        if i < rows.shape[0]:
                            self._pos = _Position(epoch, doc, list(carry), i)
                        else:
                            self._pos = _Position(epoch, next_doc, list(carry_out), 0)
                        self._batches += 1
                        yielded_this_epoch = True
                        yield batch
                doc, carry = next_doc, carry_out
            # End of the epoch: the carry and the incomplete batch are dropped.
            if not self.repeat:
                self._pos = _Position(epoch, doc, [], 0, exhausted=True)
                return
            if fresh_epoch and not yielded_this_epoch:
                raise PLDRError(
                    f"data source {self.source.description} gives rank {self.rank} of "
                    f"{self.world_size} no complete batch of {batch_size} x {self.sample_length} "
                    "ids in a whole epoch; use more data or a smaller batch/context"
                )
            epoch, doc, carry, skip = epoch + 1, 0, [], 0
            fresh_epoch = True
            self._pos = _Position(epoch, 0, [], 0)

    # ------------------------------------------------------------------ state

    def _settings(self) -> dict[str, Any]:
        return {
            "source": self.source.description,
            "batch_size": self.batch_size,
            "sample_length": self.sample_length,
            "padding_type": self.padding_type,
            "batch_agg_count": self.batch_agg_count,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "buffer_size": self.buffer_size,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """The exact position in the stream: a small JSON-serializable dictionary."""
        pos = self._pos
        return {
            "format": STATE_FORMAT,
            "epoch": pos.epoch,
            "doc": pos.doc,
            "carry": list(pos.carry),
            "row": pos.row,
            "exhausted": pos.exhausted,
            "batches": self._batches,
            "settings": self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict` (same settings required).

        Raises PLDRError naming the first setting that differs (a different ``world_size`` needs
        :func:`reshard_states` first).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise PLDRError("not a data iterator state (format key missing or unknown)")
        saved = state.get("settings", {})
        for key, value in self._settings().items():
            if key == "source":
                # A moved data folder changes the description but not the documents: warn only.
                if saved.get(key) != value:
                    logger.warning(
                        "data state was saved for source %r, resuming on %r", saved.get(key), value
                    )
                continue
            if saved.get(key) != value:
                hint = "; use pldr_llm.data.reshard_states" if key == "world_size" else ""
                raise PLDRError(
                    f"data state was saved with {key}={saved.get(key)!r}, this run has "
                    f"{key}={value!r}{hint}"
                )
        self._pos = _Position(
            epoch=int(state["epoch"]),
            doc=int(state["doc"]),
            carry=[int(t) for t in state["carry"]],
            row=int(state["row"]),
            exhausted=bool(state["exhausted"]),
        )
        self._batches = int(state.get("batches", 0))
        self._gen = None

    def reset(self) -> None:
        """Go back to the start of the stream (e.g. before each validation pass)."""
        self._pos = _Position()
        self._batches = 0
        self._gen = None


def reshard_states(states: Sequence[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Turn the data states of all old ranks into states for ``world_size`` new ranks.

    The new ranks restart at the earliest global document any old rank had not finished (the start
    of its current group), so no document is skipped; documents that other old ranks had already
    used past that point are seen again. Carries and partial groups are dropped. Exact resumption is
    only possible with an unchanged world size; this is the best approximation.
    """
    if not states:
        raise PLDRError("reshard_states needs the states of all old ranks")
    if world_size < 1:
        raise PLDRError(f"world_size must be positive, got {world_size}")
    old_w = states[0]["settings"]["world_size"]
    if len(states) != old_w:
        raise PLDRError(
            f"reshard_states needs {old_w} states (the old world size), got {len(states)}"
        )
    # (epoch, global position) of each old rank's next unfinished document.
    starts = [
        (s["epoch"], s["doc"] * old_w + s["settings"]["rank"])
        for s in states
        if not s.get("exhausted")
    ]
    exhausted = not starts
    epoch, first = min(starts) if starts else (states[0]["epoch"], 0)
    out = []
    for r in range(world_size):
        settings = dict(states[0]["settings"], rank=r, world_size=world_size)
        out.append(
            {
                "format": STATE_FORMAT,
                "epoch": epoch,
                # The smallest own index k with k * world_size + r >= first.
                "doc": max(0, -((r - first) // world_size)),
                "carry": [],
                "row": 0,
                "exhausted": exhausted,
                "batches": max(s.get("batches", 0) for s in states),
                "settings": settings,
            }
        )
    return out


def build_batches(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    context_length: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    repeat: bool | None = None,
    pad_id: int = 0,
    source: DocumentSource | None = None,
) -> BatchIterator | None:
    """The batch iterator of one split of ``cfg``, or None when the split is not configured.

    Samples hold ``context_length + 1`` ids, so ``batch[:, :-1]`` / ``batch[:, 1:]`` are inputs and
    targets of ``context_length`` tokens. Only the train split is shuffled; ``repeat`` defaults to
    True for train and False otherwise. The source is opened at once, so a missing file or column
    fails here; ``source``, the split's source already opened by :func:`open_source`, is used as
    it is (opening a percent interval of a streamed dataset counts its documents). Every rank
    must call this with the same ``cfg``.
    """
    if not isinstance(context_length, int) or context_length < 1:
        raise PLDRError(f"context_length must be a positive integer, got {context_length!r}")
    if source is None:
        source = open_source(cfg, split)
    if source is None:
        return None
    train = split == "train"
    return BatchIterator(
        source,
        tokenizer,
        batch_size=batch_size,
        sample_length=context_length + 1,
        padding_type=cfg.padding_type,
        batch_agg_count=cfg.batch_agg_count,
        shuffle=cfg.shuffle and train,
        seed=cfg.shuffle_seed,
        buffer_size=cfg.buffer_size,
        rank=rank,
        world_size=world_size,
        repeat=train if repeat is None else repeat,
        pad_id=pad_id,
    )

"""Training batches prepared on a background thread.

Tokenizing a group of documents, checking ids and pinning memory take the main thread away from
launching GPU work; done inline they show up as a periodic stall (one slow step whenever the
data iterator starts a new packing group). :class:`BatchFeed` runs the data iterator and a
``prepare`` function on a daemon thread, a few batches ahead.

The data position travels with each batch: ``state`` is the iterator's ``state_dict()`` taken
right after that batch, so a checkpoint written after a step records exactly the batches that
were consumed, however far the thread has read ahead.

:func:`prepare_batch` is the ``prepare`` function of training (``Trainer.prepare_batch``): it
checks a raw batch and splits it into micro-batches on the host.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from pldr_llm.core.config import check_token_range
from pldr_llm.core.errors import PLDRError

__all__ = ["BatchFeed", "FedBatch", "PreparedBatch", "prepare_batch", "split_batch"]


@dataclass
class PreparedBatch:
    """A batch checked and split on the host by :func:`prepare_batch`."""

    micro: list[torch.Tensor]  #: the micro-batches [b, L+1] (pinned CPU memory for a GPU)
    tokens: int  #: non-padding targets of this rank
    sequences: int
    padded: list[bool]  #: whether each micro-batch's inputs hold the pad id
    counts: torch.Tensor  #: ``[tokens, sequences]`` float64, for the global counts under FSDP


def prepare_batch(
    batch: torch.Tensor | list | tuple,
    grad_accum_steps: int,
    *,
    pad_id: int,
    vocab: int | None,
    pin: bool,
) -> PreparedBatch:
    """Check and split a raw batch [B, L+1] on the host (thread-safe; no device work).

    Everything the step would otherwise read back from the GPU is found here, on the CPU copy:
    the ids' range (below ``vocab``), the number of non-padding targets and whether each
    micro-batch's inputs hold padding (which picks the plain causal kernel or a mask). ``pin``
    (for a GPU) puts the micro-batches and counts in pinned memory.
    """
    micro = split_batch(batch, grad_accum_steps)
    tokens = 0
    padded: list[bool] = []
    prepared: list[torch.Tensor] = []
    for mb in micro:
        if vocab is not None:
            check_token_range(int(mb.min()), int(mb.max()), vocab)
        tokens += int((mb[:, 1:] != pad_id).sum())
        padded.append(bool((mb[:, :-1] == pad_id).any()))
        if pin and mb.device.type == "cpu":
            mb = mb.long().pin_memory()
        prepared.append(mb)
    sequences = sum(mb.shape[0] for mb in micro)
    counts = torch.tensor([float(tokens), float(sequences)], dtype=torch.float64)
    if pin:
        counts = counts.pin_memory()
    return PreparedBatch(prepared, tokens, sequences, padded, counts)


def split_batch(batch: torch.Tensor | list | tuple, grad_accum_steps: int) -> list[torch.Tensor]:
    """``grad_accum_steps`` micro-batches of a [B, L+1] batch (a list or tuple is taken as the
    micro-batches already), each checked: 2-D, integer ids, length >= 1 plus its target."""
    if isinstance(batch, (list, tuple)):
        micro = list(batch)
    else:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2:
            raise PLDRError("a training batch must be a LongTensor [batch, length + 1]")
        n = grad_accum_steps
        if batch.shape[0] % n:
            raise PLDRError(
                f"batch of {batch.shape[0]} sequences cannot be split into "
                f"'grad_accum_steps' = {n} micro-batches"
            )
        micro = list(batch.chunk(n)) if n > 1 else [batch]
    for mb in micro:
        if not isinstance(mb, torch.Tensor) or mb.dim() != 2 or mb.shape[1] < 2:
            shape = tuple(mb.shape) if isinstance(mb, torch.Tensor) else type(mb).__name__
            raise PLDRError(
                f"a training batch must be [batch, length + 1] with length >= 1, got {shape}"
            )
        if mb.dtype not in (torch.int64, torch.int32):
            raise PLDRError(f"a training batch must hold integer ids, got {mb.dtype}")
    return micro


@dataclass
class FedBatch:
    """One batch as the trainer receives it."""

    batch: Any  #: what ``prepare`` made of the raw batch
    state: Any  #: the data iterator's ``state_dict()`` after this batch (``None`` if it has none)
    epoch: int | None  #: the data iterator's ``epoch`` after this batch (``None`` if it has none)


_END = object()


class BatchFeed:
    """Yields :class:`FedBatch` items from ``data`` (an iterable); ``None`` at its end.

    ``depth`` > 0 prepares up to that many batches ahead on a daemon thread; 0 works inline.
    An exception raised by the iterator or by ``prepare`` is re-raised by :meth:`next`.
    """

    def __init__(self, data: Any, prepare: Callable[[Any], Any], depth: int = 4) -> None:
        self._data = data
        self._iterator: Iterator = iter(data)
        self._prepare = prepare
        self._depth = depth
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._done = False
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="pldr-batch-feed", daemon=True)
            self._thread.start()

    def _produce(self) -> FedBatch | object:
        raw = next(self._iterator, _END)
        if raw is _END:
            return _END
        state_dict = getattr(self._data, "state_dict", None)
        epoch = getattr(self._data, "epoch", None)
        return FedBatch(
            self._prepare(raw),
            state_dict() if callable(state_dict) else None,
            epoch if isinstance(epoch, int) else None,
        )

    def _put(self, item: Any) -> bool:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._produce()
            except BaseException as error:  # noqa: BLE001 - handed to the consumer
                self._put(error)
                return
            if not self._put(item) or item is _END:
                return

    def next(self) -> FedBatch | None:
        """The next batch, or ``None`` when the data ended."""
        if self._done:
            return None
        item = self._produce() if self._queue is None else self._queue.get()
        if item is _END:
            self._done = True
            return None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return cast(FedBatch, item)  # neither the end nor an error: a batch

    def close(self) -> None:
        """Stop the thread (batches it read ahead are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

"""Training batches prepared on a background thread.

Tokenizing a group of documents, checking ids and pinning memory take the main thread away from
launching GPU work; done inline they show up as a periodic stall (one slow step whenever the
data iterator starts a new packing group). :class:`BatchFeed` runs the data iterator and a
``prepare`` function on a daemon thread, a few batches ahead.

The data position travels with each batch: ``state`` is the iterator's ``state_dict()`` taken
right after that batch, so a checkpoint written after a step records exactly the batches that
were consumed, however far the thread has read ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

__all__ = ["BatchFeed", "FedBatch"]


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

"""Continuous batching: one worker thread owns the decoding engine and the model.

Requests wait in a bounded queue (:class:`QueueFull` when it is full: the server answers 429).
The worker turns a pipeline of blocks of ``tokens_per_sync`` steps (:meth:`DecodeEngine.launch`,
:meth:`DecodeEngine.collect_block`): the device runs a block's steps back to back and the host
reads them once, instead of stopping the device at every token. Each turn of the worker:

1. collects the block in flight (the one host sync of the turn);
2. frees the slots of cancelled sequences (their client went away) and admits waiting sequences
   into free slots, first come first served (their prompts prefilled together; the engine is
   idle between the collect and the next launch, the only time it takes new rows);
3. launches the next block for every sequence running, the new ones included;
4. routes the collected block's tokens to their sequences while the device computes the next:
   each sequence's tokens of the block together (one push to its detokenizer: text deltas and
   stop strings from :class:`pldr_llm.generation.Detokenizer`, ``max_tokens``; one event), and
   releases the slots of sequences that ended.

So the device never waits for the host's routing or for an admission to be decided, and a new
request's first token comes at most two blocks after it arrives. A sequence that ends mid-way
through a block (a stop string), or in a block whose successor was already launched, discards
the later tokens. Other work on the model (the deductive outputs) runs on the same thread
between turns, so nothing else ever touches the model concurrently.

An admission's prompt pass is some five hundred kernel launches and a replayed graph per layer
for the metric learner (core.metric_graphs; ~5-6 ms of host time on an H200 for up to 32
prompts, 12-13 ms uncaptured), during which the device idles. Admitting after the launch instead, so that
this host work overlaps the block, was built and measured (session 9, BENCHMARKS.md): it was
slower (256 streams: 88k -> 61-64k tokens/s), because the server is bound by the interpreter
lock, not the device: at 256 streams the event loop's thread and this worker together hold it
nearly all the time, and the new rows joined one block later.

Results travel to the asyncio side through ``loop.call_soon_threadsafe`` (once per turn) into
each request's :class:`EventInbox` of :class:`Event`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pldr_llm.core.engine_cache import EngineSpec, give_back_engine, lend_engine
from pldr_llm.core.errors import PLDRError
from pldr_llm.generation import BlockOutput, Detokenizer, SamplingParams
from pldr_llm.serve.metrics import Metrics


class QueueFull(Exception):
    """The waiting queue is at its bound."""


class ShuttingDown(Exception):
    """The server no longer takes requests."""


@dataclass
class Event:
    """A piece of one sequence's output: ``text`` delta (with the tokens routed since the last
    event, their logprobs and, when asked for, their top alternatives ``(id, logprob)``), or the
    end (``finish_reason`` set), or an ``error``."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    index: int = 0  # the choice this event belongs to


class EventInbox:
    """The events of one request's sequences on the event loop's side (event loop thread only):
    what the worker delivered since the handler last looked, taken all at once.

    In place of an :class:`asyncio.Queue`, which makes a future per ``get`` and, to take what
    else is there, a call per event: at 256 streams the loop's time per event is taken from the
    worker (the interpreter lock), so here a delivery is an append and at most one wake-up."""

    def __init__(self) -> None:
        self._items: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, event: Event) -> None:
        self._items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Event]:
        """Every event delivered so far, in order, once there is at least one (cancelling the
        wait loses none: they stay for the next call)."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class GenSequence:
    """One sequence being generated (a choice of a request)."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stops: Sequence[str],
        tokenizer: Any,
        loop: asyncio.AbstractEventLoop,
        events: EventInbox,
        index: int = 0,
        key: tuple[bool, bool] = (True, True),
    ) -> None:
        self.index = index
        self.key = key  # (KV-cache on, G-cache on)
        self.prompt_ids = prompt_ids
        self.params = params
        self.detok = Detokenizer(tokenizer, prompt_ids, stops)
        self.loop = loop
        self.events = events  # shared by the sequences of one request
        self.cancelled = False
        self.slot: int | None = None
        self.created = time.perf_counter()
        self.last_token_at: float | None = None
        self.pending_text = ""  # routed but not yet posted (posted once per step or block)
        self.pending_tokens: list[int] = []
        self.pending_logprobs: list[float] = []
        self.pending_tops: list[list[tuple[int, float]]] = []
        self.produced = 0

    def take_pending(self) -> Event:
        """The text and tokens routed since the last event, as an event."""
        event = Event(
            self.pending_text, self.pending_tokens, self.pending_logprobs, self.pending_tops
        )
        self.pending_text, self.pending_tokens, self.pending_logprobs = "", [], []
        self.pending_tops = []
        return event

    def cancel(self) -> None:
        """The client went away: free the slot at the next step (safe from any thread)."""
        self.cancelled = True


def _deliver(items: list[tuple[GenSequence, Event]]) -> None:
    """On the event loop: hand each event to its request."""
    for seq, event in items:
        seq.events.put_nowait(event)


class Scheduler:
    """The worker thread, its waiting queue and the engine it owns."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        metrics: Metrics | None = None,
        engine_options: dict[str, Any] | None = None,
        tokens_per_sync: int = 1,
    ) -> None:
        if isinstance(tokens_per_sync, bool) or not isinstance(tokens_per_sync, int):
            raise PLDRError(f"tokens_per_sync must be an integer >= 1, got {tokens_per_sync!r}")
        if tokens_per_sync < 1:
            raise PLDRError(f"tokens_per_sync must be an integer >= 1, got {tokens_per_sync}")
        self.tokens_per_sync = tokens_per_sync
        # Engines with a block of steps launched (computing while the host routes the last).
        self._in_flight: set[tuple[bool, bool]] = set()
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        # One engine per cache mode (KV-cache on/off, G-cache on/off), made when first asked for:
        # the cache switches are per request, an engine's are fixed when it is built.
        self._engines: dict[tuple[bool, bool], Any] = {}
        self._engine_options = dict(engine_options or {})
        self._max_batch = max_batch
        # The default cache mode's step graphs are captured now, before the first request, for
        # its blocks of tokens_per_sync steps (a first request would otherwise wait
        # for the captures: ~0.2 s of its time to first token on an H200), and its prompt
        # pass's metric learner for admissions of up to 32 prompts (core.metric_graphs).
        self._engine_for((True, True)).warm_up(steps=[tokens_per_sync], prompt_rows=max_batch)
        self._waiting: collections.deque[GenSequence] = collections.deque()
        self._jobs: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            collections.deque()
        )
        self._running: dict[tuple[tuple[bool, bool], int], GenSequence] = {}
        self._outbox: list[tuple[GenSequence, Event]] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._lap_start = time.perf_counter()
        self._thread = threading.Thread(target=self._work, name="pldr-serve-worker", daemon=True)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def drain_and_stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued and running, then stop the worker."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # the engines are idle: back to the model's cache
            for engine in self._engines.values():
                give_back_engine(self.model, engine)
            self._engines.clear()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def _engine_for(self, key: tuple[bool, bool]) -> Any:
        """The engine of a cache mode, lent from the model's engine cache for the scheduler's
        lifetime (a ``generate`` call in this process with the same spec shares its graphs
        once the scheduler gives it back)."""
        engine = self._engines.get(key)
        if engine is None:
            spec = EngineSpec(
                self._max_batch, None, kv=key[0], g=key[1], output_logprobs=True,
                **self._engine_options,
            )  # fmt: skip
            engine = lend_engine(self.model, spec)
            self._engines[key] = engine
        return engine

    # ------------------------------------------------------------------ submitting
    def submit(self, seqs: Sequence[GenSequence]) -> None:
        """Queue the sequences of one request (all or none: :class:`QueueFull`)."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull()
            self._waiting.extend(seqs)
            self._cond.notify_all()

    def run_on_worker(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker thread between two steps; a future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self._accepting:
                raise ShuttingDown()
            self._jobs.append((fn, future))
            self._cond.notify_all()
        return future

    # ------------------------------------------------------------------ the worker
    def _post(self, seq: GenSequence, event: Event) -> None:
        event.index = seq.index
        self._outbox.append((seq, event))

    def _flush(self) -> None:
        """Send the events of this step: one wake-up per event loop, not one per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenSequence, Event]]] = {}
        for seq, event in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                for seq, _ in items:
                    seq.cancelled = True

    def _lap(self, phase: str) -> None:
        """Add the worker's seconds since its previous lap to ``phase`` (worker thread only)."""
        now = time.perf_counter()
        self.metrics.worker_seconds[phase] += now - self._lap_start
        self._lap_start = now

    def _work(self) -> None:
        self._lap_start = time.perf_counter()
        while True:
            with self._cond:
                while not (
                    self._waiting or self._running or self._jobs or self._in_flight or self._stop
                ):
                    self.metrics.worker_waits(self._lap_start)
                    self._cond.wait()
                self._lap_start = self.metrics.worker_woke(self._lap_start)  # the idle lap
                if self._stop and not (
                    self._waiting or self._running or self._jobs or self._in_flight
                ):
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # handed to the waiting request
                        future.set_exception(exc)
            self._lap("jobs")
            try:
                self._turn()
            except Exception as exc:  # a failing step ends its sequences, not the server
                self._abandon_blocks()
                for seq in list(self._running.values()):
                    self._finish(seq, None, error=f"generation failed: {exc}")
            self._lap("route")
            self._flush()
            self._lap("flush")

    def _turn(self) -> None:
        """Collect the blocks in flight, admit, launch the next blocks, route the collected
        ones (see the module's docstring)."""
        blocks = []
        for key in sorted(self._in_flight):
            block = self._engines[key].collect_block()
            # The block's sequences, looked up before admission reuses a slot that was released
            # while the block was in flight (its tokens there belong to the old sequence).
            owners = [self._running.get((key, slot)) for slot in block.slots]
            blocks.append((block, owners))
        self._in_flight.clear()
        self._lap("collect")
        for seq in list(self._running.values()):
            if seq.cancelled:
                self._finish(seq, None)
        self._admit()
        self._lap("admit")
        for key in sorted({k for k, _ in self._running}):
            engine = self._engines[key]
            if engine.active_slots:
                self.metrics.decode_steps += self.tokens_per_sync
                engine.launch(self.tokens_per_sync)
                self._in_flight.add(key)
        self._lap("launch")
        now = time.perf_counter()
        for block, owners in blocks:
            self._route(block, owners, now)

    def _abandon_blocks(self) -> None:
        """After a failure: wait for the blocks in flight and drop them (an engine takes no
        new rows while one is in flight)."""
        for key in list(self._in_flight):
            try:
                self._engines[key].collect_block()
            except Exception:  # noqa: BLE001 - the failure is reported by the caller
                pass
        self._in_flight.clear()

    def _admit(self) -> None:
        """Move waiting sequences into free slots, first come first served. Sequences of the same
        cache mode that arrive together are prefilled in one call. Only between a collect and
        the next launch (no block in flight: an engine takes no rows while it computes)."""
        while not self._in_flight:
            with self._cond:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                if not self._waiting:
                    return
                key = self._waiting[0].key
                try:
                    engine = self._engine_for(key)
                except Exception as exc:  # e.g. a cache mode this device cannot run
                    self._post(
                        self._waiting.popleft(), Event(finish_reason="error", error=str(exc))
                    )
                    continue
                batch: list[GenSequence] = []
                while (
                    self._waiting and len(batch) < engine.free_slots and self._waiting[0].key == key
                ):
                    seq = self._waiting.popleft()
                    if not seq.cancelled:
                        batch.append(seq)
            if not batch:
                return  # no free slot for the sequence at the head of the queue
            try:
                slots = engine.add_many([s.prompt_ids for s in batch], [s.params for s in batch])
            except Exception:
                slots = []
                for seq in batch:  # find the sequence that failed; admit the others
                    try:
                        slots.append(engine.add(seq.prompt_ids, seq.params))
                    except Exception as exc:
                        slots.append(None)
                        self._post(seq, Event(finish_reason="error", error=str(exc)))
            for seq, slot in zip(batch, slots):
                if slot is None:
                    continue
                seq.slot = slot
                self._running[(key, slot)] = seq

    def _route(self, block: BlockOutput, owners: list[GenSequence | None], now: float) -> None:
        """Hand a block's tokens to their sequences (``owners``: each slot's, None where it
        ended before the block was collected), each sequence's tokens at once. Events go
        out as the steps made them: the ends (a stop, the length) in step order, then one event
        per sequence that is still running, not one per token: with several tokens per sync the
        event loop's work (an SSE chunk each) is what limits a busy server."""
        eos_id = self.model.config.eos_id
        ends: list[tuple[int, int, GenSequence, str]] = []  # step, index, sequence, reason
        routed: list[GenSequence] = []
        first_seen: list[float] = []  # times to first token of this block
        gaps: list[float] = []  # the inter-token latencies of each sequence's first token
        same_time = 0  # its later tokens of the block: latency 0, they came together
        logprobs = block.logprobs
        tops = block.top_logprobs
        for i, (seq, tokens) in enumerate(zip(owners, block.token_ids)):
            if seq is None or seq.slot is None:  # ended earlier (a stop string, a cancel)
                continue
            if seq.last_token_at is None:
                first_seen.append(now - seq.created)
            else:
                gaps.append(now - seq.last_token_at)
            seq.last_token_at = now
            taken, reason = self._take_tokens(seq, tokens, block.finished[i], eos_id)
            same_time += taken - 1
            seq.pending_tokens += tokens[:taken]
            seq.pending_logprobs += logprobs[i][:taken] if logprobs else [0.0] * taken
            if tops and seq.params.logprobs:  # alternatives only where asked for
                seq.pending_tops += tops[i][:taken]
            if reason is None:
                routed.append(seq)
            else:
                ends.append((taken, i, seq, reason))
        self.metrics.completion_tokens += len(first_seen) + len(gaps) + same_time
        self.metrics.ttft.observe_many(first_seen)
        self.metrics.itl.observe_many(gaps, zeros=same_time)
        for _, _, seq, reason in sorted(ends, key=lambda end: end[:2]):
            self._finish(seq, reason)
        for seq in routed:
            if seq.pending_text:
                self._post(seq, seq.take_pending())

    @staticmethod
    def _take_tokens(
        seq: GenSequence, tokens: list[int], finished: bool, eos_id: int
    ) -> tuple[int, str | None]:
        """Push a block's ``tokens`` of ``seq`` to its text: how many it takes (the rest come
        after its end) and why it ends (None: it goes on). The end-of-text id adds no text."""
        limit = min(len(tokens), seq.params.max_new_tokens - seq.produced)
        eos = -1
        if seq.params.stop_at_eos and eos_id in tokens:
            eos = next((i for i in range(limit) if tokens[i] == eos_id), -1)
        text_ids = tokens[:eos] if eos >= 0 else tokens[:limit]
        before = seq.detok.new_count
        seq.pending_text += seq.detok.push(text_ids)
        reason: str | None = "stop"
        if seq.detok.stopped:
            taken = seq.detok.new_count - before
        elif eos >= 0:
            taken = eos + 1
        else:
            taken = limit
            ended = (finished and limit == len(tokens)) or seq.produced + limit >= (
                seq.params.max_new_tokens
            )
            reason = "length" if ended else None
        seq.produced += taken
        return taken, reason

    def _finish(self, seq: GenSequence, reason: str | None, error: str | None = None) -> None:
        if seq.slot is not None:
            self._engines[seq.key].release(seq.slot)
            self._running.pop((seq.key, seq.slot), None)
            seq.slot = None
        if seq.cancelled and reason is None and error is None:
            return
        seq.pending_text = "" if error else seq.pending_text + seq.detok.finish()
        event = seq.take_pending()
        event.finish_reason = reason or "error"
        event.completion_tokens = seq.produced
        event.error = error
        self._post(seq, event)

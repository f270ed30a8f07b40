"""Running the decoding step: as is, or captured in CUDA graphs replayed for every token.

:class:`StepGraphs` keys a step function and its captured graphs by step variant (what the
running rows need, :class:`~pldr_llm.core.decode_step.StepVariant`) and by block size ``n``
(``n`` steps in one graph, each step's report kept in a static [n, 3, B] buffer so that one
host read after the block sees them all), and blocks also by ``rows``: a block that runs only
the first ``rows`` rows of the buffers (views, :meth:`DecodeBuffers.first_rows`), when the slots
in use are all below it -- a server of 256 slots serving 40 streams computes 64 rows, not 256.
Capture is lazy (a variant's first use) or ahead (:meth:`StepGraphs.graph` from a warm-up).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from .decode_buffers import DecodeBuffers
from .graphs import capture_graph, maybe_compile, sdpa_backends

#: The fewest rows a launched block computes. A block computes only the rows up to the highest
#: slot in use (rounded up to a power of two: one captured graph per size), since slots are
#: taken lowest first: a server of 256 slots with 40 streams steps 64 rows, not 256.
MIN_BLOCK_ROWS = 8


class StepGraphs:
    """The step functions and captured graphs of one engine.

    ``step(variant)`` runs one step of ``variant`` on ``buffers``; ``compile`` passes it
    through torch.compile first; ``use_graph`` captures it (CUDA); ``steps_per_graph`` > 1
    also captures that many steps in one graph for :meth:`run` without a block;
    ``row_step(rows)`` makes the step of the first ``rows`` rows (None: blocks always run every
    row); ``stop_when_done`` (uncaptured steps on the CPU, where reading a flag costs nothing)
    ends a block at the step that reported the end of every active row: the steps after it
    would change nothing a caller reads."""

    def __init__(
        self,
        step: Callable[[Any], None],
        buffers: DecodeBuffers,
        *,
        use_graph: bool,
        compile: bool | dict[str, Any] = False,
        steps_per_graph: int = 1,
        row_step: Callable[[int], Callable[[Any], None]] | None = None,
        stop_when_done: bool = False,
    ) -> None:
        self._step = step
        self._row_step = row_step
        self.stop_when_done = stop_when_done and not use_graph
        self.buffers = buffers
        self.use_graph = use_graph
        self.compile = compile
        self.steps_per_graph = steps_per_graph
        self.capture_seconds = 0.0
        self._step_fns: dict[Hashable, Callable[[], None]] = {}
        self._graphs: dict[tuple[Hashable, int, int | None], Any] = {}
        self._reports: dict[tuple[int, int | None], Tensor] = {}

    def step_fn(self, variant: Hashable) -> Callable[[], None]:
        """The one-token step of ``variant`` (through torch.compile when asked)."""
        fn = self._step_fns.get(variant)
        if fn is None:
            fn = maybe_compile(functools.partial(self._step, variant), self.compile)
            self._step_fns[variant] = fn
        return fn

    @property
    def by_rows(self) -> bool:
        """Whether blocks can run fewer rows than the buffers hold."""
        return self._row_step is not None

    def rows_for(self, slots: Sequence[int]) -> int | None:
        """The rows a block of ``slots`` computes: the highest one's + 1, rounded up to a power
        of two (at least :data:`MIN_BLOCK_ROWS`); None (all rows) where that is not fewer."""
        if self._row_step is None or not slots:
            return None
        rows = max(MIN_BLOCK_ROWS, 1 << max(slots).bit_length())
        return rows if rows < self.buffers.ids.shape[0] else None

    def row_counts(self) -> list[int | None]:
        """Every row count :meth:`rows_for` can give (None: all rows)."""
        counts: list[int | None] = []
        rows = MIN_BLOCK_ROWS
        while self._row_step is not None and rows < self.buffers.ids.shape[0]:
            counts.append(rows)
            rows *= 2
        return [*counts, None]

    def report_buffer(self, n: int, rows: int | None = None) -> Tensor:
        """The static [n, 3, rows] buffer a block of ``n`` steps of the first ``rows`` rows
        (None: all) writes its reports to."""
        buffer = self._reports.get((n, rows))
        if buffer is None:
            report = self.buffers.report[:, :rows]
            buffer = torch.zeros(n, *report.shape, device=report.device)
            self._reports[(n, rows)] = buffer
        return buffer

    def block(self, variant: Hashable, n: int, rows: int | None = None) -> Callable[[], None]:
        """``n`` steps in a row (of the first ``rows`` rows; None: all); with n > 1 each step's
        report is kept in its buffer row, so one host read after the block sees every step (no
        host read inside: capturable)."""
        if rows is None:
            fn = self.step_fn(variant)
        else:
            assert self._row_step is not None, "blocks of fewer rows need row_step"
            fn = functools.partial(self._row_step(rows), variant)
        reports = self.report_buffer(n, rows) if n > 1 else None
        report = self.buffers.report[:, :rows]

        active = self.buffers.active[:rows]
        stop_when_done = self.stop_when_done and reports is not None

        def steps() -> None:
            for i in range(n):
                fn()
                if reports is not None:
                    reports[i].copy_(report)
                # Every active row's end reported: the reader counts no step after this one.
                if stop_when_done and bool(((report[1] != 0) | ~active).all()):
                    return

        return steps

    def run(
        self, variant: Hashable, count: int, block: int | None = None, rows: int | None = None
    ) -> None:
        """``count`` steps without a host sync (graph replays where captured); with ``block``
        (a block of steps), exactly ``count`` steps as one block whose reports are all kept,
        of the first ``rows`` rows (None: all)."""
        if block is not None or not self.use_graph:
            n = count if block is not None else 1
            rows = rows if block is not None else None
            steps = (
                self.graph(variant, n, rows).replay
                if self.use_graph
                else self.block(variant, n, rows)
            )
            with sdpa_backends():
                for _ in range(count // n):
                    steps()
            return
        many = self.steps_per_graph
        if count == 1 or many == 1:
            graph = self.graph(variant, 1)
            for _ in range(count):
                graph.replay()
            return
        # Rounded up to whole graphs of `many` steps: one capture serves every count, and extra
        # steps change nothing a caller reads (rows stop at their own max_new_tokens).
        graph = self.graph(variant, many)
        for _ in range(-(-count // many)):
            graph.replay()

    def graph(self, variant: Hashable, n: int, rows: int | None = None) -> Any:
        """The captured graph of ``n`` steps of ``variant`` of the first ``rows`` rows (None:
        all; captured now on first use)."""
        key = (variant, n, rows)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        start = time.perf_counter()
        steps = self.block(variant, n, rows)
        # Warm-up and capture run the step for real: with every row inactive it changes nothing
        # a row reads (the pending tokens' keys/values are rewritten with the same values).
        b = self.buffers
        kept = (b.active, b.done, b.report, b.logprob)
        saved = [t.clone() for t in kept]
        b.active.zero_()
        b.done.zero_()
        try:
            with sdpa_backends():
                graph, _ = capture_graph(steps, warmup=3 if n == 1 else 1)
        finally:
            for t, s in zip(kept, saved):
                t.copy_(s)
        torch.cuda.synchronize(b.ids.device)
        self.capture_seconds += time.perf_counter() - start
        self._graphs[key] = graph
        return graph

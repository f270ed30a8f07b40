"""The decoding loop: a static, slot-based decoder that every generation path runs on.

:class:`DecodeEngine` holds ``max_batch`` rows ("slots"), each an independent sequence with its
own KV-cache slot, G-cache row, sampling parameters and RNG stream. The KV-cache is allocated once
([max_batch, H, max_len, dk] per layer) and written in place at a per-row write index; the
attention bias masks padding and unwritten positions. Because no buffer ever moves, the one-token
step can be captured in a CUDA graph (with the sampling inside it) and replayed for every token.

A row computes exactly what it would alone: its prompt runs through :meth:`PLDRModel.forward`
alone (or batched with prompts of the same length, which is the same computation), and each step
attends only over the row's own keys with the reference's rules (a new key that is the pad id is
masked, rotary positions count every token). So batches of prompts of different lengths give each
row's lone result, and a sampled row depends only on its seed and parameters.

The cache modes of the original:

* KV on, G on: the prompt runs once, then one token per step; G_LM is inferred once.
* KV on, G off: one token per step; G_LM is recomputed every step from the cached metric tensor
  (with ``causal_metric``, A continues the cached running sum of ``q^T q`` with each new token).
* KV off, G on / off: the whole sequence runs every step (eager and slow, for comparison), with
  G_LM from the first pass (G on) or recomputed from the grown sequence (G off).

``g_init`` replaces the G-cache of the first pass (and of every pass when the G-cache is off), as
the original's ``Gcachelst_init``.

Steps are pipelined: :meth:`DecodeEngine.add` samples a row's first token, and each
:meth:`DecodeEngine.step` reports every active row's pending token while it computes the next one.
So the first :meth:`step` after :meth:`add` reports the slot's first token, and a row's last
token comes with ``finished=True``.

``record_deductive`` keeps the deductive outputs (A, A_LM, A_P, G_LM per layer) of every prompt
pass and step in :attr:`DecodeEngine.deductive` (eager only): the deductive cache-mode comparison
(:func:`pldr_llm.deductive.cache_mode_runs`) walks the cache modes on this loop.

The engine is assembled from parts that each own one responsibility: the static buffers
(:mod:`~.decode_buffers`), the host-side slot table (:mod:`~.slots`), the one-token step and its
sampling stage (:mod:`~.decode_step`), graph capture and replay (:mod:`~.step_graphs`) and the
reference/inspection loop (:mod:`~.reference_loop`: no-KV full re-run, deductive recording).
Engines are built and shared through :mod:`~.engine_cache` (one factory, one cache per model).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch

from .cache import GCacheEntry, GInit, prepare_g_init
from .decode_buffers import CacheLayout, DecodeBuffers, prompt_pass
from .decode_step import KVStep, StepVariant
from .engine_options import (
    check_block_size,
    check_engine_options,
    check_free,
    check_g_init,
    check_rows,
    choose_fused,
    packed_projections,
    padding_groups,
)
from .errors import PLDRError
from .metric_graphs import metric_graphs_for
from .model import PLDRModel
from .processing import to_device
from .reference_loop import DeductiveRecord, DeductiveRecorder, FullRerun
from .sampling import (
    MAX_STOP_IDS,
    SamplingMode,
    SamplingParams,
    batch_mode,
    draw_seed,
    row_mode,
    sample_rows,
)
from .slots import SlotTable
from .step_graphs import StepGraphs
from .step_output import BlockOutput, StepOutput, read_block

__all__ = [
    "MAX_STOP_IDS",
    "BlockOutput",
    "DecodeEngine",
    "DeductiveRecord",
    "StepOutput",
    "StepVariant",
]


class DecodeEngine:
    """Static, slot-based decoder: ``max_batch`` rows ("slots"), each an independent sequence with
    its own KV-cache slot (written in place, per-row write index), G-cache row, sampling
    parameters and RNG stream.

    ``max_len`` (default: the model's max_seq_len) bounds prompt + new tokens of a slot.
    ``cuda_graph`` (default: on for a CUDA model with the KV-cache) captures the one-token step
    the first time each :class:`StepVariant` runs; ``compile`` passes it through torch.compile
    first; ``steps_per_graph`` > 1 captures that many steps per graph for :meth:`advance`, and
    :meth:`step_many` k steps per graph. ``pack_projections`` (default: on CUDA) packs each
    layer's projections (:func:`packed_projections`). ``fused`` (default: on CUDA where it
    applies, not with ``compile``) runs the step as :func:`pldr_llm.core.fused.decode_hidden`
    and its bookkeeping kernels; ``fused=False`` keeps the op-by-op step. ``output_logprobs``
    reports each token's log-probability; ``keep_logits`` each step's raw logits.

    ``record_deductive`` appends a :class:`DeductiveRecord` to :attr:`deductive` for every prompt
    pass and every step (the caller reads and clears that list). It runs the eager attention
    (the scores are computed, as ``output_deductive=True`` does) without graphs or compile, and
    the static caches then also hold A (with the keys) and A_LM, A_P (with G_LM), as the
    original's caches do, so that a cached step reports them. It takes no ``g_init`` with the
    KV-cache.

    Not thread-safe: call it from one thread (a server's decoding loop), which owns the device
    buffers. The first :meth:`step` after :meth:`add` reports the slot's first token.
    """

    def __init__(
        self,
        model: PLDRModel,
        max_batch: int,
        max_len: int | None = None,
        *,
        cuda_graph: bool | None = None,
        compile: bool | dict[str, Any] = False,
        steps_per_graph: int = 1,
        enable_kvcache: bool = True,
        enable_Gcache: bool = True,
        output_logprobs: bool = False,
        keep_logits: bool = False,
        pack_projections: bool | None = None,
        record_deductive: bool = False,
        fused: bool | None = None,
    ) -> None:
        config = model.config
        max_len = check_engine_options(
            model, max_batch, max_len, steps_per_graph, record_deductive, compile, cuda_graph
        )
        self.model, self.config, self.device = model, config, model.device
        self.max_batch, self.max_len = max_batch, max_len
        self.enable_kvcache, self.enable_Gcache = enable_kvcache, enable_Gcache
        self.output_logprobs, self.keep_logits = output_logprobs, keep_logits
        self.record_deductive = record_deductive
        # A causal metric with the KV-cache and no G-cache: each step's layers continue the raw
        # running sum of q^T q held in the metric buffers (as model.forward with a KV-cache does).
        self.causal_running = (
            enable_kvcache and not enable_Gcache and config.causal_metric
            and config.version != "v510G"
        )  # fmt: skip
        use_graph_default = self.device.type == "cuda" and enable_kvcache and not record_deductive
        use_graph = use_graph_default if cuda_graph is None else bool(cuda_graph)
        if use_graph and not enable_kvcache:
            raise PLDRError("CUDA-graph decoding needs the KV-cache")
        self.fused = choose_fused(model, fused, compile, enable_kvcache, enable_Gcache,
                                  record_deductive)  # fmt: skip
        self.packed = packed_projections(model, pack_projections, self.fused, use_graph_default)
        # Key slots rounded up to a multiple of 8 (aligned rows for the fused attention kernels);
        # the extra slots are never written and always masked.
        self.slots = -(-max_len // 8) * 8
        layout = CacheLayout(
            enable_kvcache, enable_Gcache, self.causal_running,
            learned=record_deductive and config.version != "v510G",
        )  # fmt: skip
        self.buffers = DecodeBuffers.allocate(
            model, max_batch, self.slots, layout, keep_logits, output_logprobs
        )
        self.table = SlotTable(max_batch)
        self.recorder = (
            DeductiveRecorder(self.buffers, lambda: self.table.running)
            if record_deductive
            else None
        )
        self.kv_step = KVStep(
            model, self.buffers, packed=self.packed, fused=self.fused,
            enable_Gcache=enable_Gcache, causal_running=self.causal_running,
            output_logprobs=output_logprobs,
            recorder=self.recorder.record_step if self.recorder is not None else None,
        )  # fmt: skip
        self.rerun = (
            None if enable_kvcache else FullRerun(model, self.buffers, enable_Gcache, self.recorder)
        )
        # Launched blocks of the low rows only (not with the re-run, the recorder or compile).
        by_rows = enable_kvcache and self.recorder is None and not compile
        self.graphs = StepGraphs(
            self._step, self.buffers, use_graph=use_graph,
            compile=compile if enable_kvcache else False, steps_per_graph=steps_per_graph,
            row_step=self.kv_step.first_rows if by_rows else None,
            stop_when_done=self.device.type == "cpu" and self.recorder is None,
        )  # fmt: skip
        self._in_flight: tuple[list[int], int, int | None] | None = None  # slots, k, rows
        self.metric_graphs = metric_graphs_for(model, use_graph and not record_deductive, max_batch)

    # ------------------------------------------------------------------ state
    @property
    def use_graph(self) -> bool:
        """Whether the step runs as captured CUDA graphs."""
        return self.graphs.use_graph

    @property
    def capture_seconds(self) -> float:
        """Seconds spent capturing and compiling the step so far."""
        return self.graphs.capture_seconds

    @property
    def deductive(self) -> list[DeductiveRecord]:  # the passes recorded, oldest first
        return self.recorder.records if self.recorder is not None else []

    @property
    def free_slots(self) -> int:
        """Number of slots a request can be added to."""
        return len(self.table.free)

    @property
    def active_slots(self) -> list[int]:
        """Slots whose tokens are not all reported yet (in slot order)."""
        return sorted(self.table.running)

    def release(self, slot: int) -> None:
        """Free ``slot`` (a finished or cancelled request); its next :meth:`add` starts afresh."""
        if not 0 <= slot < self.max_batch or slot in self.table.free:
            raise PLDRError(f"slot {slot} is not in use")
        with torch.inference_mode():
            self.buffers.active[slot] = False
            self.buffers.done[slot] = False
        self.table.release(slot)
        if self.rerun is not None:
            self.rerun.release(slot)

    def finish(self, slot: int) -> None:
        """Stop ``slot`` now (e.g. a stop string matched): it reports nothing more but stays
        taken until :meth:`release`."""
        with torch.inference_mode():
            self.buffers.active[slot] = False
        self.table.running.discard(slot)

    def generated(self, slot: int) -> list[int]:
        """The ids generated in ``slot`` so far (reported or not)."""
        return self.generated_many([slot])[0]

    def generated_many(self, slots: Sequence[int]) -> list[list[int]]:
        """:meth:`generated` for several slots with one read from the device."""
        return self.buffers.generated_rows(slots)

    def logprobs_many(
        self, slots: Sequence[int]
    ) -> tuple[list[list[float]], list[list[list[tuple[int, float]]]]]:
        """For each of ``slots``, the log-probability of every token generated so far and its
        top alternatives (as many as the slot asked for: [] each when none), as
        :meth:`generated_many` reads the ids. Needs ``output_logprobs`` or slots that ask."""
        history = self.buffers.logprobs
        if history is None:
            raise PLDRError("no log-probabilities kept: build the engine with output_logprobs")
        index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            counts = self.buffers.n_generated[index].tolist()
        top_n = [self.table.top_n.get(slot, 0) for slot in slots]
        return history.read_rows(index, counts, top_n)

    # ------------------------------------------------------------------ prefill
    def add(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        g_init: GInit | None = None,
        forced_ids: Sequence[int] | None = None,
    ) -> int:
        """Prefill ``prompt_ids`` alone (as ``model.forward`` on it would), fill a free slot and
        sample its first token (reported by the next :meth:`step`); returns the slot.

        ``forced_ids`` (teacher forcing, for scoring a continuation) makes the slot emit these ids
        instead of sampled ones, with the logits/log-probabilities the model gives them.
        Raises :class:`PLDRError` when no slot is free or prompt + max_new_tokens exceeds max_len.
        """
        forced = [forced_ids] if forced_ids is not None else None
        return self.add_many([prompt_ids], [params], g_init, forced)[0]

    @torch.inference_mode()
    def add_many(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        g_init: GInit | None = None,
        forced_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[int]:
        """:meth:`add` for several prompts in one forward (same results as one by one).

        Prompts of different lengths are left-padded with an attention mask that keeps padding
        out of A, the keys and the rotary positions. (One corner differs from a lone run: a pad
        id *inside* such a prompt is attended to by the prompt pass, where alone it is masked.)
        """
        self._check_idle()
        check_free(len(prompts), len(self.table.free), self.max_batch)
        vocab = self.config.input_vocab_size
        rows, forced = check_rows(prompts, params, forced_ids, vocab, self.max_len)
        init = prepare_g_init(self.model, g_init)
        recorded = self.record_deductive and self.enable_kvcache
        check_g_init(init is not None, recorded, self.causal_running)
        for packed in self.packed or ():
            packed.refresh()  # the weights may have changed since the last request
        slots = self.table.take(len(rows))
        try:
            for group in padding_groups(rows, params, self.slots):
                self._prefill(
                    [slots[i] for i in group], [rows[i] for i in group],
                    [params[i] for i in group], init,
                    [forced[i] for i in group] if forced is not None else None,
                )  # fmt: skip
        except BaseException:
            self.buffers.active[slots] = False
            self.table.give_back(slots)
            raise
        return slots

    def _prefill(
        self,
        slots: list[int],
        rows: list[list[int]],
        params: list[SamplingParams],
        init: list[GCacheEntry] | None,
        forced: list[list[int]] | None,
    ) -> None:
        """The prompt pass of ``rows`` into ``slots``, and each row's first token."""
        b, device = self.buffers, self.device
        out, ids = prompt_pass(self.model, rows, init, self.record_deductive, self.metric_graphs)
        if self.recorder is not None:
            prefill = {s: (out.deductive or [], i) for i, s in enumerate(slots)}
            self.recorder.record("prefill", prefill)
        assert out.cache is not None
        index = to_device(slots, device, torch.long)
        if self.rerun is None:
            b.fill_caches(index, ids, out.cache, self.config.pad_id, init is not None)
        else:
            self.rerun.keep_rows(slots, rows, out.cache.g or [], init)
        seeds = [p.seed if p.seed is not None else draw_seed() for p in params]
        stop_lists = [
            list(p.stop_token_ids) + ([self.config.eos_id] if p.stop_at_eos else []) for p in params
        ]
        b.start_rows(index, params, seeds, stop_lists, forced)
        raw_logits = out.logits[:, -1].float()
        logits = b.start_processing(index, params, rows, stop_lists, raw_logits)
        modes = [row_mode(p, self.config.input_vocab_size) for p in params]
        first = sample_rows(
            logits, b.temperature[index], b.top_k[index], b.top_p[index], b.uniforms[index, 0],
            mode=batch_mode(modes),
        )  # fmt: skip
        first = torch.where(b.forced_len[index] > 0, b.forced[index, 0], first)
        top = any(p.logprobs for p in params)
        b.record_first_logprobs(index, logits, first, top, self.output_logprobs)
        if b.pending_logits is not None:
            b.pending_logits[index] = raw_logits
        b.set_first(index, first, ids.shape[1], out.cache.next_position)
        for r, (slot, mode, p) in enumerate(zip(slots, modes, params)):
            self.table.start(slot, mode, p, forced is not None and bool(forced[r]))

    # ------------------------------------------------------------------ the step
    def _step(self, variant: StepVariant) -> None:
        """One token for every running row: the fast step, or the full re-run without KV."""
        if self.rerun is None:
            self.kv_step(variant)
            return
        logits = self.rerun.logits()
        self.kv_step.advance_rows(logits, variant._replace(mode="filtered", forcing=True))

    @torch.inference_mode()
    def warm_up(
        self,
        steps: Sequence[int] = (1,),
        modes: Sequence[SamplingMode] = ("greedy", "plain", "filtered"),
        processed: Sequence[bool] = (False,),
        prompt_rows: int = 0,
    ) -> float:
        """Capture the step graphs of every mode in ``modes`` for blocks of each of ``steps``
        now, and run a one-token prompt through the prefill (which loads its kernels), instead
        of on the first request that needs them: a server calls this before it takes requests.
        ``processed`` (True among them) also captures the steps that process logits (penalties,
        bias, minimum length); ``prompt_rows`` the prompt pass's metric learner for admissions
        of 1 to that many prompts. Returns the seconds it took (nothing to do without CUDA graphs)."""
        self._check_idle()
        if not self.use_graph or not self.table.free:
            return 0.0
        start = time.perf_counter()
        penalty = 1.5 if any(processed) else 1.0  # allocates the processing buffers
        warm = SamplingParams(max_new_tokens=1, repetition_penalty=penalty)
        self.release(self.add([self.config.eos_id], warm))
        if self.metric_graphs is not None:
            self.metric_graphs.warm(self.model, min(prompt_rows, self.max_batch))
        for mode, n, process in itertools.product(modes, steps, processed):
            check_block_size(n)
            for rows in self.graphs.row_counts():  # each graph of blocks of fewer rows too
                self.graphs.graph(StepVariant(mode, processed=process), n, rows)
        return time.perf_counter() - start

    @torch.inference_mode()
    def advance(self, count: int) -> None:
        """Run ``count`` decoding steps without reporting (for :func:`generate`; read the ids
        with :meth:`generated`). Rows that finish stop advancing; nothing reads back to the host.
        With CUDA graphs of ``steps_per_graph`` steps, ``count`` is rounded up to whole graphs."""
        self._check_idle()
        if self.table.running:
            self.graphs.run(self.table.variant(), count)

    @torch.inference_mode()
    def all_done(self) -> bool:
        """True when every active slot has produced its last token (one host sync)."""
        if not self.table.running:
            return True
        return bool((self.buffers.done | ~self.buffers.active).all())

    @torch.inference_mode()
    def step(self) -> StepOutput:
        """One decoding step for every active slot (one host sync); reports each active slot's
        pending token. A slot whose token comes with ``finished=True`` stops; :meth:`release`
        it to reuse the slot."""
        self._check_idle()
        slots = self.active_slots
        if not slots:
            return StepOutput([], [], [], [] if self.output_logprobs else None)
        pending = self.buffers.pending_logits
        logits = pending[slots].clone() if pending is not None else None
        self.graphs.run(self.table.variant(), 1)
        out = self._read(self.buffers.report[None], slots).steps()[0]
        out.logits = logits
        return out

    @torch.inference_mode()
    def step_many(self, k: int) -> list[StepOutput]:
        """``k`` decoding steps with one host sync: the outputs of ``k`` :meth:`step` calls
        (the same tokens, in order), ending early once no slot is left.

        The k steps run as one block (one captured graph of k steps on CUDA) that keeps every
        step's report in a static buffer, read once at the end. A row that finishes mid-block
        stops advancing there, as with :meth:`step`, and is left out of the later outputs. With
        ``keep_logits`` (per-step logits) it is k :meth:`step` calls.
        """
        if self.buffers.pending_logits is not None:
            check_block_size(k)
            outputs = []
            for _ in range(k):
                if not self.table.running:
                    break
                outputs.append(self.step())
            return outputs
        self.launch(k)
        return self.collect()

    def _check_idle(self) -> None:
        if self._in_flight is not None:
            raise PLDRError("a block of steps is in flight: collect() it first")

    @torch.inference_mode()
    def launch(self, k: int) -> None:
        """Start a block of ``k`` steps for the active slots without waiting for the device;
        :meth:`collect` returns its outputs. Between the two the host is free (a server routes
        the previous block's tokens meanwhile); :meth:`release` may be called then (a released
        slot's tokens of the block are still reported: the caller drops them), but not
        :meth:`add`, :meth:`step` or another :meth:`launch`."""
        check_block_size(k)
        self._check_idle()
        if self.buffers.pending_logits is not None:
            raise PLDRError("launch() does not keep per-step logits: use step()")
        slots = self.active_slots
        rows = self.graphs.rows_for(slots)
        if slots:
            self.graphs.run(self.table.variant(), k, block=k, rows=rows)
        self._in_flight = (slots, k, rows)

    def collect(self) -> list[StepOutput]:
        """The outputs of the block :meth:`launch` started (one host sync): one
        :class:`StepOutput` per step, each with the slots that had not finished before it."""
        return self.collect_block().steps()

    @torch.inference_mode()
    def collect_block(self) -> BlockOutput:
        """:meth:`collect` as one :class:`BlockOutput` (each slot's tokens together)."""
        if self._in_flight is None:
            raise PLDRError("no block of steps in flight: launch() one first")
        slots, k, rows = self._in_flight
        self._in_flight = None
        buffer = self.graphs.report_buffer(k, rows) if k > 1 else self.buffers.report[None]
        return self._read(buffer, slots)

    def _read(self, buffer: torch.Tensor, slots: list[int]) -> BlockOutput:
        """The block of ``slots`` in the report ``buffer``; the slots it ends stop running."""
        block = read_block(buffer, slots, self.table, self.buffers.logprobs, self.output_logprobs)
        ended = sorted(block.ended() & self.table.running)  # not released meanwhile
        if ended:
            self.table.running.difference_update(ended)
            self.buffers.active[ended] = False
        return block

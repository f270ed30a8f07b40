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
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .cache import GCacheEntry, GInit, PLDRCache, StaticLayerKV, prepare_g_init
from .config import check_token_range
from .errors import PLDRError
from .fused import advance as advance_fused
from .fused import available as fused_available
from .fused import decode_hidden
from .fused import supports as fused_supports
from .graphs import capture_graph, maybe_compile, sdpa_backends
from .model import PLDRModel
from .plga import MASK_VALUE, Deductive
from .processing import LogprobHistory, RowProcessing
from .sampling import (
    MAX_STOP_IDS,
    SamplingMode,
    SamplingParams,
    batch_mode,
    draw_seed,
    row_mode,
    sample_rows,
    uniform_draws,
)

__all__ = ["MAX_STOP_IDS", "DecodeEngine", "DeductiveRecord", "StepOutput", "StepVariant"]


class StepVariant(NamedTuple):
    """A variant of the one-token step, from what the running rows need: the sampling mode,
    whether any row is teacher-forced, has its logits processed (penalties, bias, a minimum
    length) or asks for top log-probabilities. Each variant is captured on its first use, so
    rows without an option never pay for it."""

    mode: SamplingMode
    forcing: bool = False
    processed: bool = False
    top_logprobs: bool = False


@dataclass
class StepOutput:
    """What one :meth:`DecodeEngine.step` produced: one token per slot that was active.

    ``finished[i]`` is True when ``token_ids[i]`` is the slot's last token (end-of-text, a stop id,
    or max_new_tokens reached). ``logprobs`` (with ``output_logprobs``, or when a slot asks for
    ``SamplingParams.logprobs``) is the log-probability of each token under the model's
    processed distribution (penalties and bias applied) at temperature 1, before the filters;
    ``top_logprobs[i]`` (when a slot asks) its top ``logprobs`` alternatives as (id, logprob),
    best first (empty for slots that do not ask).
    """

    slots: list[int]
    token_ids: list[int]
    finished: list[bool]
    logprobs: list[float] | None = None
    logits: Tensor | None = None  # [n, V] raw float32 logits of each token (``keep_logits``)
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class DeductiveRecord:
    """The deductive outputs of one model pass of :class:`DecodeEngine` (``record_deductive``).

    ``stage`` is ``"prefill"`` (the prompt pass of :meth:`~DecodeEngine.add_many`) or ``"step"``
    (one decoding step: each slot's pass over the token that step reports). ``outputs[slot]``
    holds one :class:`~pldr_llm.core.plga.Deductive` per layer, batch dimension 1, as
    ``model.forward(..., output_deductive=True)`` gives them for that pass: A, A_LM, A_P, G_LM
    (a tensor the pass does not compute, e.g. A when the G-cache skips the metric learner without
    a KV-cache, is None; attention scores are left out).
    """

    stage: Literal["prefill", "step"]
    outputs: dict[int, list[Deductive]]


def _row(t: Tensor | None, i: int) -> Tensor | None:
    """Row ``i`` of a batched tensor ([1, ...] as is: it broadcasts over the batch)."""
    if t is None:
        return None
    return t if t.shape[0] == 1 else t[i : i + 1]


class DecodeEngine:
    """Static, slot-based decoder: ``max_batch`` rows ("slots"), each an independent sequence with
    its own KV-cache slot (written in place, per-row write index), G-cache row, sampling
    parameters and RNG stream.

    ``max_len`` (default: the model's max_seq_len) bounds prompt + new tokens of a slot.
    ``cuda_graph`` (default: on for a CUDA model with the KV-cache) captures the one-token step,
    lazily, the first time each variant runs: one per sampling mode of the running rows
    (``greedy``: arg-max only; ``plain``: temperature and the draw, no row filters;
    ``filtered``: the sort-based filters), see :func:`~pldr_llm.core.sampling.batch_mode`,
    and whether a row is teacher-forced. ``pack_projections`` (default: on CUDA) runs each
    layer's query/key/value and FFN input projections as one matrix product each. ``compile`` passes
    the step through torch.compile first; ``steps_per_graph`` > 1 also captures that many steps in
    one graph for :meth:`advance` (used by :func:`generate`), and :meth:`step_many` captures k
    steps in one graph (the server's several tokens per host sync). On the CPU the same
    step runs eagerly. ``fused`` (default: on CUDA where it applies, not with ``compile``) runs
    the step as :func:`pldr_llm.core.fused.decode_hidden` and its bookkeeping kernels, nine
    kernels a layer; ``fused=False`` keeps the op-by-op step (``PLDRModel.run_layers``).
    ``capture_seconds`` accumulates the time spent capturing and compiling.

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
        if record_deductive and (compile or cuda_graph):
            raise PLDRError(
                "record_deductive runs the eager step: it cannot be combined with cuda_graph "
                "or compile"
            )
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise PLDRError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        max_len = config.max_seq_len if max_len is None else max_len
        if not 2 <= max_len <= config.max_seq_len:
            raise PLDRError(
                f"max_len must be in [2, max_seq_len={config.max_seq_len}], got {max_len}"
            )
        if steps_per_graph < 1:
            raise PLDRError(f"steps_per_graph must be >= 1, got {steps_per_graph}")
        self.model = model
        self.config = config
        self.max_batch = max_batch
        self.max_len = max_len
        self.enable_kvcache = enable_kvcache
        self.enable_Gcache = enable_Gcache
        self.output_logprobs = output_logprobs
        self.keep_logits = keep_logits
        self.record_deductive = record_deductive
        #: the recorded passes (``record_deductive``), oldest first
        self.deductive: list[DeductiveRecord] = []
        # Per slot, the generated count of its last recorded step (a finished row that stays in a
        # block of steps is recorded once).
        self._recorded_n: dict[int, int] = {}
        self.steps_per_graph = steps_per_graph
        self.capture_seconds = 0.0
        device, dtype = model.device, model.dtype
        self.device = device
        # A causal metric with the KV-cache and no G-cache: each step's layers continue the raw
        # running sum of q^T q held in `metric` (as model.forward with a KV-cache does).
        self.causal_running = (
            enable_kvcache
            and not enable_Gcache
            and config.causal_metric
            and config.version != "v510G"
        )
        self.use_graph = (
            device.type == "cuda" and enable_kvcache and not record_deductive
            if cuda_graph is None
            else bool(cuda_graph)
        )
        if self.use_graph and not enable_kvcache:
            raise PLDRError("CUDA-graph decoding needs the KV-cache")
        # Each layer's wq|wk|wv and gluw1|gluw2 packed into one matrix each (copies, refreshed
        # when the weights change): five matrix-vector products a layer instead of seven. On by
        # default on CUDA, where a decoding step is a chain of small kernels; the CPU keeps the
        # model's own projections (and so exactly model.forward's arithmetic).
        if pack_projections is None:
            pack_projections = device.type == "cuda" and enable_kvcache and not record_deductive
        # The fused kernels of the one-token step (pldr_llm.core.fused: nine kernels a layer
        # instead of ~17): by default wherever they run, with or without CUDA graphs (so the
        # captured and the uncaptured loop compute the same), but not with torch.compile,
        # which fuses the step itself. fused=False keeps the op-by-op step.
        why_not = self._why_not_fused(model, enable_kvcache, enable_Gcache, record_deductive)
        if fused is None:
            fused = why_not is None and device.type == "cuda" and not compile
        elif fused and why_not is not None:
            raise PLDRError(f"fused decoding cannot run here: {why_not}")
        self.fused = fused
        pack_projections = pack_projections or fused
        self.packed = (
            [layer.pack() for layer in model.decoder.dec_layers] if pack_projections else None
        )
        # Key slots rounded up to a multiple of 8 (aligned rows for the fused attention kernels);
        # the extra slots are never written and always masked.
        slots = -(-max_len // 8) * 8
        self.slots = slots
        heads, depth, vocab = config.num_heads, config.depth, config.input_vocab_size
        batch = max_batch

        with torch.inference_mode():

            def zeros(*size: int, dt: torch.dtype = torch.long) -> Tensor:
                return torch.zeros(size, dtype=dt, device=device)

            self.ids = zeros(batch, 1)  # pending token: the input of the next step
            # Three per-row counters that every step advances together (one kernel): the
            # pending token's rotary position, the KV slot its key/value go to, and the tokens
            # generated so far (the pending one included).
            self.counters = zeros(3, batch)
            self.position = self.counters[0].view(batch, 1)
            self.write_index = self.counters[1]
            self.n_generated = self.counters[2]
            self.active = zeros(batch, dt=torch.bool)
            self.done = zeros(batch, dt=torch.bool)  # the pending token is the row's last
            # The attention bias over each row's key slots (0 or the mask value, like the
            # original's): unwritten slots stay masked, a step unmasks the slot it writes
            # unless its token is the pad id.
            self.key_bias = torch.full((batch, slots), MASK_VALUE, dtype=dtype, device=device)
            self._bias_values = torch.tensor([MASK_VALUE, 0.0], dtype=dtype, device=device)
            self.history = zeros(batch, slots)  # generated ids per row
            self.slot_steps = torch.arange(slots, device=device)
            self.temperature = torch.ones(batch, device=device)
            self.top_k = zeros(batch)
            self.top_p = torch.ones(batch, device=device)
            # Each row's random number for each of its tokens (uniform_draws of its seed),
            # drawn when the row is added: a step reads one instead of hashing.
            self.uniforms = zeros(batch, slots, dt=torch.float32)
            self.max_new = zeros(batch)
            # Stop ids per row, end-of-text among them when the row stops there (-1: unused).
            self.stop_ids = torch.full(
                (batch, MAX_STOP_IDS + 1), -1, dtype=torch.long, device=device
            )
            # Teacher forcing (scoring): row b's n-th new token is forced[b, n] while n < forced_len.
            self.forced = zeros(batch, slots)
            self.forced_len = zeros(batch)
            self.logprob = zeros(batch, dt=torch.float32)
            self.pending_logits = zeros(batch, vocab, dt=torch.float32) if keep_logits else None
            self.report = zeros(3, batch, dt=torch.float32)  # token, finished, logprob
            self.metric: list[Tensor] | None = None
            if enable_kvcache:
                # Recording a model that learns G: the caches also hold A, A_LM and A_P.
                learned = record_deductive and config.version != "v510G"
                if not enable_Gcache or learned:
                    # G_LM is recomputed each step from A, except on rows given a G_init.
                    self.metric = [
                        zeros(batch, heads, depth, depth, dt=dtype)
                        for _ in range(config.num_layers)
                    ]
                if not enable_Gcache:
                    self.g_fixed = zeros(batch, dt=torch.bool)
                shape = (batch, heads, slots, depth)
                self.kv = [
                    StaticLayerKV(
                        zeros(*shape, dt=dtype),
                        zeros(*shape, dt=dtype),
                        self.write_index,
                        self.metric[i]
                        if (learned or self.causal_running) and self.metric is not None
                        else None,
                    )
                    for i in range(config.num_layers)
                ]
                square = (batch, heads, depth, depth)
                self.g = [
                    GCacheEntry(
                        zeros(*square, dt=dtype) if learned else None,
                        zeros(*square, dt=dtype),
                        zeros(*square, dt=dtype) if learned else None,
                    )
                    for _ in range(config.num_layers)
                ]
        # Without the KV-cache: per slot, its prompt (host ids) and its G-cache (or None).
        self._prompts: dict[int, list[int]] = {}
        self._slot_g: dict[int, list[GCacheEntry] | None] = {}
        self._free = list(range(batch))
        self._running: set[int] = set()  # active slots whose last token is not reported yet
        # Each slot's sampling mode, and the teacher-forced slots (host side, so choosing a step
        # variant needs no sync).
        self._mode: dict[int, SamplingMode] = {}
        self._forced_slots: set[int] = set()
        # Slots whose logits are processed, top alternatives asked per slot, and tokens reported
        # per slot (the history position of the next reported token).
        self._processed_slots: set[int] = set()
        self._top_n: dict[int, int] = {}
        self._reported: dict[int, int] = {}
        # Allocated when a row first needs them (before any step that uses them is captured).
        self.processing: RowProcessing | None = None
        self.logprobs: LogprobHistory | None = (
            LogprobHistory(batch, slots, device) if output_logprobs else None
        )
        # One step function per variant (sample_rows's modes: an all-greedy batch skips the
        # sort and the noise, a batch where no row filters skips the sort), made on first use.
        self._compile = compile
        self._step_fns: dict[StepVariant, Callable[[], None]] = {}
        self._graphs: dict[tuple[StepVariant, int], Any] = {}
        # Per-step reports of a block of n > 1 steps ([n, 3, batch], see step_many).
        self._reports: dict[int, Tensor] = {}
        self._in_flight: tuple[list[int], int] | None = None  # (slots, k) of a launched block

    @staticmethod
    def _why_not_fused(
        model: PLDRModel, enable_kvcache: bool, enable_Gcache: bool, record_deductive: bool
    ) -> str | None:
        """Why the fused step cannot run this engine (None: it can)."""
        if not fused_available(model.device):
            return "it needs Triton and a CUDA device"
        if not (enable_kvcache and enable_Gcache):
            return "it needs the KV-cache and the G-cache"
        if record_deductive:
            return "record_deductive runs the eager step"
        return fused_supports(model)

    # ------------------------------------------------------------------ slots
    @property
    def free_slots(self) -> int:
        """Number of slots a request can be added to."""
        return len(self._free)

    @property
    def active_slots(self) -> list[int]:
        """Slots whose tokens are not all reported yet (in slot order)."""
        return sorted(self._running)

    def release(self, slot: int) -> None:
        """Free ``slot`` (a finished or cancelled request); its next :meth:`add` starts afresh."""
        if not 0 <= slot < self.max_batch or slot in self._free:
            raise PLDRError(f"slot {slot} is not in use")
        with torch.inference_mode():
            self.active[slot] = False
            self.done[slot] = False
        self._running.discard(slot)
        self._mode.pop(slot, None)
        self._forced_slots.discard(slot)
        self._processed_slots.discard(slot)
        self._top_n.pop(slot, None)
        self._reported.pop(slot, None)
        self._prompts.pop(slot, None)
        self._slot_g.pop(slot, None)
        self._free.append(slot)
        self._free.sort()

    def finish(self, slot: int) -> None:
        """Stop ``slot`` now (e.g. a stop string matched): it reports nothing more but stays
        taken until :meth:`release`."""
        with torch.inference_mode():
            self.active[slot] = False
        self._running.discard(slot)

    def generated(self, slot: int) -> list[int]:
        """The ids generated in ``slot`` so far (reported or not)."""
        return self.generated_many([slot])[0]

    def generated_many(self, slots: Sequence[int]) -> list[list[int]]:
        """:meth:`generated` for several slots with one read from the device."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            counts = self.n_generated[index]
            width = int(counts.max()) if len(slots) else 0
            rows = self.history[index, :width].tolist()
        return [row[:n] for row, n in zip(rows, counts.tolist())]

    def logprobs_many(
        self, slots: Sequence[int]
    ) -> tuple[list[list[float]], list[list[list[tuple[int, float]]]]]:
        """For each of ``slots``, the log-probability of every token generated so far and its
        top alternatives (as many as the slot asked for: [] each when none), as
        :meth:`generated_many` reads the ids. Needs ``output_logprobs`` or slots that ask."""
        if self.logprobs is None:
            raise PLDRError("no log-probabilities kept: build the engine with output_logprobs")
        history = self.logprobs
        index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            counts = self.n_generated[index].tolist()
            width = max(counts, default=0)
            chosen = history.chosen[index, :width].tolist()
            top_n = [self._top_n.get(slot, 0) for slot in slots]
            ids = values = None
            if history.top_ids is not None and history.top_values is not None and any(top_n):
                ids = history.top_ids[index, :width].tolist()
                values = history.top_values[index, :width].tolist()
        tops: list[list[list[tuple[int, float]]]] = []
        for r, (n, k) in enumerate(zip(counts, top_n)):
            if ids is None or values is None or k == 0:
                tops.append([[] for _ in range(n)])
            else:
                tops.append([list(zip(i[:k], v[:k])) for i, v in zip(ids[r][:n], values[r][:n])])
        return [row[:n] for row, n in zip(chosen, counts)], tops

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
        if len(prompts) != len(params):
            raise PLDRError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if len(prompts) > len(self._free):
            raise PLDRError(
                f"{len(prompts)} prompt(s) but only {len(self._free)} free slot(s) "
                f"(max_batch={self.max_batch})"
            )
        vocab = self.config.input_vocab_size
        rows: list[list[int]] = []
        for prompt, p in zip(prompts, params):
            if not isinstance(p, SamplingParams):
                raise PLDRError(f"params must be SamplingParams, got {type(p).__name__}")
            p.validate()
            row = [int(t) for t in prompt]
            if not row:
                raise PLDRError("empty prompt (start from the end-of-text id instead)")
            check_token_range(min(row), max(row), vocab)
            if p.max_new_tokens < 1:
                raise PLDRError("max_new_tokens must be >= 1 for a decoding slot")
            named = [t for t, _ in p.logit_bias] + list(p.stop_token_ids)
            if named:  # logit_bias and stop ids index [B, V] buffers
                check_token_range(min(named), max(named), vocab)
            if len(row) + p.max_new_tokens > self.max_len:
                raise PLDRError(
                    f"prompt ({len(row)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds "
                    f"max_len={self.max_len}"
                )
            rows.append(row)
        forced = [[int(t) for t in f] for f in forced_ids] if forced_ids is not None else None
        if forced is not None:
            if len(forced) != len(rows):
                raise PLDRError(f"{len(rows)} prompts but {len(forced)} forced id lists")
            for f, p in zip(forced, params):
                if len(f) > p.max_new_tokens or any(t < 0 or t >= vocab for t in f):
                    raise PLDRError("forced ids must be vocabulary ids, at most max_new_tokens")
        init = prepare_g_init(self.model, g_init)
        for packed in self.packed or ():
            packed.refresh()  # the weights may have changed since the last request
        if init is not None and self.record_deductive and self.enable_kvcache:
            raise PLDRError("record_deductive with the KV-cache takes no G_init")
        if init is not None and self.causal_running:
            raise PLDRError("G_init with a causal metric needs the G-cache on (or no KV-cache)")
        slots = [self._free.pop(0) for _ in rows]
        try:
            self._prefill(slots, rows, list(params), init, forced)
        except BaseException:
            for slot in slots:
                self._running.discard(slot)
                self.active[slot] = False
            self._free = sorted(set(self._free) | set(slots))
            raise
        return slots

    def _prefill(
        self,
        slots: list[int],
        rows: list[list[int]],
        params: list[SamplingParams],
        init: list[GCacheEntry] | None,
        forced: list[list[int]] | None = None,
    ) -> None:
        model, device, pad = self.model, self.device, self.config.pad_id
        n, length = len(rows), max(len(r) for r in rows)
        mask = None
        if any(len(r) != length for r in rows):
            mask = torch.tensor(
                [[0] * (length - len(r)) + [1] * len(r) for r in rows], device=device
            )
        ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], device=device)
        index = torch.tensor(slots, dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        try:
            with sdpa_backends():
                cache = PLDRCache(g=init) if init is not None else None
                # add_many checked the ids on the host: the forward need not read them back.
                out = model(
                    ids,
                    attention_mask=mask,
                    cache=cache,
                    logits_to_keep=1,
                    output_deductive=self.record_deductive,
                    key_padding=any(pad in r for r in rows),
                    check_ids=False,
                )
        finally:
            model.train(was_training)
        if self.record_deductive:
            self._record("prefill", {s: (out.deductive or [], i) for i, s in enumerate(slots)})
        logits = out.logits[:, -1].float()
        if self.enable_kvcache:
            for static, kv in zip(self.kv, out.cache.kv):
                static.key[index, :, :length] = kv.key.to(static.key.dtype)
                static.value[index, :, :length] = kv.value.to(static.value.dtype)
            for static_g, g in zip(self.g, out.cache.g):
                for buffer, t in (
                    (static_g.G_LM, g.G_LM),
                    (static_g.A_LM, g.A_LM),
                    (static_g.A_P, g.A_P),
                ):
                    if buffer is not None and t is not None:  # A_LM, A_P: record_deductive
                        buffer[index] = t.expand(n, -1, -1, -1).to(buffer.dtype)
            if not self.enable_Gcache:
                self.g_fixed[index] = init is not None
            if init is None and self.metric is not None:
                for metric, kv in zip(self.metric, out.cache.kv):
                    if kv.metric_tensor is not None:  # None: no metric learner (v510G)
                        metric[index] = kv.metric_tensor.to(metric.dtype)
            valid = torch.zeros(n, self.slots, dtype=torch.bool, device=device)
            # Decoding keeps the lone run's rule: a key that is the pad id is masked.
            valid[:, :length] = out.cache.key_valid & (ids != pad)
            self.key_bias[index] = self._bias_values[valid.long()]
        else:
            for i, (slot, row) in enumerate(zip(slots, rows)):
                self._prompts[slot] = row
                # G on: the first pass's G_LM serves every later pass; G off: G_init or nothing.
                self._slot_g[slot] = (
                    [
                        GCacheEntry(
                            _row(e.A_LM, i) if self.record_deductive else None,
                            _row(e.G_LM, i),
                            _row(e.A_P, i) if self.record_deductive else None,
                        )
                        for e in out.cache.g
                    ]
                    if self.enable_Gcache
                    else init
                )
        seeds = [p.seed if p.seed is not None else draw_seed() for p in params]
        stop_lists = [
            list(p.stop_token_ids) + ([self.config.eos_id] if p.stop_at_eos else []) for p in params
        ]
        stop_ids = torch.full((n, MAX_STOP_IDS + 1), -1, dtype=torch.long)
        for r, ids_r in enumerate(stop_lists):
            if ids_r:
                stop_ids[r, : len(ids_r)] = torch.tensor(ids_r)
        self.temperature[index] = torch.tensor(
            [float(p.temperature) for p in params], device=device
        )
        self.top_k[index] = torch.tensor([p.top_k for p in params], device=device)
        self.top_p[index] = torch.tensor([float(p.top_p) for p in params], device=device)
        seed = torch.tensor(seeds, dtype=torch.long, device=device)
        self.uniforms[index] = uniform_draws(seed[:, None], self.slot_steps[None, :])
        self.max_new[index] = torch.tensor([p.max_new_tokens for p in params], device=device)
        self.stop_ids[index] = stop_ids.to(device)
        raw_logits = logits
        logits = self._start_processing(index, params, rows, stop_lists, logits)
        modes = [row_mode(p, self.config.input_vocab_size) for p in params]
        first = sample_rows(
            logits,
            self.temperature[index],
            self.top_k[index],
            self.top_p[index],
            self.uniforms[index, 0],
            mode=batch_mode(modes),
        )
        forced_rows = torch.zeros(n, self.slots, dtype=torch.long)
        forced_len = torch.zeros(n, dtype=torch.long)
        for r, f in enumerate(forced or []):
            forced_rows[r, : len(f)] = torch.tensor(f, dtype=torch.long)
            forced_len[r] = len(f)
        self.forced[index] = forced_rows.to(device)
        self.forced_len[index] = forced_len.to(device)
        first = torch.where(forced_len.to(device) > 0, self.forced[index, 0], first)
        self.ids[index] = first[:, None]
        next_position = out.cache.next_position
        self.position[index] = (
            next_position[:, None]
            if next_position is not None
            else torch.full_like(first, length)[:, None]
        )
        self.write_index[index] = length
        self.n_generated[index] = 1
        history = torch.zeros(n, self.slots, dtype=torch.long, device=device)
        history[:, 0] = first
        self.history[index] = history
        top_n = [p.logprobs for p in params]
        if any(top_n) and self.logprobs is None:
            self.logprobs = LogprobHistory(self.max_batch, self.slots, device)
        if self.logprobs is not None:
            if any(top_n):
                self.logprobs.ensure_top()
            chosen = self.logprobs.record_rows(
                torch.log_softmax(logits, -1), first, index, any(top_n)
            )
            if self.output_logprobs:
                self.logprob[index] = chosen
        if self.pending_logits is not None:
            self.pending_logits[index] = raw_logits
        self.active[index] = True
        self.done[index] = self._finished(index)
        for slot, mode, p in zip(slots, modes, params):
            self._running.add(slot)
            self._mode[slot] = mode
            self._reported[slot] = 0
            if p.processed:
                self._processed_slots.add(slot)
            if p.logprobs:
                self._top_n[slot] = p.logprobs
        for slot, f in zip(slots, forced or [[]] * len(slots)):
            if f:
                self._forced_slots.add(slot)

    def _start_processing(
        self,
        index: Tensor,
        params: list[SamplingParams],
        rows: list[list[int]],
        stop_lists: list[list[int]],
        logits: Tensor,
    ) -> Tensor:
        """Set the processing state of the new rows ``index`` (once any row has needed it,
        every new row resets its slot's state) and return their first token's processed
        logits."""
        if self.processing is None:
            if not any(p.processed for p in params):
                return logits
            self.processing = RowProcessing(
                self.max_batch, self.config.input_vocab_size, MAX_STOP_IDS + 1, self.device
            )
        self.processing.set_rows(index, params, rows, stop_lists)
        if not any(p.processed for p in params):
            return logits
        return self.processing.apply(logits, torch.zeros_like(index), rows=index)

    def _finished(self, rows: Tensor) -> Tensor:
        """Whether the pending token of ``rows`` is their last (device tensor, no sync)."""
        return self.active[rows] & self._stop_now()[rows]

    # ------------------------------------------------------------------ the step
    def _step_g(self) -> list[GCacheEntry] | None:
        """The G-cache of this step: cached, or recomputed from each row's metric tensor (None:
        the layers compute it, from the causal metric's running sum)."""
        if self.enable_Gcache:
            return self.g
        if self.causal_running:
            return None
        out = []
        fixed = self.g_fixed[:, None, None, None]
        assert self.metric is not None
        for layer, metric, g in zip(self.model.decoder.dec_layers, self.metric, self.g):
            attention = layer.mha1
            a_lm = a_p = None
            if attention.predefined_G:
                g_lm = attention.predefined_G_LM.to(g.G_LM.dtype).expand_as(g.G_LM)
            else:
                a_lm, a_p, g_lm = attention.plgatt_layer(metric)
            if not self.record_deductive:  # A_LM, A_P only feed the recorded outputs
                a_lm = a_p = None
            out.append(GCacheEntry(a_lm, torch.where(fixed, g.G_LM, g_lm), a_p))
        return out

    def _record_slots(self) -> list[int]:
        """Slots this step reports (``record_deductive``): active, not recorded at this count."""
        counts = self.n_generated.tolist()
        return [s for s in sorted(self._running) if self._recorded_n.get(s) != counts[s]]

    def _record(
        self,
        stage: Literal["prefill", "step"],
        rows: dict[int, tuple[Sequence[Deductive], int]],
    ) -> None:
        """Keep, for each slot, batch row ``row`` of the per-layer outputs of its pass
        (``rows[slot] = (deductive, row)``); copies, since the static caches the layers report
        from are rewritten later."""

        def keep(t: Tensor | None, row: int) -> Tensor | None:
            picked = _row(t, row)
            return picked.clone() if picked is not None else None

        outputs = {}
        for slot, (deductive, row) in rows.items():
            outputs[slot] = [
                Deductive(keep(d.A, row), keep(d.A_LM, row), keep(d.A_P, row), keep(d.G_LM, row))
                for d in deductive
            ]
        if stage == "prefill":
            for slot in rows:
                self._recorded_n.pop(slot, None)
        else:
            counts = self.n_generated.tolist()
            for slot in rows:
                self._recorded_n[slot] = counts[slot]
        self.deductive.append(DeductiveRecord(stage, outputs))

    def _advance_rows(self, logits: Tensor, variant: StepVariant) -> None:
        """Sample each running row's next token from ``logits`` [B, V] and advance the state;
        the pending tokens (and whether they were last) go to ``report`` first.

        Every kernel here runs once per token, so the bookkeeping is kept to a few: the three
        counters advance together, end-of-text is one of the stop ids, and teacher forcing,
        logit processing and top log-probabilities are only in the variants of the step that
        rows asking for them need."""
        run = self.active & ~self.done
        raw_logits = logits
        if variant.processed:
            assert self.processing is not None
            self.processing.count(self.ids, run)
            logits = self.processing.apply(logits, self.n_generated)
        with_logprobs = self.logprobs is not None and (self.output_logprobs or variant.top_logprobs)
        if self.fused and not with_logprobs and self.pending_logits is None:
            # The same bookkeeping in one kernel (after a two-kernel arg-max when greedy).
            new = None
            if variant.mode != "greedy":
                column = self.n_generated.clamp(max=self.slots - 1)[:, None]
                uniform = self.uniforms.gather(1, column)[:, 0]
                new = sample_rows(
                    logits.float(), self.temperature, self.top_k, self.top_p, uniform,
                    variant.mode,
                )  # fmt: skip
            advance_fused(
                new, logits, self.ids.view(-1), self.active, self.done, self.counters,
                self.history, self.report, self.stop_ids, self.max_new,
                self.forced if variant.forcing else None,
                self.forced_len if variant.forcing else None,
            )  # fmt: skip
            return
        logits = logits.float()
        # A row never generates more than slots - 1 tokens; the clamp keeps the index of a
        # free slot's stale counter in range.
        column = self.n_generated.clamp(max=self.slots - 1)[:, None]
        mode = variant.mode
        uniform = self.uniforms.gather(1, column)[:, 0] if mode != "greedy" else None
        new = sample_rows(logits, self.temperature, self.top_k, self.top_p, uniform, mode)
        if variant.forcing:
            forced = self.forced.gather(1, column)[:, 0]
            new = torch.where(self.n_generated < self.forced_len, forced, new)
        self.report[0].copy_(self.ids[:, 0])
        self.report[1].copy_(self.done)
        if with_logprobs:
            assert self.logprobs is not None
            chosen = self.logprobs.record(
                torch.log_softmax(logits, -1), new, column, variant.top_logprobs
            )
            if self.output_logprobs:
                self.report[2].copy_(self.logprob)
                torch.where(run, chosen, self.logprob, out=self.logprob)
        if self.pending_logits is not None:
            torch.where(
                run[:, None], raw_logits.float(), self.pending_logits, out=self.pending_logits
            )
        # Rows that do not run write past their last token, which nothing reads.
        self.history.scatter_(1, column, new[:, None])
        torch.where(run[:, None], new[:, None], self.ids, out=self.ids)
        self.counters.add_(run.long())  # position, write index, tokens generated
        torch.logical_and(self.active, self._stop_now(), out=self.done)

    def _stop_now(self) -> Tensor:
        """Whether each row's pending token ends it (a stop id, or max_new_tokens reached)."""
        stop = (self.stop_ids == self.ids).any(-1)
        return stop | (self.n_generated >= self.max_new)

    def _kv_step(self, variant: StepVariant = StepVariant("filtered", True)) -> None:
        """One token for every running row, on the static buffers (no host sync)."""
        model = self.model
        if self.fused:
            assert self.packed is not None
            hidden = decode_hidden(
                model, self.packed, self.ids.view(-1), self.counters[0], self.key_bias,
                self.kv, self.g,
            )  # fmt: skip
            self._advance_rows(model.final_layer(hidden), variant)
            return
        # The reference masks a new key that is the pad id (rows are never per-row padded here).
        value = self._bias_values[(self.ids != self.config.pad_id).long()]
        self.key_bias.scatter_(1, self.write_index[:, None], value)
        bias = self.key_bias[:, None, None, :]
        hidden, kv_out, _, deductive = model.run_layers(
            self.ids,
            self.position,
            bias,
            False,
            kv=self.kv,
            g=self._step_g(),
            output_deductive=self.record_deductive,
            packed=self.packed,
        )
        if self.record_deductive:
            self._record("step", {s: (deductive, s) for s in self._record_slots()})
        if self.causal_running:
            self._advance_metric(kv_out)
        self._advance_rows(model.final_layer(hidden[:, -1]), variant)

    def _advance_metric(self, kv_out: Sequence[Any]) -> None:
        """Keep each running row's new running sum of q^T q (``causal_running``)."""
        assert self.metric is not None
        run = (self.active & ~self.done)[:, None, None, None]
        for metric, kv in zip(self.metric, kv_out):
            metric.copy_(torch.where(run, kv.metric_tensor.to(metric.dtype), metric))

    def _full_step(self) -> None:
        """Without the KV-cache: every running row's whole sequence runs again, alone."""
        model = self.model
        run = (self.active & ~self.done).tolist()
        counts = self.n_generated.tolist()
        logits = torch.zeros(
            self.max_batch, self.config.input_vocab_size, dtype=torch.float32, device=self.device
        )
        # Recording: a finished row's last pass runs too (its token is reported by this step).
        record = self._record_slots() if self.record_deductive else []
        recorded: dict[int, tuple[Sequence[Deductive], int]] = {}
        for slot, running in enumerate(run):
            if not running and slot not in record:
                continue
            sequence = torch.cat(
                (
                    torch.tensor(self._prompts[slot], dtype=torch.long, device=self.device),
                    self.history[slot, : counts[slot]],
                )
            )[None]
            g = self._slot_g.get(slot)
            out = model(
                sequence,
                cache=PLDRCache(g=g) if g is not None else None,
                logits_to_keep=1,
                output_deductive=self.record_deductive,
            )
            logits[slot] = out.logits[0, -1].float()
            if slot in record:
                recorded[slot] = (out.deductive or [], 0)
        if self.record_deductive:
            self._record("step", recorded)
        self._advance_rows(logits, self._step_variant()._replace(mode="filtered", forcing=True))

    def _step_variant(self) -> StepVariant:
        """The step variant the running rows need (from host-side sets: no sync)."""
        running = self._running
        return StepVariant(
            batch_mode(self._mode[slot] for slot in running),
            bool(self._forced_slots & running),
            bool(self._processed_slots & running),
            any(self._top_n.get(slot, 0) for slot in running),
        )

    def _step_fn(self, variant: StepVariant) -> Callable[[], None]:
        """The one-token step of ``variant`` (through torch.compile when asked)."""
        fn = self._step_fns.get(variant)
        if fn is None:
            fn = maybe_compile(functools.partial(self._kv_step, variant), self._compile)
            self._step_fns[variant] = fn
        return fn

    def _report_buffer(self, n: int) -> Tensor:
        """The static [n, 3, batch] buffer a block of ``n`` steps writes its reports to."""
        buffer = self._reports.get(n)
        if buffer is None:
            buffer = torch.zeros(3 * n * self.max_batch, device=self.device).view(n, 3, -1)
            self._reports[n] = buffer
        return buffer

    def _block(self, variant: StepVariant, n: int) -> Callable[[], None]:
        """``n`` steps in a row; with n > 1 each step's report is kept in its buffer row, so
        one host read after the block sees every step (no host read inside: capturable)."""
        fn = self._step_fn(variant) if self.enable_kvcache else self._full_step
        reports = self._report_buffer(n) if n > 1 else None

        def steps() -> None:
            for i in range(n):
                fn()
                if reports is not None:
                    reports[i].copy_(self.report)

        return steps

    def _run_steps(self, count: int, block: int | None = None) -> None:
        """``count`` steps without a host sync (graph replays where captured); with ``block``
        (step_many), exactly ``count`` steps as one block whose reports are all kept."""
        variant = self._step_variant()
        if block is not None or not self.use_graph:
            n = count if block is not None else 1
            steps = self._graph(variant, n).replay if self.use_graph else self._block(variant, n)
            with sdpa_backends():
                for _ in range(count // n):
                    steps()
            return
        many = self.steps_per_graph
        if count == 1 or many == 1:
            graph = self._graph(variant, 1)
            for _ in range(count):
                graph.replay()
            return
        # Rounded up to whole graphs of `many` steps: one capture serves every count, and extra
        # steps change nothing a caller reads (rows stop at their own max_new_tokens).
        graph = self._graph(variant, many)
        for _ in range(-(-count // many)):
            graph.replay()

    def _graph(self, variant: StepVariant, n: int) -> Any:
        """The captured graph of ``n`` steps (captured now on first use)."""
        key = (variant, n)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        start = time.perf_counter()
        steps = self._block(variant, n)

        # Warm-up and capture run the step for real: with every row inactive it changes nothing
        # a row reads (the pending tokens' keys/values are rewritten with the same values).
        saved = [t.clone() for t in (self.active, self.done, self.report, self.logprob)]
        self.active.zero_()
        self.done.zero_()
        try:
            with sdpa_backends():
                graph, _ = capture_graph(steps, warmup=3 if n == 1 else 1)
        finally:
            for t, s in zip((self.active, self.done, self.report, self.logprob), saved):
                t.copy_(s)
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - start
        self._graphs[key] = graph
        return graph

    @torch.inference_mode()
    def warm_up(
        self,
        steps: Sequence[int] = (1,),
        modes: Sequence[SamplingMode] = ("greedy", "plain", "filtered"),
        processed: Sequence[bool] = (False,),
    ) -> float:
        """Capture the step graphs of every mode in ``modes`` for blocks of each of ``steps``
        now, and run a one-token prompt through the prefill (which loads its kernels), instead
        of on the first request that needs them: a server calls this before it takes requests.
        ``processed`` (True among them) also captures the steps that process logits (penalties,
        bias, minimum length). Returns the seconds it took (nothing to do without CUDA
        graphs)."""
        self._check_idle()
        if not self.use_graph or not self._free:
            return 0.0
        start = time.perf_counter()
        warm_params = SamplingParams(
            max_new_tokens=1, repetition_penalty=1.5 if any(processed) else 1.0
        )
        slot = self.add([self.config.eos_id], warm_params)
        self.release(slot)
        for mode, n, process in itertools.product(modes, steps, processed):
            self._check_k(n)
            self._graph(StepVariant(mode, processed=process), n)
        return time.perf_counter() - start

    @torch.inference_mode()
    def advance(self, count: int) -> None:
        """Run ``count`` decoding steps without reporting (for :func:`generate`; read the ids
        with :meth:`generated`). Rows that finish stop advancing; nothing reads back to the host.
        With CUDA graphs of ``steps_per_graph`` steps, ``count`` is rounded up to whole graphs."""
        self._check_idle()
        if self._running:
            self._run_steps(count)

    @torch.inference_mode()
    def all_done(self) -> bool:
        """True when every active slot has produced its last token (one host sync)."""
        if not self._running:
            return True
        return bool((self.done | ~self.active).all())

    @torch.inference_mode()
    def step(self) -> StepOutput:
        """One decoding step for every active slot (one host sync); reports each active slot's
        pending token. A slot whose token comes with ``finished=True`` stops; :meth:`release`
        it to reuse the slot."""
        self._check_idle()
        slots = self.active_slots
        if not slots:
            return StepOutput([], [], [], [] if self.output_logprobs else None)
        logits = self.pending_logits[slots].clone() if self.pending_logits is not None else None
        self._run_steps(1)
        report = self.report[:, slots].tolist()
        tokens = [int(t) for t in report[0]]
        finished = [bool(f) for f in report[1]]
        for slot, fin in zip(slots, finished):
            if fin:
                self._running.discard(slot)
                self.active[slot] = False
        out = StepOutput(
            slots, tokens, finished, report[2] if self.output_logprobs else None, logits
        )
        self._attach_logprobs([out])
        return out

    def _attach_logprobs(self, outputs: list[StepOutput]) -> None:
        """Count each slot's reported tokens (their positions in the history) and, when a slot
        asks for top alternatives, fill ``top_logprobs`` and ``logprobs`` from the history (one
        read; NaN and [] for slots that asked for nothing, on an engine without
        ``output_logprobs``)."""
        where: list[tuple[StepOutput, int, int, int]] = []  # output, index, slot, position
        for out in outputs:
            for i, slot in enumerate(out.slots):
                position = self._reported.get(slot)
                if position is not None:  # None: released while its block ran
                    self._reported[slot] = position + 1
                    where.append((out, i, slot, position))
        asked = [w for w in where if self._top_n.get(w[2], 0)]
        if not asked or self.logprobs is None:
            return
        for out in outputs:
            out.top_logprobs = [[] for _ in out.slots]
            if out.logprobs is None:
                out.logprobs = [math.nan] * len(out.slots)
        chosen, top = self.logprobs.read(
            [w[2] for w in asked], [w[3] for w in asked], [self._top_n[w[2]] for w in asked]
        )
        for (out, i, _, _), value, alternatives in zip(asked, chosen, top):
            assert out.logprobs is not None and out.top_logprobs is not None
            out.logprobs[i] = value
            out.top_logprobs[i] = alternatives

    @torch.inference_mode()
    def step_many(self, k: int) -> list[StepOutput]:
        """``k`` decoding steps with one host sync: the outputs of ``k`` :meth:`step` calls
        (the same tokens, in order), ending early once no slot is left.

        The k steps run as one block (one captured graph of k steps on CUDA) that keeps every
        step's report in a static buffer, read once at the end. A row that finishes mid-block
        stops advancing there, as with :meth:`step`, and is left out of the later outputs. With
        ``keep_logits`` (per-step logits) it is k :meth:`step` calls.
        """
        if self.pending_logits is not None:
            self._check_k(k)
            outputs = []
            for _ in range(k):
                if not self._running:
                    break
                outputs.append(self.step())
            return outputs
        self.launch(k)
        return self.collect()

    @staticmethod
    def _check_k(k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PLDRError(f"a block needs k >= 1 steps, got {k!r}")

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
        self._check_k(k)
        self._check_idle()
        if self.pending_logits is not None:
            raise PLDRError("launch() does not keep per-step logits: use step()")
        slots = self.active_slots
        if slots:
            self._run_steps(k, block=k)
        self._in_flight = (slots, k)

    @torch.inference_mode()
    def collect(self) -> list[StepOutput]:
        """The outputs of the block :meth:`launch` started (one host sync): one
        :class:`StepOutput` per step, each with the slots that had not finished before it."""
        if self._in_flight is None:
            raise PLDRError("no block of steps in flight: launch() one first")
        slots, k = self._in_flight
        self._in_flight = None
        if not slots:
            return []
        buffer = self._report_buffer(k) if k > 1 else self.report[None]
        reports = buffer[:, :, slots].tolist()  # the one host sync
        outputs = []
        live = list(range(len(slots)))  # positions in `slots` not finished yet
        for tokens, finished, logprobs in reports:
            if not live:
                break
            out = StepOutput(
                [slots[j] for j in live],
                [int(tokens[j]) for j in live],
                [bool(finished[j]) for j in live],
                [logprobs[j] for j in live] if self.output_logprobs else None,
            )
            outputs.append(out)
            live = [j for j, fin in zip(live, out.finished) if not fin]
        self._attach_logprobs(outputs)
        for j in set(range(len(slots))) - set(live):
            if slots[j] in self._running:  # not released meanwhile
                self._running.discard(slots[j])
                self.active[slots[j]] = False
        return outputs

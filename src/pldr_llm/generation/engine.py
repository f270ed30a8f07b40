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
* KV on, G off: one token per step; G_LM is recomputed every step from the cached metric tensor.
* KV off, G on / off: the whole sequence runs every step (eager and slow, for comparison), with
  G_LM from the first pass (G on) or recomputed from the grown sequence (G off).

``g_init`` replaces the G-cache of the first pass (and of every pass when the G-cache is off), as
the original's ``Gcachelst_init``.

Steps are pipelined: :meth:`DecodeEngine.add` samples a row's first token, and each
:meth:`DecodeEngine.step` reports every active row's pending token while it computes the next one.
So the first :meth:`step` after :meth:`add` reports the slot's first token, and a row's last
token comes with ``finished=True``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pldr_llm.errors import PLDRError
from pldr_llm.generation.sampling import (
    SamplingMode,
    SamplingParams,
    batch_mode,
    row_mode,
    sample_rows,
)
from pldr_llm.model.cache import GCacheEntry, GInit, PLDRCache, StaticLayerKV, prepare_g_init
from pldr_llm.model.model import PLDRModel
from pldr_llm.model.plga import MASK_VALUE

MAX_STOP_IDS = 16  # stop ids per row held in the static buffers


@dataclass
class StepOutput:
    """What one :meth:`DecodeEngine.step` produced: one token per slot that was active.

    ``finished[i]`` is True when ``token_ids[i]`` is the slot's last token (end-of-text, a stop id,
    or max_new_tokens reached). ``logprobs`` (with ``output_logprobs``) is the log-probability of
    each token under the model's unfiltered distribution at temperature 1.
    """

    slots: list[int]
    token_ids: list[int]
    finished: list[bool]
    logprobs: list[float] | None = None
    logits: Tensor | None = None  # [n, V] float32 logits of each token (``keep_logits`` only)


def sdpa_backends() -> contextlib.AbstractContextManager[Any]:
    """Attention kernels without cuDNN, whose per-shape setup made every new length slow in bf16.

    Flash and memory-efficient attention (and the math fallback) need no per-shape planning.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        )
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - older torch
        return contextlib.nullcontext()


def maybe_compile(fn: Callable, compile: bool | dict[str, Any]) -> Callable:
    """``fn`` as is, or through torch.compile (``compile`` may be a dict of its options)."""
    if not compile:
        return fn
    options = dict(compile) if isinstance(compile, dict) else {}
    options.setdefault("dynamic", False)
    if "mode" not in options:
        # Inductor's coordinate-descent tuning of its reduction kernels: +10% tokens/s for
        # batch-1 fp32 decoding on an H200 (BENCHMARKS.md).
        options.setdefault("options", {"coordinate_descent_tuning": True})
    return torch.compile(fn, **options)


def capture_graph(fn: Callable[[], Any], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` up on a side stream (compiles, picks kernels), then capture it in a graph;
    returns the graph and the captured call's outputs (static tensors each replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class DecodeEngine:
    """Static, slot-based decoder: ``max_batch`` rows ("slots"), each an independent sequence with
    its own KV-cache slot (written in place, per-row write index), G-cache row, sampling
    parameters and RNG stream.

    ``max_len`` (default: the model's max_seq_len) bounds prompt + new tokens of a slot.
    ``cuda_graph`` (default: on for a CUDA model with the KV-cache) captures the one-token step,
    lazily, the first time each variant runs: one per sampling mode of the running rows
    (``greedy``: arg-max only; ``plain``: temperature + noise, no row filters; ``filtered``: the
    sort-based filters), see :func:`~pldr_llm.generation.sampling.batch_mode`. ``compile`` passes
    the step through torch.compile first; ``steps_per_graph`` > 1 also captures that many steps in
    one graph for :meth:`advance` (used by :func:`generate`), and :meth:`step_many` captures k
    steps in one graph (the server's several tokens per host sync). On the CPU the same
    step runs eagerly. ``capture_seconds`` accumulates the time spent capturing and compiling.

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
    ) -> None:
        config = model.config
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
        self.steps_per_graph = steps_per_graph
        self.capture_seconds = 0.0
        device, dtype = model.device, model.dtype
        self.device = device
        self.use_graph = (
            device.type == "cuda" and enable_kvcache if cuda_graph is None else bool(cuda_graph)
        )
        if self.use_graph and not enable_kvcache:
            raise PLDRError("CUDA-graph decoding needs the KV-cache")
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
            self.position = zeros(batch, 1)  # its rotary position
            self.write_index = zeros(batch)  # the KV slot its key/value go to
            self.n_generated = zeros(batch)  # tokens generated so far, the pending one included
            self.active = zeros(batch, dt=torch.bool)
            self.done = zeros(batch, dt=torch.bool)  # the pending token is the row's last
            self.key_valid = zeros(batch, slots, dt=torch.bool)
            self.slot_range = torch.arange(slots, device=device)
            self.history = zeros(batch, slots)  # generated ids per row
            self.temperature = torch.ones(batch, device=device)
            self.top_k = zeros(batch)
            self.top_p = torch.ones(batch, device=device)
            self.seed = zeros(batch)
            self.max_new = zeros(batch)
            self.stop_eos = zeros(batch, dt=torch.bool)
            self.stop_ids = torch.full((batch, MAX_STOP_IDS), -1, dtype=torch.long, device=device)
            # Teacher forcing (scoring): row b's n-th new token is forced[b, n] while n < forced_len.
            self.forced = zeros(batch, slots)
            self.forced_len = zeros(batch)
            self.logprob = zeros(batch, dt=torch.float32)
            self.pending_logits = zeros(batch, vocab, dt=torch.float32) if keep_logits else None
            self.report = zeros(3, batch, dt=torch.float32)  # token, finished, logprob
            if enable_kvcache:
                shape = (batch, heads, slots, depth)
                self.kv = [
                    StaticLayerKV(
                        zeros(*shape, dt=dtype), zeros(*shape, dt=dtype), self.write_index
                    )
                    for _ in range(config.num_layers)
                ]
                self.g = [
                    GCacheEntry(None, zeros(batch, heads, depth, depth, dt=dtype))
                    for _ in range(config.num_layers)
                ]
                if not enable_Gcache:
                    # G_LM is recomputed each step from A, except on rows given a G_init.
                    self.metric = [
                        zeros(batch, heads, depth, depth, dt=dtype)
                        for _ in range(config.num_layers)
                    ]
                    self.g_fixed = zeros(batch, dt=torch.bool)
        # Without the KV-cache: per slot, its prompt (host ids) and its G-cache (or None).
        self._prompts: dict[int, list[int]] = {}
        self._slot_g: dict[int, list[GCacheEntry] | None] = {}
        self._slot_params: dict[int, SamplingParams] = {}
        self._free = list(range(batch))
        self._running: set[int] = set()  # active slots whose last token is not reported yet
        # Each slot's sampling mode (host side, so choosing a step variant needs no sync).
        self._mode: dict[int, SamplingMode] = {}
        # One step function per sampling mode (sample_rows's variants): an all-greedy batch
        # skips the sort and the noise, a batch where no row filters skips the sort.
        self._step_fns: dict[SamplingMode, Callable[[], None] | None] = {
            mode: (
                maybe_compile(functools.partial(self._kv_step, mode=mode), compile)
                if enable_kvcache
                else None
            )
            for mode in ("greedy", "plain", "filtered")
        }
        self._graphs: dict[tuple[SamplingMode, int], Any] = {}
        # Per-step reports of a block of n > 1 steps ([n, 3, batch], see step_many).
        self._reports: dict[int, Tensor] = {}
        self._in_flight: tuple[list[int], int] | None = None  # (slots, k) of a launched block

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
        self._prompts.pop(slot, None)
        self._slot_g.pop(slot, None)
        self._slot_params.pop(slot, None)
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
            if min(row) < 0 or max(row) >= vocab:
                bad = min(row) if min(row) < 0 else max(row)
                raise PLDRError(f"token id {bad} is outside the vocabulary [0, {vocab})")
            if p.max_new_tokens < 1:
                raise PLDRError("max_new_tokens must be >= 1 for a decoding slot")
            if len(row) + p.max_new_tokens > self.max_len:
                raise PLDRError(
                    f"prompt ({len(row)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds "
                    f"max_len={self.max_len}"
                )
            if len(p.stop_token_ids) > MAX_STOP_IDS:
                raise PLDRError(
                    f"at most {MAX_STOP_IDS} stop_token_ids, got {len(p.stop_token_ids)}"
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
                out = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        finally:
            model.train(was_training)
        logits = out.logits[:, -1].float()
        if self.enable_kvcache:
            for static, kv in zip(self.kv, out.cache.kv):
                static.key[index, :, :length] = kv.key.to(static.key.dtype)
                static.value[index, :, :length] = kv.value.to(static.value.dtype)
            for static_g, g in zip(self.g, out.cache.g):
                static_g.G_LM[index] = g.G_LM.expand(n, -1, -1, -1).to(static_g.G_LM.dtype)
            if not self.enable_Gcache:
                self.g_fixed[index] = init is not None
                if init is None:
                    for metric, kv in zip(self.metric, out.cache.kv):
                        metric[index] = kv.metric_tensor.to(metric.dtype)
            valid = torch.zeros(n, self.slots, dtype=torch.bool, device=device)
            # Decoding keeps the lone run's rule: a key that is the pad id is masked.
            valid[:, :length] = out.cache.key_valid & (ids != pad)
            self.key_valid[index] = valid
        else:
            for i, (slot, row) in enumerate(zip(slots, rows)):
                self._prompts[slot] = row
                # G on: the first pass's G_LM serves every later pass; G off: G_init or nothing.
                self._slot_g[slot] = (
                    [
                        GCacheEntry(None, e.G_LM[i : i + 1] if e.G_LM.shape[0] > 1 else e.G_LM)
                        for e in out.cache.g
                    ]
                    if self.enable_Gcache
                    else init
                )
        seeds = [
            p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            for p in params
        ]
        stop_ids = torch.full((n, MAX_STOP_IDS), -1, dtype=torch.long)
        for r, p in enumerate(params):
            if p.stop_token_ids:
                stop_ids[r, : len(p.stop_token_ids)] = torch.tensor(p.stop_token_ids)
        self.temperature[index] = torch.tensor(
            [float(p.temperature) for p in params], device=device
        )
        self.top_k[index] = torch.tensor([p.top_k for p in params], device=device)
        self.top_p[index] = torch.tensor([float(p.top_p) for p in params], device=device)
        self.seed[index] = torch.tensor(seeds, dtype=torch.long, device=device)
        self.max_new[index] = torch.tensor([p.max_new_tokens for p in params], device=device)
        self.stop_eos[index] = torch.tensor([p.stop_at_eos for p in params], device=device)
        self.stop_ids[index] = stop_ids.to(device)
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        first = sample_rows(
            logits,
            self.temperature[index],
            self.top_k[index],
            self.top_p[index],
            self.seed[index],
            zeros,
            mode=batch_mode(row_mode(p, self.config.input_vocab_size) for p in params),
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
        if self.output_logprobs:
            self.logprob[index] = torch.log_softmax(logits, -1).gather(-1, first[:, None])[:, 0]
        if self.pending_logits is not None:
            self.pending_logits[index] = logits
        self.active[index] = True
        self.done[index] = self._finished(index)
        for slot, p in zip(slots, params):
            self._running.add(slot)
            self._slot_params[slot] = p
            self._mode[slot] = row_mode(p, self.config.input_vocab_size)

    def _finished(self, rows: Tensor | slice) -> Tensor:
        """Whether the pending token of ``rows`` is their last (device tensor, no sync)."""
        ids = self.ids[rows, 0]
        stop = (self.n_generated[rows] >= self.max_new[rows]) | (
            self.stop_eos[rows] & (ids == self.config.eos_id)
        )
        stop = stop | (self.stop_ids[rows] == ids[:, None]).any(-1)
        return self.active[rows] & stop

    # ------------------------------------------------------------------ the step
    def _step_g(self) -> list[GCacheEntry]:
        """The G-cache of this step: cached, or recomputed from each row's metric tensor."""
        if self.enable_Gcache:
            return self.g
        out = []
        fixed = self.g_fixed[:, None, None, None]
        for layer, metric, g in zip(self.model.decoder.dec_layers, self.metric, self.g):
            attention = layer.mha1
            if attention.predefined_G:
                g_lm = attention.predefined_G_LM.to(g.G_LM.dtype).expand_as(g.G_LM)
            else:
                _, _, g_lm = attention.plgatt_layer(metric)
            out.append(GCacheEntry(None, torch.where(fixed, g.G_LM, g_lm)))
        return out

    def _advance_rows(self, logits: Tensor, mode: SamplingMode) -> None:
        """Sample each running row's next token from ``logits`` [B, V] and advance the state;
        the pending tokens (and whether they were last) go to ``report`` first."""
        run = self.active & ~self.done
        new = sample_rows(
            logits,
            self.temperature,
            self.top_k,
            self.top_p,
            self.seed,
            self.n_generated,
            mode=mode,
        )
        column = self.n_generated.clamp(max=self.slots - 1)[:, None]
        forced = self.forced.gather(1, column)[:, 0]
        new = torch.where(self.n_generated < self.forced_len, forced, new)
        self.report[0].copy_(self.ids[:, 0])
        self.report[1].copy_(self.done)
        self.report[2].copy_(self.logprob)
        if self.output_logprobs:
            chosen = torch.log_softmax(logits, -1).gather(-1, new[:, None])[:, 0]
            self.logprob.copy_(torch.where(run, chosen, self.logprob))
        if self.pending_logits is not None:
            self.pending_logits.copy_(torch.where(run[:, None], logits, self.pending_logits))
        self.history.scatter_(
            1, column, torch.where(run, new, self.history.gather(1, column)[:, 0])[:, None]
        )
        step = run.long()
        self.ids.copy_(torch.where(run, new, self.ids[:, 0])[:, None])
        self.position.add_(step[:, None])
        self.write_index.add_(step)
        self.n_generated.add_(step)
        self.done.copy_(self._finished(slice(None)))

    def _kv_step(self, mode: SamplingMode = "filtered") -> None:
        """One token for every running row, on the static buffers (no host sync)."""
        model = self.model
        # The reference masks a new key that is the pad id (rows are never per-row padded here).
        new_valid = self.ids != self.config.pad_id
        self.key_valid.scatter_(1, self.write_index[:, None], new_valid)
        allowed = self.key_valid & (self.slot_range[None, :] <= self.write_index[:, None])
        bias = torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device)
        bias = bias.masked_fill(~allowed, MASK_VALUE)[:, None, None, :]
        hidden, _, _, _ = model.run_layers(
            self.ids, self.position, bias, False, kv=self.kv, g=self._step_g()
        )
        logits = model.final_layer(hidden[:, -1]).float()
        self._advance_rows(logits, mode)

    def _full_step(self) -> None:
        """Without the KV-cache: every running row's whole sequence runs again, alone."""
        model = self.model
        run = (self.active & ~self.done).tolist()
        counts = self.n_generated.tolist()
        logits = torch.zeros(
            self.max_batch, self.config.input_vocab_size, dtype=torch.float32, device=self.device
        )
        for slot, running in enumerate(run):
            if not running:
                continue
            sequence = torch.cat(
                (
                    torch.tensor(self._prompts[slot], dtype=torch.long, device=self.device),
                    self.history[slot, : counts[slot]],
                )
            )[None]
            g = self._slot_g.get(slot)
            out = model(sequence, cache=PLDRCache(g=g) if g is not None else None, logits_to_keep=1)
            logits[slot] = out.logits[0, -1].float()
        self._advance_rows(logits, "filtered")

    def _step_mode(self) -> SamplingMode:
        """The sampling variant the running rows need (from host-side sets: no sync)."""
        return batch_mode(self._mode[slot] for slot in self._running)

    def _report_buffer(self, n: int) -> Tensor:
        """The static [n, 3, batch] buffer a block of ``n`` steps writes its reports to."""
        buffer = self._reports.get(n)
        if buffer is None:
            buffer = torch.zeros(3 * n * self.max_batch, device=self.device).view(n, 3, -1)
            self._reports[n] = buffer
        return buffer

    def _block(self, mode: SamplingMode, n: int) -> Callable[[], None]:
        """``n`` steps in a row; with n > 1 each step's report is kept in its buffer row, so
        one host read after the block sees every step (no host read inside: capturable)."""
        fn = self._step_fns[mode] if self.enable_kvcache else self._full_step
        assert fn is not None
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
        mode = self._step_mode()
        if block is not None or not self.use_graph:
            n = count if block is not None else 1
            steps = self._graph(mode, n).replay if self.use_graph else self._block(mode, n)
            with sdpa_backends():
                for _ in range(count // n):
                    steps()
            return
        many = self.steps_per_graph
        if count == 1 or many == 1:
            graph = self._graph(mode, 1)
            for _ in range(count):
                graph.replay()
            return
        # Rounded up to whole graphs of `many` steps: one capture serves every count, and extra
        # steps change nothing a caller reads (rows stop at their own max_new_tokens).
        graph = self._graph(mode, many)
        for _ in range(-(-count // many)):
            graph.replay()

    def _graph(self, mode: SamplingMode, n: int) -> Any:
        """The captured graph of ``n`` steps (captured now on first use)."""
        key = (mode, n)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        import time

        start = time.perf_counter()
        steps = self._block(mode, n)

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
        return StepOutput(
            slots, tokens, finished, report[2] if self.output_logprobs else None, logits
        )

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
        for j in set(range(len(slots))) - set(live):
            if slots[j] in self._running:  # not released meanwhile
                self._running.discard(slots[j])
                self.active[slots[j]] = False
        return outputs

"""A static cache for transformers' own decoding loop (``PldrllmForCausalLM`` on
``GenerationMixin._sample``: sampled scores, custom logits processors, ...).

That loop calls the model's ``forward`` once per new token with the cache of the previous call.
On the concatenating :class:`~.cache.PLDRCache` each call grows every layer's keys and values,
rebuilds the attention mask and reads the device twice (the id range check and "is every key a
token"): ~1,100 small operations a token, each launched from the host. Here, after the prompt
pass, the cache moves into preallocated buffers (:class:`StaticDecoder`: one
:class:`~.cache.StaticLayerKV` per layer, written in place at a per-row write index held on the
device, an additive key bias over the slots, the rotary positions and the G-cache), and each
one-token call is the core's one-token step on them: :func:`~.fused.decode_hidden` (the fused
kernels) where they run, else :meth:`~.model.PLDRModel.run_layers` op by op -- on CUDA captured
once per (rows, capacity, ...) in a CUDA graph (:func:`~.graphs.capture_graph`) and replayed.
A call is then a copy of the new ids, a replay and a copy of the logits; nothing is read back.

The arithmetic is the concatenating path's: the same keys, values, positions and G_LM, with the
masked slots (padding, a pad id without an attention mask, slots not written yet) at the
original's additive mask value, whose softmax weight is exactly 0. What differs is the attention
kernel (masked over the whole capacity, or the fused kernel over the written keys) and so the
order of float sums: equal to rounding (float32: 1e-5; ``tests/test_hf_static_cache.py``).

:class:`StaticDecodeCache` is a :class:`~.cache.PLDRCache` (transformers reads its length, crops
and reorders it): anything but a one-token inference call, and anything transformers does to it
besides reading its length, first turns it back into the concatenating cache in place
(:meth:`StaticDecodeCache.materialize`); so does the end of the loop for a cache it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .cache import GCacheEntry, LayerKV, PLDRCache, StaticLayerKV
from .decode_step import one_token_hidden
from .engine_cache import IdlePool, idle_pool
from .fused import available as fused_available
from .fused import supports as fused_supports
from .graphs import capture_graph, sdpa_backends
from .model import PackedLayer, PLDRModel
from .plga import mask_value

#: The fewest key slots of a static cache; capacities are powers of two (one graph serves
#: every call up to that length).
MIN_CAPACITY = 64
#: Idle static decoders kept per model (the least recently used beyond this are dropped).
MAX_IDLE_DECODERS = 4


@dataclass
class StaticDecodeSettings:
    """When :class:`~.modeling_pldrllm.PldrllmForCausalLM` decodes transformers' loop on static
    buffers (``model.static_decode``). ``enabled``: None on CUDA only (the CPU keeps the
    concatenating cache, whose arithmetic is ``forward``'s own), True also on the CPU, False
    never. ``fused``: the fused kernels (None: where they run, CUDA). ``cuda_graph``: capture
    the step (None: on CUDA)."""

    enabled: bool | None = None
    fused: bool | None = None
    cuda_graph: bool | None = None


@dataclass(frozen=True)
class StaticSpec:
    """What makes two static decoders interchangeable (their buffers' shapes and step)."""

    rows: int
    capacity: int
    per_row: bool  # rows with an attention mask: a new key is a token even if it is the pad id
    g: bool  # static G_LM buffers (a G-cache or G_init); else G_LM is recomputed from A
    metric: bool  # static metric tensors A (no G-cache, a learned G_LM)
    fused: bool
    graph: bool
    weights: tuple[Any, ...] = field(compare=True)  # device, dtype, the parameters' addresses


class StaticDecoder:
    """The static buffers of transformers' loop and the one-token step on them (see the module
    docstring): ``rows`` rows of ``capacity`` key slots."""

    def __init__(self, core: PLDRModel, spec: StaticSpec) -> None:
        self.core, self.spec = core, spec
        config, device, dtype = core.config, core.device, core.dtype
        rows, slots = spec.rows, spec.capacity
        heads, depth = config.num_heads, config.depth
        square = (rows, heads, depth, depth)
        # Plain tensors (not inference tensors), so that the loop's no_grad mode writes them.
        with torch.inference_mode(False), torch.no_grad():

            def zeros(*size: int, dt: torch.dtype = dtype) -> Tensor:
                return torch.zeros(size, dtype=dt, device=device)

            self.ids = zeros(rows, 1, dt=torch.long)
            self.position = zeros(rows, dt=torch.long)
            self.write_index = zeros(rows, dt=torch.long)
            self.key_bias = torch.full((rows, slots), mask_value(dtype), dtype=dtype, device=device)
            self.bias_values = torch.tensor([mask_value(dtype), 0.0], dtype=dtype, device=device)
            self.kv = [
                StaticLayerKV(
                    zeros(rows, heads, slots, depth),
                    zeros(rows, heads, slots, depth),
                    self.write_index,
                    zeros(*square) if spec.metric else None,
                )
                for _ in range(config.num_layers)
            ]
            self.g = (
                [GCacheEntry(None, zeros(*square)) for _ in range(config.num_layers)]
                if spec.g
                else None
            )
        layers: Any = core.decoder.dec_layers  # DecoderLayers (typed as a Module attribute)
        self.packed: list[PackedLayer] | None = (
            [layer.pack() for layer in layers] if spec.fused else None
        )
        self.graph: Any = None
        self.logits: Tensor | None = None  # the captured step's output

    @torch.no_grad()
    def load(self, cache: PLDRCache, g: list[GCacheEntry] | None) -> None:
        """Copy a prompt pass's caches in: keys and values, A, G_LM, which keys are tokens, the
        rows' next positions and write index (device writes only)."""
        assert cache.kv is not None
        length = cache.seq_len
        for static, kv in zip(self.kv, cache.kv):
            static.key[:, :, :length].copy_(kv.key)
            static.value[:, :, :length].copy_(kv.value)
            if static.metric_tensor is not None and kv.metric_tensor is not None:
                static.metric_tensor.copy_(kv.metric_tensor)
        if self.g is not None:
            assert g is not None
            for static_g, entry in zip(self.g, g):
                static_g.G_LM.copy_(entry.G_LM.expand_as(static_g.G_LM))
        self.key_bias[:, length:].fill_(mask_value(self.key_bias.dtype))
        if cache.key_valid is None:
            self.key_bias[:, :length].zero_()
        else:
            self.key_bias[:, :length].copy_(self.bias_values[cache.key_valid.long()])
        if self.spec.per_row and cache.next_position is not None:
            self.position.copy_(cache.next_position)
        else:
            self.position.fill_(length)
        self.write_index.fill_(length)
        for pack in self.packed or ():
            pack.refresh()

    def _compute(self) -> Tensor:
        """One token per row on the buffers -> logits [B, 1, V]; advances the positions and
        the write index (device only: capturable)."""
        core = self.core
        hidden, _, _ = one_token_hidden(
            core, self.ids, self.position, self.key_bias, self.write_index, self.bias_values,
            self.kv, self.g, packed=self.packed, fused=self.packed is not None,
            pad_id=-1 if self.spec.per_row else core.config.pad_id,
        )  # fmt: skip
        self.position.add_(1)
        self.write_index.add_(1)
        return core.final_layer(hidden)[:, None]

    def step(self, ids: Tensor) -> Tensor:
        """The logits [B, 1, V] of one new token per row (``ids`` [B, 1])."""
        self.ids.copy_(ids)
        if not self.spec.graph:
            return self._compute()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        assert self.logits is not None
        return self.logits.clone()  # the graph rewrites its output at the next replay

    def _capture(self) -> None:
        # Warm-up and capture run the step: keep the state it advances, and restore it (the
        # slots it wrote are masked again, and rewritten when their tokens come).
        kept = (self.position, self.write_index, self.key_bias)
        saved = [t.clone() for t in kept]
        try:
            with sdpa_backends():
                self.graph, self.logits = capture_graph(self._compute)
        finally:
            for t, s in zip(kept, saved):
                t.copy_(s)


@dataclass
class StaticDecodeCache(PLDRCache):
    """A :class:`PLDRCache` whose KV part lives in a :class:`StaticDecoder` (``decoder``; None
    once :meth:`materialize` d): ``length`` positions held, ``metrics`` the prompt's A per layer
    (what the concatenating cache keeps with the keys). ``g`` is the prompt pass's G-cache."""

    decoder: StaticDecoder | None = None
    length: int = 0
    metrics: list[Tensor | None] | None = None

    @property
    def seq_len(self) -> int:
        return self.length if self.decoder is not None else super().seq_len

    def can_step(self) -> bool:
        """Whether the next one-token call can run on the static buffers (a free slot left)."""
        return self.decoder is not None and self.length < self.decoder.spec.capacity

    def step(self, ids: Tensor) -> Tensor:
        """The logits [B, 1, V] of ``ids`` [B, 1] (one new token per row), cached."""
        assert self.decoder is not None
        logits = self.decoder.step(ids)
        self.length += 1
        return logits

    @torch.no_grad()
    def materialize(self) -> PLDRCache:
        """Become the concatenating cache of the same positions, in place (copies of the
        buffers: the decoder can then serve another call); returns self."""
        decoder = self.decoder
        if decoder is None:
            return self
        length, metrics = self.length, self.metrics or [None] * len(decoder.kv)
        self.kv = [
            LayerKV(s.key[:, :, :length].clone(), s.value[:, :, :length].clone(), metric)
            for s, metric in zip(decoder.kv, metrics)
        ]
        self.key_valid = decoder.key_bias[:, :length] == 0
        self.next_position = decoder.position.clone() if self.per_row else None
        self.decoder = None
        return self

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.materialize()
        super().reorder_cache(beam_idx)

    def crop(self, max_length: int) -> None:
        if max_length:
            self.materialize()
            super().crop(max_length)

    def select_rows(self, rows: Tensor) -> PLDRCache:
        self.materialize()
        return super().select_rows(rows)


def _capacity(length: int, max_seq_len: int) -> int:
    """Key slots for ``length`` positions: a power of two (at least :data:`MIN_CAPACITY`), at
    most ``max_seq_len`` (a longer sequence is refused by the concatenating path)."""
    return min(max(MIN_CAPACITY, 1 << max(0, length - 1).bit_length()), max_seq_len)


def static_spec(
    core: PLDRModel, settings: StaticDecodeSettings, cache: PLDRCache, max_length: int
) -> StaticSpec | None:
    """The static decoder for transformers' loop after the prompt pass ``cache`` (with the
    G-cache of the steps), up to ``max_length`` positions; None where the concatenating cache
    stays (not enabled on this device, training, no KV-cache, a causal metric that grows with
    each step)."""
    device, g = core.device, cache.g
    on_cuda = device.type == "cuda"
    enabled = on_cuda if settings.enabled is None else settings.enabled
    if not enabled or core.training or torch.is_grad_enabled() or not cache.kv:
        return None
    if isinstance(cache, StaticDecodeCache) or (core.config.causal_metric and g is None):
        return None
    capacity = _capacity(max_length, core.config.max_seq_len)
    if cache.seq_len >= capacity:
        return None
    metric = g is None and cache.kv[0].metric_tensor is not None
    fused_ok = g is not None and fused_supports(core) is None and fused_available(device)
    fused = (fused_ok and on_cuda) if settings.fused is None else settings.fused and fused_ok
    graph = on_cuda if settings.cuda_graph is None else settings.cuda_graph and on_cuda
    weights = (str(device), str(core.dtype), *(p.data_ptr() for p in core.parameters()))
    return StaticSpec(
        rows=int(cache.kv[0].key.shape[0]), capacity=capacity, per_row=cache.per_row,
        g=g is not None, metric=metric, fused=fused, graph=graph, weights=weights,
    )  # fmt: skip


def _idle(core: PLDRModel) -> IdlePool:
    return idle_pool(core, "_pldr_hf_static_decoders", MAX_IDLE_DECODERS)


def start_static(core: PLDRModel, spec: StaticSpec, cache: PLDRCache) -> StaticDecodeCache:
    """A :class:`StaticDecodeCache` holding the prompt pass's ``cache`` (with the G-cache of the
    steps), on the model's idle decoder of ``spec`` (its graph already captured) or a new one.
    Give the decoder back with :func:`finish_static` when the loop ends."""
    decoder = _idle(core).take(spec)
    if decoder is None:
        decoder = StaticDecoder(core, spec)
    decoder.load(cache, cache.g)
    assert cache.kv is not None
    return StaticDecodeCache(
        g=cache.g, per_row=cache.per_row, decoder=decoder, length=cache.seq_len,
        metrics=[kv.metric_tensor for kv in cache.kv],
    )  # fmt: skip


def finish_static(core: PLDRModel, caches: list[StaticDecodeCache]) -> None:
    """The end of a loop: its static caches become concatenating ones (one may be returned to
    the caller) and their decoders idle ones of the model."""
    for cache in caches:
        decoder = cache.decoder
        cache.materialize()
        if decoder is not None:
            _idle(core).put(decoder.spec, decoder)


@dataclass
class _Session:
    """One run of transformers' loop on ``core``: positions up to ``max_length``."""

    core: PLDRModel
    settings: StaticDecodeSettings
    max_length: int
    caches: list[StaticDecodeCache] = field(default_factory=list)


#: Per thread: the sessions of the loops running (an assistant model's inside its main one's).
_SESSIONS = threading.local()


@contextmanager
def static_session(
    core: PLDRModel, settings: StaticDecodeSettings, max_length: int | None
) -> Iterator[None]:
    """Around a run of transformers' loop (``max_length``: its longest sequence; None: none
    known, the concatenating cache stays): :func:`to_static` may move its cache into static
    buffers, which return to the model when the loop ends (:func:`finish_static`)."""
    stack: list[_Session] = _SESSIONS.__dict__.setdefault("stack", [])
    session = _Session(core, settings, max_length) if max_length else None
    if session is not None:
        stack.append(session)
    try:
        yield
    finally:
        if session is not None:
            stack.remove(session)
            finish_static(core, session.caches)


def to_static(core: PLDRModel, cache: PLDRCache) -> PLDRCache:
    """The cache for the steps after the prompt pass ``cache`` (with the G-cache of the steps):
    a :class:`StaticDecodeCache` inside a :func:`static_session` of ``core`` where
    :func:`static_spec` allows one, else ``cache``."""
    stack: list[_Session] = _SESSIONS.__dict__.get("stack", [])
    session = next((s for s in reversed(stack) if s.core is core), None)
    if session is None:
        return cache
    spec = static_spec(core, session.settings, cache, session.max_length)
    if spec is None:
        return cache
    static = start_static(core, spec, cache)
    session.caches.append(static)
    return static

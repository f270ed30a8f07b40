"""Greedy decoding with a static KV-cache and a CUDA-graph-replayed one-token step.

Eager decoding of a small model is bound by the host: every new token launches ~200 small
kernels from Python (and the reference path also reads device values on the host each layer).
Here the one-token step runs on preallocated buffers whose addresses never change, so it can be
captured once in a CUDA graph and replayed for every token, with the arg-max and the update of the
next step's inputs inside the graph: no host work and no host sync per token.

The step runs the model's own layers (:meth:`PLDRModel.run_layers`); only the storage differs:
:class:`~pldr_llm.model.cache.StaticLayerKV` writes keys/values in place at a slot index, and the
attention bias masks the slots that are padding or not yet written. The prompt runs through the
ordinary :meth:`PLDRModel.forward` (so padding and per-row semantics are the reference's) and its
KV-cache and G-cache are copied into the buffers. With the G-cache the metric learner is skipped in
every step, as in :func:`pldr_llm.generate` with ``enable_Gcache=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pldr_llm.errors import PLDRError
from pldr_llm.model.cache import GCacheEntry, LayerKV, PLDRCache, StaticLayerKV
from pldr_llm.model.model import PLDRModel, PLDROutput
from pldr_llm.model.plga import MASK_VALUE


def _maybe_compile(fn: Callable, compile: bool | dict[str, Any]) -> Callable:
    """``fn`` as is, or through torch.compile (``compile`` may be a dict of its options)."""
    if not compile:
        return fn
    options = dict(compile) if isinstance(compile, dict) else {}
    options.setdefault("dynamic", False)
    if "mode" not in options:
        # Inductor's coordinate-descent tuning of its reduction kernels: +10% tokens/s for
        # batch-1 fp32 decoding on an H200 (benchmarks/decode_variants.py, BENCHMARKS.md).
        options.setdefault("options", {"coordinate_descent_tuning": True})
    return torch.compile(fn, **options)


def _capture(fn: Callable[[], object], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``fn`` up on a side stream (compiles, picks kernels), then capture it in a graph."""
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


class StaticDecoder:
    """Greedy decoder of ``model`` for ``batch_size`` rows and up to ``max_len`` total tokens.

    ``cuda_graph`` (default: on when the model is on a CUDA device) captures the step once, at
    construction; ``compile`` first passes the step through torch.compile (fewer, fused kernels
    in the graph). On the CPU the same step runs eagerly, which is what the tests compare with
    :func:`pldr_llm.generate`. Buffers are in the model's dtype.
    """

    def __init__(
        self,
        model: PLDRModel,
        batch_size: int,
        max_len: int,
        cuda_graph: bool | None = None,
        compile: bool | dict[str, Any] = False,
        steps_per_graph: int = 1,
    ) -> None:
        config = model.config
        if steps_per_graph < 1:
            raise PLDRError(f"steps_per_graph must be >= 1, got {steps_per_graph}")
        self.steps_per_graph = steps_per_graph
        if max_len > config.max_seq_len:
            raise PLDRError(f"max_len {max_len} exceeds max_seq_len={config.max_seq_len}")
        self.model = model
        self.batch_size = batch_size
        self.max_len = max_len
        device, dtype = model.device, model.dtype
        # Slots rounded up to a multiple of 8 (aligned rows for the fused attention kernels);
        # the extra slots are never written and always masked.
        slots = -(-max_len // 8) * 8
        heads, depth = config.num_heads, config.depth
        shape = (batch_size, heads, slots, depth)

        def zeros(*size, dt=torch.long):
            return torch.zeros(size, dtype=dt, device=device)

        self.slot = zeros(1)  # slot the next token's key/value is written to
        self.step_index = zeros(1)  # column of `history` the next id goes to
        self.ids = zeros(batch_size, 1)  # input id of the next step
        self.position = zeros(batch_size, 1)  # its rotary position, per row
        self.key_valid = zeros(batch_size, slots, dt=torch.bool)
        self.per_row = zeros(1, dt=torch.bool)  # the reference's per-row padding semantics
        self.slot_range = torch.arange(slots, device=device)
        self.history = zeros(batch_size, slots)  # >= max_len; warm-up steps write here too
        self.kv = [
            StaticLayerKV(zeros(*shape, dt=dtype), zeros(*shape, dt=dtype), self.slot)
            for _ in range(config.num_layers)
        ]
        self.g = [
            GCacheEntry(None, zeros(batch_size, heads, depth, depth, dt=dtype))
            for _ in range(config.num_layers)
        ]
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.use_graph and 4 + 2 * steps_per_graph > slots:
            # capturing runs warm-up steps that write into the buffers before prefill resets them
            raise PLDRError(f"steps_per_graph={steps_per_graph} is too large for max_len={max_len}")
        step = _maybe_compile(self._step, compile)
        self._run: Callable[[], Tensor]
        # Several steps in one graph: one replay (and one trip through Python) per
        # ``steps_per_graph`` tokens; used when the step logits are not asked for.
        self._run_many: Callable[[], Tensor] | None = None
        if self.use_graph:
            with torch.no_grad():
                graph, self._logits = _capture(step)
            self._run = lambda: (graph.replay(), self._logits)[1]
            if steps_per_graph > 1:

                def many() -> Tensor:
                    logits = step()
                    for _ in range(steps_per_graph - 1):
                        logits = step()
                    return logits

                with torch.no_grad():
                    many_graph, self._many_logits = _capture(many, warmup=1)
                self._run_many = lambda: (many_graph.replay(), self._many_logits)[1]
            # the warm-up steps advanced the buffers; prefill() resets what it reads
            self.slot.zero_()
            self.step_index.zero_()
        else:
            self._run = step

    @torch.no_grad()
    def _step(self) -> Tensor:
        """One token for every row: attend, pick the arg-max, advance the buffers."""
        model = self.model
        # The reference masks a new key that is the pad id unless the cache is per-row.
        new_valid = (self.ids[:, 0] != model.config.pad_id) | self.per_row
        self.key_valid.index_copy_(1, self.slot, new_valid[:, None])
        allowed = self.key_valid & (self.slot_range <= self.slot)
        bias = torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device)
        bias = bias.masked_fill(~allowed, MASK_VALUE)[:, None, None, :]
        hidden, _, _, _ = model.run_layers(
            self.ids, self.position, bias, False, kv=self.kv, g=self.g
        )
        logits = model.final_layer(hidden[:, -1])
        next_ids = logits.argmax(-1)
        self.history.index_copy_(1, self.step_index, next_ids[:, None])
        self.ids.copy_(next_ids[:, None])
        self.position.add_(1)
        self.slot.add_(1)
        self.step_index.add_(1)
        return logits

    @torch.no_grad()
    def prefill(self, prompt_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Run the prompt through ``model.forward``, fill the buffers; returns the last logits."""
        model = self.model
        batch, length = prompt_ids.shape
        if batch != self.batch_size:
            raise PLDRError(f"this decoder is for batch {self.batch_size}, got {batch} rows")
        out: PLDROutput = model(prompt_ids, attention_mask=attention_mask, logits_to_keep=1)
        cache = out.cache
        if cache.g is None or cache.kv is None:
            raise PLDRError("the prompt pass returned no KV/G cache")
        for static, kv in zip(self.kv, cache.kv):
            static.key[:, :, :length].copy_(kv.key)
            static.value[:, :, :length].copy_(kv.value)
        for static_g, g in zip(self.g, cache.g):
            static_g.G_LM.copy_(g.G_LM.expand_as(static_g.G_LM))
        self.key_valid.zero_()
        self.key_valid[:, :length].copy_(cache.key_valid)
        self.per_row.fill_(cache.per_row)
        if cache.next_position is not None:
            self.position.copy_(cache.next_position[:, None])
        else:
            self.position.fill_(length)
        logits = out.logits[:, -1]
        first = logits.argmax(-1)
        self.history.zero_()
        self.history[:, 0].copy_(first)
        self.ids.copy_(first[:, None])
        self.slot.fill_(length)
        self.step_index.fill_(1)
        return logits

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        attention_mask: Tensor | None = None,
        stop_at_eos: bool = True,
        eos_id: int | None = None,
        output_logits: bool = False,
        check_every: int = 32,
    ) -> tuple[Tensor, Tensor | None]:
        """Greedy ids as :func:`pldr_llm.generate` with ``top_k=1`` returns them for a [B, L]
        prompt (rows that stopped are filled with the pad id), and the step logits [steps, B, V]
        when ``output_logits``. Whether every row has stopped is checked every ``check_every``
        tokens (the only host syncs of the loop)."""
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
        length = prompt_ids.shape[1]
        if max_new_tokens < 1:
            return prompt_ids, None
        if length + max_new_tokens > self.max_len:
            raise PLDRError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds this decoder's "
                f"max_len={self.max_len}"
            )
        config = self.model.config
        eos = config.eos_id if eos_id is None else eos_id
        prompt_ids = prompt_ids.to(self.model.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.model.device)
        step_logits = [self.prefill(prompt_ids, attention_mask).float().clone()]
        steps = 1
        next_check = check_every
        many = self.steps_per_graph
        while steps < max_new_tokens:
            if self._run_many is not None and not output_logits and max_new_tokens - steps >= many:
                self._run_many()
                steps += many
            else:
                logits = self._run()
                if output_logits:
                    step_logits.append(logits.float().clone())
                steps += 1
            if stop_at_eos and steps >= next_check:
                next_check = steps + check_every
                if bool((self.history[:, :steps] == eos).any(1).all()):
                    break
        new = self.history[:, :steps].clone()
        if stop_at_eos:
            # Rows keep decoding after their end-of-text here; the reference feeds them the pad
            # id instead, which changes nothing for the other rows (rows never interact).
            after_eos = (new == eos).long().cumsum(1) - (new == eos).long() > 0
            new = new.masked_fill(after_eos, config.pad_id)
            finished = (new == eos).any(1)
            if bool(finished.all()):
                steps = int((new == eos).long().argmax(1).max()) + 1
                new = new[:, :steps]
                step_logits = step_logits[:steps]
        ids = torch.cat((prompt_ids, new), dim=1)
        return ids, torch.stack(step_logits) if output_logits else None


def greedy_generate(
    model: PLDRModel,
    prompt_ids: Tensor,
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
    stop_at_eos: bool = True,
    eos_id: int | None = None,
    cuda_graph: bool | None = None,
    compile: bool | dict[str, Any] = False,
) -> Tensor:
    """One-shot :class:`StaticDecoder` run: the ids of ``generate(model, prompt, n, top_k=1)``.

    Building the decoder captures its graph (and compiles when asked): reuse a
    :class:`StaticDecoder` to decode many prompts of one batch size.
    """
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids.unsqueeze(0) if squeeze else prompt_ids
    decoder = StaticDecoder(
        model, ids.shape[0], ids.shape[1] + max_new_tokens, cuda_graph=cuda_graph, compile=compile
    )
    out, _ = decoder.generate(
        ids,
        max_new_tokens,
        attention_mask=attention_mask,
        stop_at_eos=stop_at_eos,
        eos_id=eos_id,
    )
    return out[0] if squeeze else out


class CapturedForward:
    """The whole-sequence forward of a [batch, length] prompt without padding, in a CUDA graph.

    Same computation as ``model(input_ids, logits_to_keep=logits_to_keep)`` when no id is the pad
    id (plain causal attention, the metric learner on every layer). Calls return an
    :class:`~pldr_llm.model.PLDROutput` whose tensors are the graph's static outputs: they are
    overwritten by the next call (clone what you keep). On the CPU it runs eagerly.
    """

    def __init__(
        self,
        model: PLDRModel,
        batch_size: int,
        length: int,
        logits_to_keep: int = 1,
        cuda_graph: bool | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        if length > model.config.max_seq_len:
            raise PLDRError(f"length {length} exceeds max_seq_len={model.config.max_seq_len}")
        self.model = model
        device = model.device
        self.ids = torch.ones(batch_size, length, dtype=torch.long, device=device)
        self.positions = torch.arange(length, device=device)
        self.logits_to_keep = logits_to_keep
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        forward = _maybe_compile(self._forward, compile)
        if self.use_graph:
            with torch.no_grad():
                graph, outputs = _capture(forward)
            self._run = lambda: (graph.replay(), outputs)[1]
        else:
            self._run = forward

    @torch.no_grad()
    def _forward(self) -> tuple[Tensor, list[LayerKV], list[GCacheEntry]]:
        hidden, kv, g, _ = self.model.run_layers(self.ids, self.positions, None, True)
        return self.model.final_layer(hidden[:, -self.logits_to_keep :]), kv, g

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> PLDROutput:
        if input_ids.shape != self.ids.shape:
            raise PLDRError(
                f"this forward is for shape {tuple(self.ids.shape)}, got {tuple(input_ids.shape)}"
            )
        if bool((input_ids == self.model.config.pad_id).any()):
            raise PLDRError("CapturedForward takes no padding; use model.forward for padded input")
        self.ids.copy_(input_ids)
        logits, kv, g = self._run()
        valid = torch.ones(self.ids.shape, dtype=torch.bool, device=self.ids.device)
        return PLDROutput(logits=logits, cache=PLDRCache(kv=kv, g=g, key_valid=valid))

"""The decoding loop's static buffers: every device tensor a step reads or writes, per row.

:class:`DecodeBuffers` is allocated once per engine and never reallocated (the captured CUDA
graphs read these very tensors): the pending token of each row, its counters, its attention
bias over the key slots, its history of ids, its sampling parameters and pre-drawn uniform
numbers, its stop ids and teacher-forced ids, what a step reports, and the static KV- and
G-caches. It also writes what a prompt pass leaves for the steps (:meth:`fill_caches`) and a
new row's sampling state (:meth:`start_rows`). The logit processing and log-probability
buffers (:mod:`~.processing`) are allocated the first time a row needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .cache import GCacheEntry, PLDRCache, StaticLayerKV
from .graphs import sdpa_backends
from .metric_graphs import MetricGraphs
from .model import PLDRModel, PLDROutput
from .plga import mask_value
from .processing import LogprobHistory, RowProcessing, to_device
from .sampling import MAX_STOP_IDS, SamplingParams, uniform_draws


def prompt_pass(
    model: PLDRModel,
    rows: list[list[int]],
    init: list[GCacheEntry] | None,
    deductive: bool,
    metric_graphs: MetricGraphs | None = None,
) -> tuple[PLDROutput, Tensor]:
    """The prompts' forward (left-padded with an attention mask when their lengths differ):
    its output and the [n, L] ids it ran. With ``metric_graphs`` the output's A, A_LM, A_P and
    G_LM are views that the next pass overwrites (copy them before it)."""
    device, pad = model.device, model.config.pad_id
    length = max(len(r) for r in rows)
    mask = None
    if any(len(r) != length for r in rows):
        mask = to_device([[0] * (length - len(r)) + [1] * len(r) for r in rows], device)
    ids = to_device([[pad] * (length - len(r)) + r for r in rows], device)
    was_training = model.training
    if was_training:  # (eval() walks every module: ~1,000 attribute writes a call)
        model.eval()
    try:
        with sdpa_backends():
            # add_many checked the ids on the host, and the host knows where the padding is:
            # the forward reads nothing back (it would wait for a block the device computes).
            out = model(
                ids, attention_mask=mask, cache=PLDRCache(g=init) if init is not None else None,
                logits_to_keep=1, output_deductive=deductive,
                key_padding=mask is not None or any(pad in r for r in rows), check_ids=False,
                metric_runners=metric_graphs.runners(model) if metric_graphs else None,
            )  # fmt: skip
    finally:
        if was_training:
            model.train()
    return out, ids


@dataclass(frozen=True)
class CacheLayout:
    """What the static caches hold: with the KV-cache, the G-cache, the running metric of a
    causal model without the G-cache, and (recording a model that learns G) A, A_LM and A_P."""

    kv: bool
    g: bool
    causal_running: bool = False
    learned: bool = False


@dataclass
class DecodeBuffers:
    """Every per-row device tensor of the decoding loop (see the module docstring)."""

    ids: Tensor  # [B, 1] pending token: the input of the next step
    # [3, B]: the pending token's rotary position, the KV slot its key/value go to, and the
    # tokens generated so far (the pending one included); every step advances them together.
    counters: Tensor
    active: Tensor  # [B] bool: the slot holds a row
    done: Tensor  # [B] bool: the pending token is the row's last
    # [B, slots] attention bias over each row's key slots (0 or the mask value, like the
    # original's): unwritten slots stay masked, a step unmasks the slot it writes unless its
    # token is the pad id.
    key_bias: Tensor
    bias_values: Tensor  # [2]: the mask value and 0, indexed by "is a valid key"
    history: Tensor  # [B, slots] generated ids per row
    slot_steps: Tensor  # [slots] 0, 1, ...
    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    uniforms: Tensor  # [B, slots] each row's random number per token (drawn when added)
    max_new: Tensor
    stop_ids: Tensor  # [B, MAX_STOP_IDS + 1], end-of-text among them when it stops a row; -1
    forced: Tensor  # [B, slots] teacher forcing: row b's n-th token while n < forced_len[b]
    forced_len: Tensor
    logprob: Tensor  # [B] the pending token's log-probability (output_logprobs)
    report: Tensor  # [3, B] what a step reports: token, finished, logprob
    pending_logits: Tensor | None = None  # [B, V] raw logits of the pending token (keep_logits)
    metric: list[Tensor] | None = None  # per layer [B, H, dk, dk]: A (or its running sum)
    kv: list[StaticLayerKV] | None = None
    g: list[GCacheEntry] | None = None
    g_fixed: Tensor | None = None  # [B] bool: the row's G_LM is a G_init (no G-cache)
    processing: RowProcessing | None = None
    logprobs: LogprobHistory | None = None
    slots: int = field(default=0)

    @property
    def position(self) -> Tensor:
        """[B, 1] the pending token's rotary position (a view of ``counters``)."""
        return self.counters[0].view(-1, 1)

    @property
    def write_index(self) -> Tensor:
        """[B] the KV slot of the pending token's key and value (a view of ``counters``)."""
        return self.counters[1]

    @property
    def n_generated(self) -> Tensor:
        """[B] tokens generated so far, the pending one included (a view of ``counters``)."""
        return self.counters[2]

    @classmethod
    @torch.inference_mode()
    def allocate(
        cls,
        model: PLDRModel,
        batch: int,
        slots: int,
        layout: CacheLayout,
        keep_logits: bool,
        output_logprobs: bool,
    ) -> DecodeBuffers:
        """The buffers of ``batch`` rows of ``slots`` key slots each, on the model's device."""
        config, device, dtype = model.config, model.device, model.dtype

        def zeros(*size: int, dt: torch.dtype = torch.long) -> Tensor:
            return torch.zeros(size, dtype=dt, device=device)

        counters = zeros(3, batch)
        buffers = cls(
            ids=zeros(batch, 1),
            counters=counters,
            active=zeros(batch, dt=torch.bool),
            done=zeros(batch, dt=torch.bool),
            key_bias=torch.full((batch, slots), mask_value(dtype), dtype=dtype, device=device),
            bias_values=torch.tensor([mask_value(dtype), 0.0], dtype=dtype, device=device),
            history=zeros(batch, slots),
            slot_steps=torch.arange(slots, device=device),
            temperature=torch.ones(batch, device=device),
            top_k=zeros(batch),
            top_p=torch.ones(batch, device=device),
            uniforms=zeros(batch, slots, dt=torch.float32),
            max_new=zeros(batch),
            stop_ids=torch.full((batch, MAX_STOP_IDS + 1), -1, dtype=torch.long, device=device),
            forced=zeros(batch, slots),
            forced_len=zeros(batch),
            logprob=zeros(batch, dt=torch.float32),
            report=zeros(3, batch, dt=torch.float32),
            pending_logits=(
                zeros(batch, config.input_vocab_size, dt=torch.float32) if keep_logits else None
            ),
            logprobs=LogprobHistory(batch, slots, device) if output_logprobs else None,
            slots=slots,
        )
        if layout.kv:
            buffers._allocate_caches(model, batch, slots, layout)
        return buffers

    def _allocate_caches(
        self, model: PLDRModel, batch: int, slots: int, layout: CacheLayout
    ) -> None:
        config, device, dtype = model.config, model.device, model.dtype
        heads, depth, layers = config.num_heads, config.depth, config.num_layers
        square = (batch, heads, depth, depth)

        def zeros(*size: int) -> Tensor:
            return torch.zeros(size, dtype=dtype, device=device)

        if not layout.g or layout.learned:
            # G_LM is recomputed each step from A, except on rows given a G_init.
            self.metric = [zeros(*square) for _ in range(layers)]
        if not layout.g:
            self.g_fixed = torch.zeros(batch, dtype=torch.bool, device=device)
        keep_metric = (layout.learned or layout.causal_running) and self.metric is not None
        shape = (batch, heads, slots, depth)
        self.kv = [
            StaticLayerKV(
                zeros(*shape),
                zeros(*shape),
                self.write_index,
                self.metric[i] if keep_metric and self.metric is not None else None,
            )
            for i in range(layers)
        ]
        self.g = [
            GCacheEntry(
                zeros(*square) if layout.learned else None,
                zeros(*square),
                zeros(*square) if layout.learned else None,
            )
            for _ in range(layers)
        ]

    def first_rows(self, n: int) -> DecodeBuffers:
        """The buffers of the first ``n`` rows: views, so that a step run on them (a captured
        graph of fewer rows, when only low slots are in use) writes these buffers. The shared
        tensors (``bias_values``, ``slot_steps``) are the same; the processing and log-probability
        state is viewed as allocated now."""
        if n == self.ids.shape[0]:
            return self
        metric = [m[:n] for m in self.metric] if self.metric is not None else None
        counters = self.counters[:, :n]
        kv = None
        if self.kv is not None:
            kv = [
                StaticLayerKV(
                    layer.key[:n],
                    layer.value[:n],
                    counters[1],
                    layer.metric_tensor[:n] if layer.metric_tensor is not None else None,
                )  # fmt: skip
                for layer in self.kv
            ]

        def rows_of(t: Tensor | None) -> Tensor | None:  # a G_LM of one row is shared
            return t[:n] if t is not None and t.shape[0] > 1 else t

        g = None
        if self.g is not None:
            g = [GCacheEntry(rows_of(e.A_LM), e.G_LM[:n], rows_of(e.A_P)) for e in self.g]
        rows = {
            name: getattr(self, name)[:n]
            for name in ("ids", "active", "done", "key_bias", "history", "temperature", "top_k",
                         "top_p", "uniforms", "max_new", "stop_ids", "forced", "forced_len",
                         "logprob")
        }  # fmt: skip
        return replace(
            self, **rows, counters=counters, report=self.report[:, :n],
            pending_logits=self.pending_logits[:n] if self.pending_logits is not None else None,
            metric=metric, kv=kv, g=g,
            g_fixed=self.g_fixed[:n] if self.g_fixed is not None else None,
            processing=self.processing.first_rows(n) if self.processing is not None else None,
            logprobs=self.logprobs.first_rows(n) if self.logprobs is not None else None,
        )  # fmt: skip

    # ------------------------------------------------------------------ per-row state
    def running(self) -> Tensor:
        """[B] bool: rows that take a token this step (active, last token not pending)."""
        return self.active & ~self.done

    def stop_now(self) -> Tensor:
        """Whether each row's pending token ends it (a stop id, or max_new_tokens reached)."""
        stop = (self.stop_ids == self.ids).any(-1)
        return stop | (self.n_generated >= self.max_new)

    def finished(self, rows: Tensor) -> Tensor:
        """Whether the pending token of ``rows`` is their last (device tensor, no sync)."""
        return self.active[rows] & self.stop_now()[rows]

    @torch.inference_mode()
    def generated_rows(self, slots: Sequence[int]) -> list[list[int]]:
        """The ids generated so far in each of ``slots`` (one read from the device)."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.ids.device)
        counts = self.n_generated[index]
        width = int(counts.max()) if len(slots) else 0
        rows = self.history[index, :width].tolist()
        return [row[:n] for row, n in zip(rows, counts.tolist())]

    def fill_caches(
        self,
        index: Tensor,
        ids: Tensor,
        cache: PLDRCache,
        pad_id: int,
        g_init_given: bool,
    ) -> None:
        """Copy a prompt pass's caches (``cache`` of the [n, L] ``ids``) into rows ``index``:
        keys and values, G_LM (and A_LM, A_P when recorded), the metric tensor, and the key
        bias (a key that is the pad id stays masked, as a lone run masks it)."""
        assert self.kv is not None and self.g is not None
        assert cache.kv is not None and cache.g is not None and cache.key_valid is not None
        n, length = ids.shape
        for static, kv in zip(self.kv, cache.kv):
            static.key[index, :, :length] = kv.key.to(static.key.dtype)
            static.value[index, :, :length] = kv.value.to(static.value.dtype)
        for static_g, g in zip(self.g, cache.g):
            for buffer, t in ((static_g.G_LM, g.G_LM), (static_g.A_LM, g.A_LM),
                              (static_g.A_P, g.A_P)):  # fmt: skip
                if buffer is not None and t is not None:  # A_LM, A_P: record_deductive
                    buffer[index] = t.expand(n, -1, -1, -1).to(buffer.dtype)
        if self.g_fixed is not None:
            self.g_fixed.index_fill_(0, index, g_init_given)
        if not g_init_given and self.metric is not None:
            for metric, kv in zip(self.metric, cache.kv):
                if kv.metric_tensor is not None:  # None: no metric learner (v510G)
                    metric[index] = kv.metric_tensor.to(metric.dtype)
        valid = torch.zeros(n, self.slots, dtype=torch.bool, device=ids.device)
        valid[:, :length] = cache.key_valid & (ids != pad_id)
        self.key_bias[index] = self.bias_values[valid.long()]

    def start_rows(
        self,
        index: Tensor,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        stop_lists: Sequence[Sequence[int]],
        forced: Sequence[Sequence[int]] | None,
    ) -> None:
        """Rows ``index``'s sampling parameters, uniform numbers, stop ids and forced ids
        (from host lists: no per-row tensor writes)."""
        device = self.ids.device
        width = MAX_STOP_IDS + 1
        self.stop_ids[index] = to_device(
            [list(ids_r) + [-1] * (width - len(ids_r)) for ids_r in stop_lists], device, torch.long
        )
        self.temperature[index] = to_device([float(p.temperature) for p in params], device)
        self.top_k[index] = to_device([p.top_k for p in params], device)
        self.top_p[index] = to_device([float(p.top_p) for p in params], device)
        seed = to_device(list(seeds), device, torch.long)
        self.uniforms[index] = uniform_draws(seed[:, None], self.slot_steps[None, :])
        self.max_new[index] = to_device([p.max_new_tokens for p in params], device)
        self.forced.index_fill_(0, index, 0)
        self.forced_len.index_fill_(0, index, 0)
        if forced:
            rows = [r for r, f in enumerate(forced) for _ in f]
            columns = [c for f in forced for c in range(len(f))]
            values = [int(t) for f in forced for t in f]
            if rows:
                where = index[to_device(rows, device, torch.long)]
                self.forced[where, to_device(columns, device, torch.long)] = to_device(
                    values, device, torch.long
                )
            self.forced_len[index] = to_device([len(f) for f in forced], device, torch.long)

    def set_first(
        self, index: Tensor, first: Tensor, length: int, next_position: Tensor | None
    ) -> None:
        """Rows ``index`` hold their first token ``first`` after a prompt of ``length``
        positions (``next_position``: each row's next rotary position when rows were padded)."""
        self.ids[index] = first[:, None]
        self.counters[0, index] = (
            next_position if next_position is not None else torch.full_like(first, length)
        )
        # Scalars written with index_fill_ (a kernel argument): an indexed assignment of a
        # Python scalar copies it from host memory, which waits for the device.
        self.counters[1].index_fill_(0, index, length)
        self.counters[2].index_fill_(0, index, 1)
        history = torch.zeros(len(first), self.slots, dtype=torch.long, device=first.device)
        history[:, 0] = first
        self.history[index] = history
        self.active.index_fill_(0, index, True)
        self.done[index] = self.finished(index)

    # ------------------------------------------------------------------ optional buffers
    def start_processing(
        self,
        index: Tensor,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        stop_lists: Sequence[Sequence[int]],
        logits: Tensor,
    ) -> Tensor:
        """Set the processing state of the new rows ``index`` (once any row has needed it,
        every new row resets its slot's state) and return their first token's processed
        logits."""
        wanted = any(p.processed for p in params)
        if self.processing is None:
            if not wanted:
                return logits
            batch, vocab = self.ids.shape[0], logits.shape[-1]
            self.processing = RowProcessing(batch, vocab, MAX_STOP_IDS + 1, self.ids.device)
        self.processing.set_rows(index, params, prompts, stop_lists)
        if not wanted:
            return logits
        return self.processing.apply(logits, torch.zeros_like(index), rows=index)

    def record_first_logprobs(
        self, index: Tensor, logits: Tensor, first: Tensor, top: bool, output_logprobs: bool
    ) -> None:
        """The first tokens' log-probabilities (and top alternatives when ``top``), where kept."""
        if top and self.logprobs is None:
            self.logprobs = LogprobHistory(self.ids.shape[0], self.slots, self.ids.device)
        if self.logprobs is None:
            return
        if top:
            self.logprobs.ensure_top()
        chosen = self.logprobs.record_rows(torch.log_softmax(logits, -1), first, index, top)
        if output_logprobs:
            self.logprob[index] = chosen

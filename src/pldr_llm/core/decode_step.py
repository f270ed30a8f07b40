"""The one-token decoding step on the static buffers: the layers, then the sampling stage.

:class:`KVStep` runs one position of every row through the layers against the static KV- and
G-caches (the fused kernels of :mod:`~.fused`, or :meth:`PLDRModel.run_layers` op by op) and
hands the logits to :meth:`KVStep.advance_rows`, the sampling stage every path shares (the
no-KV reference loop of :mod:`~.reference_loop` too): logit processing, log-probabilities,
the filters and the draw, teacher forcing, and the bookkeeping (history, counters, stop test).
No host sync: the step is captured in a CUDA graph as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .cache import GCacheEntry, StaticLayerKV
from .decode_buffers import DecodeBuffers
from .fused import advance as advance_fused
from .fused import decode_hidden
from .model import PackedLayer, PLDRModel
from .plga import Deductive
from .sampling import SamplingMode, sample_rows


class StepVariant(NamedTuple):
    """A variant of the one-token step, from what the running rows need: the sampling mode,
    whether any row is teacher-forced, has its logits processed (penalties, bias, a minimum
    length) or asks for top log-probabilities. Each variant is captured on its first use, so
    rows without an option never pay for it."""

    mode: SamplingMode
    forcing: bool = False
    processed: bool = False
    top_logprobs: bool = False


#: Records one step's deductive outputs: (per-layer outputs of the batch) -> None.
StepRecorder = Callable[[Sequence[Deductive]], None]


def one_token_hidden(
    model: PLDRModel,
    ids: Tensor,
    positions: Tensor,
    key_bias: Tensor,
    write_index: Tensor,
    bias_values: Tensor,
    kv: list[StaticLayerKV],
    g: list[GCacheEntry] | None,
    *,
    packed: list[PackedLayer] | None,
    fused: bool,
    pad_id: int,
    output_deductive: bool = False,
) -> tuple[Tensor, list[Any], list[Deductive]]:
    """The decoder's last hidden state [B, d_model] of one new token per row (``ids`` [B, 1] at
    rotary ``positions`` [B]) against the static caches ``kv`` (written in place at
    ``write_index``) and ``g``: with ``fused`` the fused kernels (:func:`decode_hidden`), else
    :meth:`PLDRModel.run_layers` op by op. Either way a new key whose id is ``pad_id`` (-1: none)
    stays masked in ``key_bias`` [B, slots] (``bias_values``: the masked and the open value).
    Also the op-by-op pass's KV entries and deductive outputs (empty when fused). The decoding
    loop's step and transformers' loop on static buffers (:mod:`.hf_static_cache`) run this."""
    if fused:
        assert packed is not None and g is not None
        hidden = decode_hidden(model, packed, ids.view(-1), positions, key_bias, kv, g, pad_id)
        return hidden, [], []
    key_bias.scatter_(1, write_index[:, None], bias_values[(ids != pad_id).long()])
    hidden, kv_out, _, deductive = model.run_layers(
        ids, positions[:, None], key_bias[:, None, None, :], False, kv=kv, g=g,
        output_deductive=output_deductive, packed=packed,
    )  # fmt: skip
    return hidden[:, -1], kv_out, deductive


class KVStep:
    """The step of an engine with the KV-cache, and the sampling stage of every engine.

    ``fused``: the fused kernels (else op by op, with ``packed`` projections when given);
    ``causal_running``: a causal metric without the G-cache (each step continues the running
    sum of q^T q); ``recorder``: called with each step's deductive outputs (eager only)."""

    def __init__(
        self,
        model: PLDRModel,
        buffers: DecodeBuffers,
        *,
        packed: list[PackedLayer] | None,
        fused: bool,
        enable_Gcache: bool,
        causal_running: bool,
        output_logprobs: bool,
        recorder: StepRecorder | None = None,
    ) -> None:
        self.model = model
        self.buffers = buffers
        self.packed = packed
        self.fused = fused
        self.enable_Gcache = enable_Gcache
        self.causal_running = causal_running
        self.output_logprobs = output_logprobs
        self.recorder = recorder

    def first_rows(self, n: int) -> KVStep:
        """The same step on the first ``n`` rows of the buffers (views; see
        :meth:`DecodeBuffers.first_rows`): a block of the low rows when only those are in use."""
        return KVStep(
            self.model, self.buffers.first_rows(n), packed=self.packed, fused=self.fused,
            enable_Gcache=self.enable_Gcache, causal_running=self.causal_running,
            output_logprobs=self.output_logprobs,
        )  # fmt: skip

    def __call__(self, variant: StepVariant) -> None:
        """One token for every running row, on the static buffers (no host sync)."""
        model, b = self.model, self.buffers
        assert b.kv is not None and b.g is not None
        # The reference masks a new key that is the pad id (rows are never per-row padded here).
        hidden, kv_out, deductive = one_token_hidden(
            model, b.ids, b.counters[0], b.key_bias, b.write_index, b.bias_values, b.kv,
            b.g if self.fused else self._step_g(), packed=self.packed, fused=self.fused,
            pad_id=model.config.pad_id, output_deductive=self.recorder is not None,
        )  # fmt: skip
        if self.recorder is not None:
            self.recorder(deductive)
        if self.causal_running:
            self._advance_metric(kv_out)
        self.advance_rows(model.final_layer(hidden), variant)

    def _step_g(self) -> list[GCacheEntry] | None:
        """The G-cache of this step: cached, or recomputed from each row's metric tensor (None:
        the layers compute it, from the causal metric's running sum)."""
        b = self.buffers
        if self.enable_Gcache:
            return b.g
        if self.causal_running:
            return None
        assert b.metric is not None and b.g is not None and b.g_fixed is not None
        out = []
        fixed = b.g_fixed[:, None, None, None]
        for layer, metric, g in zip(self.model.decoder.dec_layers, b.metric, b.g):
            attention: Any = layer.mha1  # a PLGA layer (typed as a Module attribute)
            a_lm = a_p = None
            if attention.predefined_G:
                g_lm = attention.predefined_G_LM.to(g.G_LM.dtype).expand_as(g.G_LM)
            else:
                a_lm, a_p, g_lm = attention.plgatt_layer(metric)
            if self.recorder is None:  # A_LM, A_P only feed the recorded outputs
                a_lm = a_p = None
            out.append(GCacheEntry(a_lm, torch.where(fixed, g.G_LM, g_lm), a_p))
        return out

    def _advance_metric(self, kv_out: Sequence[Any]) -> None:
        """Keep each running row's new running sum of q^T q (``causal_running``)."""
        b = self.buffers
        assert b.metric is not None
        run = b.running()[:, None, None, None]
        for metric, kv in zip(b.metric, kv_out):
            metric.copy_(torch.where(run, kv.metric_tensor.to(metric.dtype), metric))

    def advance_rows(self, logits: Tensor, variant: StepVariant) -> None:
        """Sample each running row's next token from ``logits`` [B, V] and advance the state;
        the pending tokens (and whether they were last) go to ``report`` first.

        Every kernel here runs once per token, so the bookkeeping is kept to a few: the three
        counters advance together, end-of-text is one of the stop ids, and teacher forcing,
        logit processing and top log-probabilities are only in the variants of the step that
        rows asking for them need."""
        b = self.buffers
        raw_logits = logits
        if variant.processed:
            assert b.processing is not None
            b.processing.count(b.ids, b.running())
            logits = b.processing.apply(logits, b.n_generated, kernel=self.fused)
        with_logprobs = b.logprobs is not None and (self.output_logprobs or variant.top_logprobs)
        mode = variant.mode

        def column_and_uniform() -> tuple[Tensor, Tensor | None]:
            # A row never generates more than slots - 1 tokens; the clamp keeps the index of a
            # free slot's stale counter in range.
            column = b.n_generated.clamp(max=b.slots - 1)[:, None]
            return column, b.uniforms.gather(1, column)[:, 0] if mode != "greedy" else None

        if self.fused and not with_logprobs and b.pending_logits is None:
            # The same bookkeeping in one kernel (after a two-kernel arg-max when greedy).
            new = None
            if mode != "greedy":
                _, uniform = column_and_uniform()
                new = sample_rows(logits.float(), b.temperature, b.top_k, b.top_p, uniform, mode)
            advance_fused(
                new, logits, b.ids.view(-1), b.active, b.done, b.counters, b.history, b.report,
                b.stop_ids, b.max_new, b.forced if variant.forcing else None,
                b.forced_len if variant.forcing else None,
            )  # fmt: skip
            return
        logits = logits.float()
        run = b.running()
        column, uniform = column_and_uniform()
        new = sample_rows(logits, b.temperature, b.top_k, b.top_p, uniform, mode)
        if variant.forcing:
            forced = b.forced.gather(1, column)[:, 0]
            new = torch.where(b.n_generated < b.forced_len, forced, new)
        b.report[0].copy_(b.ids[:, 0])
        b.report[1].copy_(b.done)
        if with_logprobs:
            assert b.logprobs is not None
            logprobs = torch.log_softmax(logits, -1)
            chosen = b.logprobs.record(logprobs, new, column, variant.top_logprobs)
            if self.output_logprobs:
                b.report[2].copy_(b.logprob)
                torch.where(run, chosen, b.logprob, out=b.logprob)
        if b.pending_logits is not None:
            kept = raw_logits.float()
            torch.where(run[:, None], kept, b.pending_logits, out=b.pending_logits)
        # Rows that do not run write past their last token, which nothing reads.
        b.history.scatter_(1, column, new[:, None])
        torch.where(run[:, None], new[:, None], b.ids, out=b.ids)
        b.counters.add_(run.long())  # position, write index, tokens generated
        torch.logical_and(b.active, b.stop_now(), out=b.done)

"""Logit processing before sampling: penalties, bias, a minimum length, and log-probabilities.

:class:`RowProcessing` holds, per row of the decoding loop, what
:class:`~pldr_llm.core.sampling.SamplingParams` asks for (see its docstring for the rules and
their order) as device tensors: [B, V] buffers (the generated tokens' counts, the prompt's
tokens, the bias) and [B] parameters. :meth:`RowProcessing.count` adds each row's pending token
to its counts with one scatter and :meth:`RowProcessing.apply` is a handful of [B, V] element
operations, so both run inside a captured CUDA graph with no host sync. A row without options
has penalty 1, zero counts' weights and zero bias, which leave its logits exactly as they were
(``x / 1``, ``x - 0 * c``, ``x + 0``): a batch mixes both kinds of row freely, and a batch
without any processed row runs a step that skips all of this.

:class:`LogprobHistory` keeps each row's token log-probabilities and top-n alternatives per
generated position, written by the step that samples the token, read when it is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .fused import available as fused_available
from .fused import penalize
from .sampling import MAX_LOGPROBS, SamplingParams


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device`` without waiting for the device.

    A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory, which waits for
    all the work queued on the stream (a block of decoding steps) and lets go of the interpreter
    lock meanwhile: a server admitting sequences would stall the pipeline at each such copy
    and then wait for another thread to hand the lock back. Through pinned memory the copy is
    queued like a kernel; torch's host allocator keeps the pinned buffer until it has run."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class RowProcessing:
    """The per-row processing state of ``batch`` rows over a vocabulary of ``vocab`` tokens
    (allocated by the decoding loop the first time a row needs it)."""

    def __init__(self, batch: int, vocab: int, stop_width: int, device: torch.device) -> None:
        def zeros(*size: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.zeros(size, dtype=dtype, device=device)

        self.counts = zeros(batch, vocab)  # generated tokens per id (float: it scales a logit)
        self.in_prompt = zeros(batch, vocab, dtype=torch.bool)
        self.bias = zeros(batch, vocab)
        self.repetition = torch.ones(batch, device=device)
        self.presence = zeros(batch)
        self.frequency = zeros(batch)
        self.min_new = zeros(batch, dtype=torch.long)
        # The ids masked before min_new tokens: the row's stop ids, unused places repeating one
        # of them (or id 0 with `min_mask` False), so one scatter writes each id consistently.
        self.min_ids = zeros(batch, stop_width, dtype=torch.long)
        self.min_mask = zeros(batch, stop_width, dtype=torch.bool)

    def first_rows(self, n: int) -> RowProcessing:
        """The same state of the first ``n`` rows (views: a step on them writes these)."""
        view = object.__new__(RowProcessing)
        for name, value in vars(self).items():
            setattr(view, name, value[:n])
        return view

    @torch.inference_mode()
    def set_rows(
        self,
        index: Tensor,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        stop_ids: Sequence[Sequence[int]],
    ) -> None:
        """Start rows ``index`` (device [n]) afresh: their parameters, prompts and stop ids.
        Written with a few scatters of the rows' ids and values, whatever the vocabulary: no
        [n, V] tensor is built on the host (or copied to the device)."""
        device = self.counts.device

        def on_device(values: list, dtype: torch.dtype = torch.long) -> Tensor:
            return to_device(values, device, dtype)

        for table in (self.counts, self.in_prompt, self.bias):
            table.index_fill_(0, index, 0)
        rows = [r for r, prompt in enumerate(prompts) for _ in prompt]
        if rows:
            ids = [int(t) for prompt in prompts for t in prompt]
            # One flat index_fill_ (the value a kernel argument, not a copy from the host).
            flat = index[on_device(rows)] * self.in_prompt.shape[1] + on_device(ids)
            self.in_prompt.view(-1).index_fill_(0, flat, True)
        # Each id once per row (SamplingParams.validate): the scatter's order does not matter.
        pairs = [(r, int(t), float(v)) for r, p in enumerate(params) for t, v in p.logit_bias]
        if pairs:
            bias_rows, bias_ids, values = (list(column) for column in zip(*pairs))
            self.bias[index[on_device(bias_rows)], on_device(bias_ids)] = on_device(
                values, self.bias.dtype
            )
        width = self.min_ids.shape[1]
        self.min_ids[index] = on_device(
            [list(stops) + [stops[0]] * (width - len(stops)) if stops else [0] * width
             for stops in stop_ids]
        )  # fmt: skip
        self.min_mask[index] = on_device([bool(stops) for stops in stop_ids], torch.bool)[:, None]
        floats = on_device(
            [[float(p.repetition_penalty), float(p.presence_penalty), float(p.frequency_penalty)]
             for p in params],
            torch.float32,
        )  # fmt: skip
        self.repetition[index] = floats[:, 0]
        self.presence[index] = floats[:, 1]
        self.frequency[index] = floats[:, 2]
        self.min_new[index] = on_device([p.min_new_tokens for p in params])

    def count(self, ids: Tensor, running: Tensor) -> None:
        """Add each running row's pending token (``ids`` [B, 1]) to its counts: the tokens it
        generated so far, as the step that samples the next one sees them."""
        self.counts.scatter_add_(1, ids, running[:, None].to(self.counts.dtype))

    def apply(
        self, logits: Tensor, n_generated: Tensor, rows: Tensor | None = None, kernel: bool = False
    ) -> Tensor:
        """The processed float32 logits of [B, V] ``logits`` (or of the rows ``rows`` of the
        state), for the token each row samples after ``n_generated`` [B] generated ones.
        ``kernel`` (the fused step's): the penalties and bias in one Triton kernel on CUDA, the
        same numbers as the operations below."""

        def of(t: Tensor) -> Tensor:
            return t if rows is None else t[rows]

        if kernel and logits.is_cuda and fused_available(logits.device):  # not twelve [B, V]
            factors = (self.repetition, self.presence, self.frequency)
            logits = penalize(logits, self.counts, self.in_prompt, self.bias, factors, rows)
        else:
            counts = of(self.counts)
            logits = logits.float()
            repetition = of(self.repetition)[:, None]
            present = counts > 0
            penalized = torch.where(logits < 0, logits * repetition, logits / repetition)
            logits = torch.where(of(self.in_prompt) | present, penalized, logits)
            logits = logits - of(self.frequency)[:, None] * counts
            logits = logits - of(self.presence)[:, None] * present.to(logits.dtype)
            logits = logits + of(self.bias)
        ids = of(self.min_ids)
        early = (n_generated < of(self.min_new))[:, None] & of(self.min_mask)
        current = logits.gather(1, ids)
        masked = torch.where(early, torch.full_like(current, float("-inf")), current)
        return logits.scatter_(1, ids, masked)  # (a new tensor either way)


class LogprobHistory:
    """Per row and generated position: the token's log-probability and, once a row asks for
    them (:meth:`ensure_top`), the top-:data:`~pldr_llm.core.sampling.MAX_LOGPROBS`
    alternatives (ids and values)."""

    def __init__(self, batch: int, positions: int, device: torch.device) -> None:
        self.chosen = torch.zeros(batch, positions, device=device)
        self.top_ids: Tensor | None = None
        self.top_values: Tensor | None = None

    def first_rows(self, n: int) -> LogprobHistory:
        """The history of the first ``n`` rows (views; the alternatives' as allocated now)."""
        view = object.__new__(LogprobHistory)
        view.chosen = self.chosen[:n]
        view.top_ids = self.top_ids[:n] if self.top_ids is not None else None
        view.top_values = self.top_values[:n] if self.top_values is not None else None
        return view

    def ensure_top(self) -> None:
        """Allocate the alternatives' buffers (before a step that writes them is captured)."""
        if self.top_ids is None:
            batch, positions = self.chosen.shape
            device = self.chosen.device
            size = (batch, positions, MAX_LOGPROBS)
            self.top_ids = torch.zeros(size, dtype=torch.long, device=device)
            self.top_values = torch.zeros(size, device=device)

    def record(self, logprobs: Tensor, new: Tensor, column: Tensor, top: bool) -> Tensor:
        """Write, at each row's ``column`` [B, 1], the log-probability of its token ``new`` [B]
        under ``logprobs`` [B, V] (and the top alternatives when ``top``); rows that do not run
        write past their last token, which nothing reads. Returns the chosen log-probabilities."""
        chosen = logprobs.gather(-1, new[:, None])
        self.chosen.scatter_(1, column, chosen)
        if top and self.top_ids is not None and self.top_values is not None:
            k = min(MAX_LOGPROBS, logprobs.shape[-1])
            values, ids = torch.topk(logprobs, k, dim=-1)
            where = column[:, :, None].expand(-1, 1, k)
            self.top_ids[:, :, :k].scatter_(1, where, ids[:, None, :])
            self.top_values[:, :, :k].scatter_(1, where, values[:, None, :])
        return chosen[:, 0]

    def record_rows(self, logprobs: Tensor, new: Tensor, rows: Tensor, top: bool) -> Tensor:
        """:meth:`record` of the first token (position 0) of rows ``rows`` [n] only."""
        chosen = logprobs.gather(-1, new[:, None])[:, 0]
        self.chosen[rows, 0] = chosen
        if top and self.top_ids is not None and self.top_values is not None:
            k = min(MAX_LOGPROBS, logprobs.shape[-1])
            values, ids = torch.topk(logprobs, k, dim=-1)
            self.top_ids[rows, 0, :k] = ids
            self.top_values[rows, 0, :k] = values
        return chosen

    def read(
        self, slots: Sequence[int], positions: Sequence[int], top_n: Sequence[int]
    ) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """The log-probability of each ``slots[i]``'s token at ``positions[i]`` and its top
        ``top_n[i]`` alternatives, best first."""
        device = self.chosen.device
        rows = torch.tensor(list(slots), dtype=torch.long, device=device)
        cols = torch.tensor(list(positions), dtype=torch.long, device=device)
        chosen = self.chosen[rows, cols].tolist()
        if self.top_ids is None or self.top_values is None or not any(top_n):
            return chosen, [[] for _ in slots]
        ids = self.top_ids[rows, cols].tolist()
        values = self.top_values[rows, cols].tolist()
        top = [list(zip(i[:n], v[:n])) for i, v, n in zip(ids, values, top_n)]
        return chosen, top

    def read_rows(
        self, index: Tensor, counts: Sequence[int], top_n: Sequence[int]
    ) -> tuple[list[list[float]], list[list[list[tuple[int, float]]]]]:
        """Rows ``index``'s first ``counts[i]`` log-probabilities and, per position, their
        top ``top_n[i]`` alternatives ([] where 0)."""
        width = max(counts, default=0)
        chosen = self.chosen[index, :width].tolist()
        ids = values = None
        if self.top_ids is not None and self.top_values is not None and any(top_n):
            ids = self.top_ids[index, :width].tolist()
            values = self.top_values[index, :width].tolist()
        tops: list[list[list[tuple[int, float]]]] = []
        for r, (n, k) in enumerate(zip(counts, top_n)):
            if ids is None or values is None or k == 0:
                tops.append([[] for _ in range(n)])
            else:
                tops.append([list(zip(i[:k], v[:k])) for i, v in zip(ids[r][:n], values[r][:n])])
        return [row[:n] for row, n in zip(chosen, counts)], tops

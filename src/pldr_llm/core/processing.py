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

from .sampling import MAX_LOGPROBS, SamplingParams


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

    @torch.inference_mode()
    def set_rows(
        self,
        index: Tensor,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        stop_ids: Sequence[Sequence[int]],
    ) -> None:
        """Start rows ``index`` (device [n]) afresh: their parameters, prompts and stop ids."""
        device, n = self.counts.device, len(params)
        vocab = self.counts.shape[1]
        in_prompt = torch.zeros(n, vocab, dtype=torch.bool)
        bias = torch.zeros(n, vocab)
        min_ids = torch.zeros(n, self.min_ids.shape[1], dtype=torch.long)
        min_mask = torch.zeros(n, self.min_ids.shape[1], dtype=torch.bool)
        for r, (p, prompt, stops) in enumerate(zip(params, prompts, stop_ids)):
            in_prompt[r, torch.tensor(list(prompt), dtype=torch.long)] = True
            for token, value in p.logit_bias:
                bias[r, token] = float(value)
            if stops:
                min_ids[r] = stops[0]
                min_ids[r, : len(stops)] = torch.tensor(list(stops), dtype=torch.long)
                min_mask[r] = True
        self.counts[index] = 0.0
        self.in_prompt[index] = in_prompt.to(device)
        self.bias[index] = bias.to(device)
        self.min_ids[index] = min_ids.to(device)
        self.min_mask[index] = min_mask.to(device)
        for name, values in (
            ("repetition", [float(p.repetition_penalty) for p in params]),
            ("presence", [float(p.presence_penalty) for p in params]),
            ("frequency", [float(p.frequency_penalty) for p in params]),
        ):
            getattr(self, name)[index] = torch.tensor(values, device=device)
        self.min_new[index] = torch.tensor([p.min_new_tokens for p in params], device=device)

    def count(self, ids: Tensor, running: Tensor) -> None:
        """Add each running row's pending token (``ids`` [B, 1]) to its counts: the tokens it
        generated so far, as the step that samples the next one sees them."""
        self.counts.scatter_add_(1, ids, running[:, None].to(self.counts.dtype))

    def apply(self, logits: Tensor, n_generated: Tensor, rows: Tensor | None = None) -> Tensor:
        """The processed float32 logits of [B, V] ``logits`` (or of the rows ``rows`` of the
        state), for the token each row samples after ``n_generated`` [B] generated ones."""

        def of(t: Tensor) -> Tensor:
            return t if rows is None else t[rows]

        counts = of(self.counts)
        logits = logits.float()
        repetition = of(self.repetition)[:, None]
        seen = of(self.in_prompt) | (counts > 0)
        penalized = torch.where(logits < 0, logits * repetition, logits / repetition)
        logits = torch.where(seen, penalized, logits)
        logits = logits - of(self.frequency)[:, None] * counts
        logits = logits - of(self.presence)[:, None] * (counts > 0).to(logits.dtype)
        logits = logits + of(self.bias)
        ids = of(self.min_ids)
        early = (n_generated < of(self.min_new))[:, None] & of(self.min_mask)
        current = logits.gather(1, ids)
        masked = torch.where(early, torch.full_like(current, float("-inf")), current)
        return logits.scatter(1, ids, masked)


class LogprobHistory:
    """Per row and generated position: the token's log-probability and, once a row asks for
    them (:meth:`ensure_top`), the top-:data:`~pldr_llm.core.sampling.MAX_LOGPROBS`
    alternatives (ids and values)."""

    def __init__(self, batch: int, positions: int, device: torch.device) -> None:
        self.chosen = torch.zeros(batch, positions, device=device)
        self.top_ids: Tensor | None = None
        self.top_values: Tensor | None = None

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

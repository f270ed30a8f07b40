"""Sampling: the original's filters, per-row parameters, and a counter-based RNG.

The filters stack as the original's ``generate_text`` does: temperature, then top-p (keep the
tokens whose cumulative probability stays <= p, at least one), then top-k (ties with the k-th
kept); filtered logits become -1e10. :func:`sample_rows` does the same per row with tensors
([B] temperature, top-k, top-p), so it runs inside a captured CUDA graph: one descending sort
serves both filters (keep = min(k or V, top-p count); threshold = sorted[keep - 1]).

Randomness is a pure function of (row seed, row step index, vocabulary index): a murmur3-style
32-bit hash computed with integer tensor ops, turned into Gumbel noise; the token is
``argmax(filtered + gumbel)``, an exact draw from ``softmax(filtered)``. A row's text thus depends
only on its seed and its parameters -- not on the batch it shares, the device, graph capture or
what other rows do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pldr_llm.errors import PLDRError

FILTERED_LOGIT = -1e10  # the original's value for filtered-out logits
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and when it stops.

    ``temperature`` 0 (or ``top_k`` 1) is greedy; ``top_k`` 0 and ``top_p`` 1 turn the filters
    off. ``seed`` None draws a seed from torch's default CPU generator when the row is added.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop_at_eos: bool = True
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        """True when the arg-max is taken (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1

    def validate(self) -> None:
        """Raise a one-line :class:`PLDRError` for the first bad value."""
        validate_sampling(self.temperature, self.top_k, self.top_p)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise PLDRError(f"seed must be an integer or None, got {self.seed!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PLDRError(f"max_new_tokens must be an integer >= 0, got {n!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise PLDRError(f"stop_token_ids must be ids >= 0, got {t!r}")


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Reject bad sampling settings with one-line messages (temperature 0 means greedy)."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise PLDRError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise PLDRError(f"top_p must be in (0, 1], got {top_p} (1 disables nucleus sampling)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise PLDRError(f"top_k must be an integer >= 0, got {top_k!r} (0 disables top-k)")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th kept), others -1e10."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return torch.where(logits < kth, torch.full_like(logits, FILTERED_LOGIT), logits)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the tokens whose cumulative probability stays <= p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    keep = ((cumulative <= p).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
    threshold = sorted_logits.gather(-1, keep)
    return torch.where(logits < threshold, torch.full_like(logits, FILTERED_LOGIT), logits)


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Temperature, then top-p, then top-k, as the original stacks them."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    return logits


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for 32-bit ``x`` in int64 without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer (a bijection that mixes every bit)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_keys(seed: Tensor, step: Tensor) -> Tensor:
    """A 32-bit key per row from its seed (int64) and step index ([B] int64 each)."""
    key = _fmix32((seed & _MASK32) ^ _fmix32((seed >> 32) & _MASK32))
    return _fmix32(key ^ _fmix32((step & _MASK32) ^ 0x5BD1E995))


def gumbel_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """[B, vocab] float32 Gumbel(0, 1) noise, a pure function of (seed, step, vocab index)."""
    key = row_keys(seed, step)[:, None]
    index = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    h = _fmix32(key ^ _mul32(index + 1, 0x9E3779B1))
    h = _fmix32(h ^ key)
    # 24 bits -> u in (0, 1), exactly representable in float32
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def filter_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """:func:`filter_logits` per row: [B, V] float32 logits, [B] parameters (no host sync)."""
    vocab = logits.shape[-1]
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / safe_t[:, None].to(logits.dtype)
    sorted_logits = torch.sort(scaled, dim=-1, descending=True).values
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    keep_p = (cumulative <= top_p[:, None]).sum(dim=-1).clamp(min=1)
    keep_p = torch.where(top_p >= 1.0, torch.full_like(keep_p, vocab), keep_p)
    keep_k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    keep = torch.minimum(keep_p, keep_k)
    threshold = sorted_logits.gather(-1, (keep - 1)[:, None])
    return torch.where(scaled < threshold, torch.full_like(scaled, FILTERED_LOGIT), scaled)


SamplingMode = Literal["greedy", "plain", "filtered"]


def row_mode(params: SamplingParams, vocab: int) -> SamplingMode:
    """What one row needs: ``greedy`` (arg-max), ``plain`` (temperature + noise, the filters
    are the identity: top_p >= 1 and top_k 0 or >= vocab) or ``filtered`` (a sort)."""
    if params.greedy:
        return "greedy"
    if params.top_p >= 1.0 and (params.top_k == 0 or params.top_k >= vocab):
        return "plain"
    return "filtered"


def batch_mode(modes: Iterable[SamplingMode]) -> SamplingMode:
    """The cheapest :func:`sample_rows` mode that gives every row its own result: ``greedy``
    only when all rows are greedy, ``plain`` when none filters, else ``filtered``."""
    modes = set(modes)
    if not modes or modes == {"greedy"}:
        return "greedy"
    return "filtered" if "filtered" in modes else "plain"


def sample_rows(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    seed: Tensor,
    step: Tensor,
    all_greedy: bool = False,
    mode: SamplingMode | None = None,
) -> Tensor:
    """One id per row of [B, V] logits, each row with its own parameters and RNG stream.

    Greedy rows (temperature 0 or top_k 1) take the arg-max of the raw logits. ``mode`` (see
    :func:`batch_mode`; ``all_greedy`` is ``mode="greedy"``) lets the caller skip work it knows
    no row needs: ``greedy`` skips the sort and the noise, ``plain`` skips the sort. For a row
    whose filters keep every token, :func:`filter_rows` returns the scaled logits unchanged, so
    ``plain`` gives exactly the ids ``filtered`` gives (same scaling, same noise, same arg-max).
    """
    if mode is None:
        mode = "greedy" if all_greedy else "filtered"
    greedy_ids = logits.argmax(dim=-1)
    if mode == "greedy":
        return greedy_ids
    if mode == "plain":
        logits = logits.float()
        safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        filtered = logits / safe_t[:, None].to(logits.dtype)
    else:
        filtered = filter_rows(logits.float(), temperature, top_k, top_p)
    sampled = (filtered + gumbel_noise(seed, step, logits.shape[-1])).argmax(dim=-1)
    greedy = (temperature == 0) | (top_k == 1)
    return torch.where(greedy, greedy_ids, sampled)

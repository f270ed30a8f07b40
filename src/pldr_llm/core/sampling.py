"""Sampling: the original's filters, per-row parameters, and a counter-based RNG.

The filters stack as the original's ``generate_text`` does: temperature, then top-p (keep the
tokens whose cumulative probability stays <= p, at least one), then top-k (ties with the k-th
kept); filtered logits become -1e10. :func:`sample_rows` does the same per row with tensors
([B] temperature, top-k, top-p), so it runs inside a captured CUDA graph: one descending sort
serves both filters (keep = min(k or V, top-p count); threshold = sorted[keep - 1]).

Randomness is one uniform number per row and step, a pure function of (row seed, step index): a
murmur3-style 32-bit hash computed with integer tensor ops (:func:`uniform_draws`). The token is
the inverse of the cumulative distribution of ``softmax(filtered)`` at that number (the first
token whose cumulative probability exceeds it): an exact draw from the filtered distribution.
A row's text thus depends only on its seed and its parameters -- not on the batch it shares,
graph capture or what other rows do. One number per token, not one per vocabulary entry, keeps
the draw to a handful of kernels (a softmax, a cumulative sum and a search), which is what
sampling costs inside the decoding step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import PLDRError

FILTERED_LOGIT = -1e10  # the original's value for filtered-out logits
_MASK32 = 0xFFFFFFFF


#: Most top alternatives a row may ask for per token (OpenAI's limit for ``top_logprobs``).
MAX_LOGPROBS = 20
#: Most stop ids per row (held in the decoding loop's static buffers).
MAX_STOP_IDS = 16
#: OpenAI's ranges for ``presence_penalty`` / ``frequency_penalty`` and ``logit_bias`` values.
PENALTY_RANGE = 2.0
BIAS_RANGE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and when it stops.

    ``temperature`` 0 (or ``top_k`` 1) is greedy; ``top_k`` 0 and ``top_p`` 1 turn the filters
    off. ``seed`` None draws a seed from torch's default CPU generator when the row is added.

    Before the filters, the model's logits are processed (:mod:`~pldr_llm.core.processing`),
    in this order:

    * ``repetition_penalty`` (transformers' / CTRL's rule): the logit of every token seen so
      far (the prompt and the generated tokens) is divided by it when positive, multiplied when
      negative (1: off);
    * ``frequency_penalty``, ``presence_penalty`` (OpenAI's rule, over the *generated* tokens
      only): ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``;
    * ``logit_bias``: ``(token id, bias)`` pairs added to the logits (-100..100, as OpenAI);
    * ``min_new_tokens``: until that many tokens are generated, the row's stop ids (end-of-text
      when ``stop_at_eos``, and ``stop_token_ids``) are masked to -inf.

    ``logprobs`` n > 0 reports, with each token, the top-n alternatives; the token's own
    log-probability comes with them. Log-probabilities are of the processed distribution at
    temperature 1 (after penalties and bias, before temperature/top-k/top-p), as vLLM reports
    by default: what the model, with the request's penalties, thinks of each token.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop_at_eos: bool = True
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_new_tokens: int = 0
    logprobs: int = 0

    @property
    def greedy(self) -> bool:
        """True when the arg-max is taken (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def processed(self) -> bool:
        """True when the logits are processed before sampling (a penalty, a bias or a minimum
        length is set); rows without run a step that skips the processing."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
            or self.min_new_tokens > 0
        )

    def validate(self) -> None:
        """Raise a one-line :class:`PLDRError` for the first bad value: the one check of
        sampling settings that the CLI, :func:`pldr_llm.generate`, the engine and the server
        all run (token ids against the vocabulary are checked where the model is known)."""
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise PLDRError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise PLDRError(f"top_p must be in (0, 1], got {self.top_p!r} (1: off)")
        _check_count("top_k", self.top_k, " (0 disables top-k)")
        if self.seed is not None and not _is_int(self.seed):
            raise PLDRError(f"seed must be an integer or None, got {self.seed!r}")
        _check_count("max_new_tokens", self.max_new_tokens)
        if not isinstance(self.stop_at_eos, bool):
            raise PLDRError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")
        stops = _as_tuple("stop_token_ids", self.stop_token_ids)
        for t in stops:
            _check_count("stop_token_ids", t)
        if len(stops) > MAX_STOP_IDS:
            raise PLDRError(f"at most {MAX_STOP_IDS} stop_token_ids, got {len(stops)}")
        self._validate_processing()
        _check_count("logprobs", self.logprobs)
        if self.logprobs > MAX_LOGPROBS:
            raise PLDRError(f"logprobs must be at most {MAX_LOGPROBS}, got {self.logprobs}")

    def _validate_processing(self) -> None:
        rp = self.repetition_penalty
        if not _is_number(rp) or not math.isfinite(rp) or rp <= 0:
            raise PLDRError(f"repetition_penalty must be a finite number > 0 (1: off), got {rp!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -PENALTY_RANGE <= value <= PENALTY_RANGE:
                raise PLDRError(f"{name} must be in [-2, 2] (0: off), got {value!r}")
        seen: set[int] = set()
        for pair in _as_tuple("logit_bias", self.logit_bias):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise PLDRError(f"logit_bias must hold (token id, bias) pairs, got {pair!r}")
            token, bias = pair
            _check_count("logit_bias token id", token)
            if not _is_number(bias) or not -BIAS_RANGE <= bias <= BIAS_RANGE:
                raise PLDRError(f"logit_bias of token {token} must be in [-100, 100], got {bias!r}")
            if token in seen:
                raise PLDRError(f"logit_bias names token {token} twice")
            seen.add(token)
        _check_count("min_new_tokens", self.min_new_tokens)
        if self.min_new_tokens > self.max_new_tokens:
            raise PLDRError(
                f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens "
                f"({self.max_new_tokens})"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_count(name: str, value: object, hint: str = "") -> None:
    """``value`` must be an integer >= 0."""
    if not _is_int(value) or value < 0:  # type: ignore[operator]
        raise PLDRError(f"{name} must be an integer >= 0, got {value!r}{hint}")


def _as_tuple(name: str, value: object) -> tuple:
    if not isinstance(value, tuple):
        raise PLDRError(f"{name} must be a tuple, got {type(value).__name__}")
    return value


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


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A row seed for a row given none: from ``generator`` (a CPU one), else torch's default
    CPU generator."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


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


def uniform_draws(seed: Tensor, step: Tensor) -> Tensor:
    """Uniform numbers in (0, 1), float32, a pure function of (seed, step) (int64 tensors of
    one shape, or broadcastable): the draw of a row's ``step``-th token."""
    seed, step = torch.broadcast_tensors(seed, step)
    h = row_keys(seed.reshape(-1), step.reshape(-1)).view(seed.shape)
    # 24 bits -> u in (0, 1), exactly representable in float32
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def inverse_cdf(probs: Tensor, uniform: Tensor) -> Tensor:
    """One id per row of ``probs`` [B, V]: the first whose cumulative probability exceeds
    ``uniform`` [B] times the row's total (so unnormalized rows are fine, and a token of
    probability 0 is never drawn). -1 where rounding put the target at the very end."""
    cdf = probs.cumsum(dim=-1)
    target = uniform[:, None].to(cdf.dtype) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True)[:, 0]
    return torch.where(ids < probs.shape[-1], ids, -1)


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
    uniform: Tensor | None,
    mode: SamplingMode = "filtered",
) -> Tensor:
    """One id per row of [B, V] logits, each row with its own parameters and random number
    ``uniform`` [B] (:func:`uniform_draws` of its seed and step; unused, may be None, when
    ``mode`` is ``greedy``).

    Greedy rows (temperature 0 or top_k 1) take the arg-max of the raw logits. ``mode`` (see
    :func:`batch_mode`) lets the caller skip work it knows no row needs: ``greedy`` skips the
    draw, ``plain`` the sort. For a row whose filters keep every token, :func:`filter_rows`
    returns the scaled logits unchanged, so ``plain`` gives exactly the ids ``filtered`` gives
    (same scaling, same distribution, same draw).
    """
    greedy_ids = logits.argmax(dim=-1)
    if mode == "greedy":
        return greedy_ids
    if uniform is None:
        raise PLDRError(f"sampling mode {mode!r} needs each row's uniform number")
    if mode == "plain":
        logits = logits.float()
        safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        filtered = logits / safe_t[:, None].to(logits.dtype)
    else:
        filtered = filter_rows(logits.float(), temperature, top_k, top_p)
    sampled = inverse_cdf(torch.softmax(filtered, dim=-1), uniform)
    # Greedy rows, and the (2**-24-rare) draw that rounding put past the end: the arg-max.
    greedy = (temperature == 0) | (top_k == 1) | (sampled < 0)
    return torch.where(greedy, greedy_ids, sampled)

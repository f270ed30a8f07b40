"""The decoding engine the server drives: the one place that binds the server to the decoder.

The server uses :class:`DecodeEngine`, :class:`SamplingParams` and :func:`find_stop` of
:mod:`pldr_llm.generation` (the slot-based decoder: each slot an independent sequence with its own
KV slot, G-cache row, sampling parameters and seed). While that engine is not in
:mod:`pldr_llm.generation`, the small stand-ins below implement the same interface on top of the
model's own cached forward pass -- one batch-1 decoding step per active slot, with the arithmetic
of :func:`pldr_llm.generation.generate_details` (so a seeded row gives what ``pldr-llm generate
--seed`` gives). Nothing else in :mod:`pldr_llm.serve` imports the decoder directly; when the
engine lands this file shrinks to the import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pldr_llm.errors import PLDRError

try:  # the real engine (the decode branch)
    from pldr_llm.generation import (  # type: ignore[attr-defined]
        DecodeEngine,
        SamplingParams,
        find_stop,
    )

    HAVE_ENGINE = True
except ImportError:  # pragma: no cover - exercised until the engine is merged
    HAVE_ENGINE = False

if not HAVE_ENGINE:
    from pldr_llm.generation import filter_logits
    from pldr_llm.model.cache import GCacheEntry, PLDRCache, g_entries

    @dataclass(frozen=True)
    class SamplingParams:  # type: ignore[no-redef]
        """Per-row sampling settings; temperature 0 is greedy."""

        temperature: float = 1.0
        top_k: int = 0
        top_p: float = 1.0
        seed: int | None = None
        max_new_tokens: int = 64
        stop_at_eos: bool = True
        stop_token_ids: tuple[int, ...] = ()

        def validate(self) -> None:
            """A one-line :class:`PLDRError` for settings no decoder can honour."""
            t = self.temperature
            if not isinstance(t, (int, float)) or not (t >= 0.0) or t == float("inf"):
                raise PLDRError(f"temperature must be a finite number >= 0, got {t!r}")
            if not (0.0 < self.top_p <= 1.0):
                raise PLDRError(f"top_p must be in (0, 1], got {self.top_p!r}")
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
                raise PLDRError(f"top_k must be an integer >= 0, got {self.top_k!r}")
            if self.max_new_tokens < 0:
                raise PLDRError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    def find_stop(text: str, stop: Sequence[str]) -> int | None:  # type: ignore[no-redef]
        """Index in ``text`` of the earliest occurrence of any of ``stop`` (None: none)."""
        found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
        return min(found) if found else None

    @dataclass
    class StepOutput:
        """One decoding step: per active slot its new token, whether it finished, its logprob."""

        slots: list[int]
        token_ids: list[int]
        finished: list[bool]
        logprobs: list[float] | None = None

    @dataclass
    class _Row:
        prompt: Tensor
        params: SamplingParams
        generator: torch.Generator | None
        g: list[GCacheEntry] | None
        kv: PLDRCache | None = None
        generated: list[int] = field(default_factory=list)
        done: bool = False

    class DecodeEngine:  # type: ignore[no-redef]
        """Slot-based decoder (stand-in): ``add`` a prompt to a free slot, ``step`` all active
        slots once, ``release`` a slot when its request is over."""

        def __init__(
            self,
            model: Any,
            max_batch: int,
            max_len: int | None = None,
            *,
            cuda_graph: Any = None,
            compile: bool = False,
            steps_per_graph: int = 1,
            enable_kvcache: bool = True,
            enable_Gcache: bool = True,
            output_logprobs: bool = False,
        ) -> None:
            if max_batch < 1:
                raise PLDRError(f"max_batch must be at least 1, got {max_batch}")
            self.model = model.eval()
            self.max_batch = max_batch
            self.max_len = max_len or model.config.max_seq_len
            self.enable_kvcache = enable_kvcache
            self.enable_Gcache = enable_Gcache
            self.output_logprobs = output_logprobs
            self._rows: dict[int, _Row] = {}

        @property
        def free_slots(self) -> int:
            return self.max_batch - len(self._rows)

        @property
        def active_slots(self) -> list[int]:
            return sorted(s for s, r in self._rows.items() if not r.done)

        def add(self, prompt_ids: Sequence[int], params: SamplingParams, g_init: Any = None) -> int:
            params.validate()
            ids = [int(t) for t in prompt_ids] or [self.model.config.eos_id]
            if len(ids) + params.max_new_tokens > self.max_len:
                raise PLDRError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                    f"exceeds max_len={self.max_len}"
                )
            free = [s for s in range(self.max_batch) if s not in self._rows]
            if not free:
                raise PLDRError("no free slot")
            device = self.model.device
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=device).manual_seed(params.seed)
            g = None
            if g_init is not None:
                dtype = self.model.dtype
                g = [
                    GCacheEntry(
                        e.A_LM.to(device, dtype) if e.A_LM is not None else None,
                        e.G_LM.to(device, dtype),
                        e.A_P.to(device, dtype) if e.A_P is not None else None,
                    )
                    for e in g_entries(g_init)
                ]
            prompt = torch.tensor([ids], dtype=torch.long, device=device)
            self._rows[free[0]] = _Row(prompt, params, generator, g)
            return free[0]

        def add_many(
            self, prompts: Sequence[Sequence[int]], params: Any, g_init: Any = None
        ) -> list[int]:
            many = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
            return [self.add(p, q, g_init) for p, q in zip(prompts, many)]

        def _sample(self, row: _Row, logits: Tensor) -> int:
            p = row.params
            if p.temperature == 0 or p.top_k == 1:
                return int(logits.argmax(dim=-1))
            logits = logits.float()
            if p.temperature > 1.0:  # filter_logits scales only T < 1 (the original's range)
                logits = logits / p.temperature
            filtered = filter_logits(logits, min(p.temperature, 1.0), p.top_k, p.top_p)
            probs = torch.softmax(filtered, dim=-1)
            return int(torch.multinomial(probs, 1, generator=row.generator).squeeze(-1))

        @torch.inference_mode()
        def _step_row(self, row: _Row) -> tuple[int, float]:
            # The loop body of generate_details, for one row.
            if row.kv is None:
                seq = row.prompt
                if row.generated and not self.enable_kvcache:
                    extra = torch.tensor([row.generated], dtype=torch.long, device=seq.device)
                    seq = torch.cat((seq, extra), dim=1)
                cache = PLDRCache(g=row.g) if row.g is not None else None
                out = self.model(seq, cache=cache, logits_to_keep=1)
            else:
                last = torch.tensor(
                    [[row.generated[-1]]], dtype=torch.long, device=row.prompt.device
                )
                out = self.model(last, cache=row.kv.with_g(row.g), logits_to_keep=1)
            logits = out.logits[:, -1, :]
            if self.enable_kvcache:
                row.kv = out.cache
            if self.enable_Gcache:
                row.g = out.cache.g
            token = self._sample(row, logits)
            logprob = 0.0
            if self.output_logprobs:
                logprob = float(torch.log_softmax(logits[0].float(), dim=-1)[token])
            return token, logprob

        def step(self) -> StepOutput:
            out = StepOutput([], [], [], [] if self.output_logprobs else None)
            eos = self.model.config.eos_id
            for slot in self.active_slots:
                row = self._rows[slot]
                token, logprob = self._step_row(row)
                row.generated.append(token)
                p = row.params
                row.done = (
                    (p.stop_at_eos and token == eos)
                    or token in p.stop_token_ids
                    or len(row.generated) >= p.max_new_tokens
                )
                out.slots.append(slot)
                out.token_ids.append(token)
                out.finished.append(row.done)
                if out.logprobs is not None:
                    out.logprobs.append(logprob)
            return out

        def release(self, slot: int) -> None:
            self._rows.pop(slot, None)


__all__ = ["HAVE_ENGINE", "DecodeEngine", "SamplingParams", "find_stop"]

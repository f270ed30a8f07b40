"""The reference and inspection side of the decoding loop, apart from the fast step.

* :class:`FullRerun`: the step without the KV-cache (the original's slow modes): every running
  row's whole sequence runs through :meth:`PLDRModel.forward` again, alone, with the G-cache of
  its first pass (G on) or a G_init / nothing (G off); the logits then go through the same
  sampling stage as the fast step's (:meth:`~pldr_llm.core.decode_step.KVStep.advance_rows`).
* :class:`DeductiveRecorder`: ``record_deductive``, the deductive outputs (A, A_LM, A_P, G_LM per
  layer) of every prompt pass and step, for :func:`pldr_llm.deductive.cache_mode_runs`.

Both read the host every step (the rows that run, their counts): they are for comparison and
inspection, never captured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .cache import GCacheEntry, PLDRCache
from .decode_buffers import DecodeBuffers
from .model import PLDRModel
from .plga import Deductive


@dataclass
class DeductiveRecord:
    """The deductive outputs of one model pass of the decoding loop (``record_deductive``).

    ``stage`` is ``"prefill"`` (the prompt pass of :meth:`~DecodeEngine.add_many`) or ``"step"``
    (one decoding step: each slot's pass over the token that step reports). ``outputs[slot]``
    holds one :class:`~pldr_llm.core.plga.Deductive` per layer, batch dimension 1, as
    ``model.forward(..., output_deductive=True)`` gives them for that pass: A, A_LM, A_P, G_LM
    (a tensor the pass does not compute, e.g. A when the G-cache skips the metric learner without
    a KV-cache, is None; attention scores are left out).
    """

    stage: Literal["prefill", "step"]
    outputs: dict[int, list[Deductive]]


def batch_row(t: Tensor | None, i: int) -> Tensor | None:
    """Row ``i`` of a batched tensor ([1, ...] as is: it broadcasts over the batch)."""
    if t is None:
        return None
    return t if t.shape[0] == 1 else t[i : i + 1]


def _kept(t: Tensor, row: int, copy: bool = True) -> Tensor:
    """Row ``row`` of a tensor every pass has (G_LM), copied unless ``copy`` is False."""
    picked = t if t.shape[0] == 1 else t[row : row + 1]
    return picked.clone() if copy else picked


class DeductiveRecorder:
    """Keeps the deductive outputs of every pass (:attr:`records`, oldest first; the caller
    reads and clears the list). ``running()`` gives the slots whose tokens are not all
    reported yet."""

    def __init__(self, buffers: DecodeBuffers, running: Callable[[], set[int]]) -> None:
        self.buffers = buffers
        self.running = running
        self.records: list[DeductiveRecord] = []
        # Per slot, the generated count of its last recorded step (a finished row that stays in
        # a block of steps is recorded once).
        self._recorded_n: dict[int, int] = {}

    def slots_to_record(self) -> list[int]:
        """Slots this step reports: running, not recorded at this count."""
        counts = self.buffers.n_generated.tolist()
        return [s for s in sorted(self.running()) if self._recorded_n.get(s) != counts[s]]

    def record_step(self, deductive: Sequence[Deductive]) -> None:
        """A batched step's outputs (row = slot), for the slots it reports."""
        self.record("step", {s: (deductive, s) for s in self.slots_to_record()})

    def record(
        self,
        stage: Literal["prefill", "step"],
        rows: Mapping[int, tuple[Sequence[Deductive], int]],
    ) -> None:
        """Keep, for each slot, batch row ``row`` of the per-layer outputs of its pass
        (``rows[slot] = (deductive, row)``); copies, since the static caches the layers report
        from are rewritten later."""

        def keep(t: Tensor | None, row: int) -> Tensor | None:
            picked = batch_row(t, row)
            return picked.clone() if picked is not None else None

        outputs = {}
        for slot, (deductive, row) in rows.items():
            outputs[slot] = [
                Deductive(keep(d.A, row), keep(d.A_LM, row), keep(d.A_P, row), _kept(d.G_LM, row))
                for d in deductive
            ]
        if stage == "prefill":
            for slot in rows:
                self._recorded_n.pop(slot, None)
        else:
            counts = self.buffers.n_generated.tolist()
            for slot in rows:
                self._recorded_n[slot] = counts[slot]
        self.records.append(DeductiveRecord(stage, outputs))


class FullRerun:
    """The step without the KV-cache: each running row's prompt and generated ids run again.

    ``advance_rows(logits)`` is the sampling stage the logits [B, V] go to."""

    def __init__(
        self,
        model: PLDRModel,
        buffers: DecodeBuffers,
        enable_Gcache: bool,
        recorder: DeductiveRecorder | None,
    ) -> None:
        self.model = model
        self.buffers = buffers
        self.enable_Gcache = enable_Gcache
        self.recorder = recorder
        # Per slot, its prompt (host ids) and its G-cache (or None).
        self._prompts: dict[int, list[int]] = {}
        self._slot_g: dict[int, list[GCacheEntry] | None] = {}

    def keep_rows(
        self,
        slots: Sequence[int],
        rows: Sequence[list[int]],
        prompt_g: Sequence[GCacheEntry],
        g_init: list[GCacheEntry] | None,
    ) -> None:
        """After the prompt pass: each slot's prompt and the G-cache its later passes use (G on:
        the first pass's G_LM; G off: G_init or nothing)."""
        recording = self.recorder is not None
        for i, (slot, row) in enumerate(zip(slots, rows)):
            self._prompts[slot] = row
            self._slot_g[slot] = (
                [
                    GCacheEntry(
                        batch_row(e.A_LM, i) if recording else None,
                        _kept(e.G_LM, i, copy=False),
                        batch_row(e.A_P, i) if recording else None,
                    )
                    for e in prompt_g
                ]
                if self.enable_Gcache
                else g_init
            )

    def release(self, slot: int) -> None:
        self._prompts.pop(slot, None)
        self._slot_g.pop(slot, None)

    def logits(self) -> Tensor:
        """Every running row's next-token logits [B, V] float32 (zeros for other rows)."""
        model, b = self.model, self.buffers
        device = b.ids.device
        run = b.running().tolist()
        counts = b.n_generated.tolist()
        logits = torch.zeros(
            len(run), model.config.input_vocab_size, dtype=torch.float32, device=device
        )
        recorder = self.recorder
        # Recording: a finished row's last pass runs too (its token is reported by this step).
        record = recorder.slots_to_record() if recorder is not None else []
        recorded: dict[int, tuple[Sequence[Deductive], int]] = {}
        for slot, running in enumerate(run):
            if not running and slot not in record:
                continue
            prompt = torch.tensor(self._prompts[slot], dtype=torch.long, device=device)
            sequence = torch.cat((prompt, b.history[slot, : counts[slot]]))[None]
            g = self._slot_g.get(slot)
            out = model(
                sequence,
                cache=PLDRCache(g=g) if g is not None else None,
                logits_to_keep=1,
                output_deductive=recorder is not None,
            )
            logits[slot] = out.logits[0, -1].float()
            if slot in record:
                recorded[slot] = (out.deductive or [], 0)
        if recorder is not None:
            recorder.record("step", recorded)
        return logits

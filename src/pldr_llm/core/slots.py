"""The host side of the decoding loop's slots: which are free, which run, and what they need.

:class:`SlotTable` keeps, per slot and on the host only, what choosing a step variant needs
(sampling mode, teacher forcing, logit processing, top log-probabilities) and how many tokens
each slot has reported, so a step picks its variant and places its reports without reading the
device.
"""

from __future__ import annotations

from collections.abc import Sequence

from .decode_step import StepVariant
from .sampling import SamplingMode, SamplingParams, batch_mode


class SlotTable:
    """Free and running slots of ``batch`` rows, and each running slot's needs."""

    def __init__(self, batch: int) -> None:
        self.free = list(range(batch))
        self.running: set[int] = set()  # active slots whose last token is not reported yet
        self.modes: dict[int, SamplingMode] = {}
        self.forced: set[int] = set()
        self.processed: set[int] = set()
        self.top_n: dict[int, int] = {}  # top alternatives asked, per slot that asks
        self.reported: dict[int, int] = {}  # tokens reported so far: the next one's position

    def take(self, n: int) -> list[int]:
        """``n`` free slots, lowest first."""
        return [self.free.pop(0) for _ in range(n)]

    def give_back(self, slots: Sequence[int]) -> None:
        """Slots whose start failed: free again, running nothing, needing nothing (some may
        have started: a prefill in groups can fail after the first)."""
        for slot in slots:
            self._forget(slot)
        self.free = sorted(set(self.free) | set(slots))

    def start(self, slot: int, mode: SamplingMode, params: SamplingParams, forced: bool) -> None:
        """``slot`` runs a row of ``params`` (sampled as ``mode``; teacher-forced or not)."""
        self.running.add(slot)
        self.modes[slot] = mode
        self.reported[slot] = 0
        if forced:
            self.forced.add(slot)
        if params.processed:
            self.processed.add(slot)
        if params.logprobs:
            self.top_n[slot] = params.logprobs

    def release(self, slot: int) -> None:
        """``slot`` is free again."""
        self._forget(slot)
        self.free.append(slot)
        self.free.sort()

    def _forget(self, slot: int) -> None:
        """``slot`` runs nothing and needs nothing."""
        self.running.discard(slot)
        for table in (self.modes, self.top_n, self.reported):
            table.pop(slot, None)
        self.forced.discard(slot)
        self.processed.discard(slot)

    def variant(self) -> StepVariant:
        """The step variant the running slots need."""
        running = self.running
        return StepVariant(
            batch_mode(self.modes[slot] for slot in running),
            bool(self.forced & running),
            bool(self.processed & running),
            any(self.top_n.get(slot, 0) for slot in running),
        )

    def count_reported(self, slot: int, n: int = 1) -> int | None:
        """The history position of ``slot``'s next reported token, counted with the ``n - 1``
        after it as reported now (None: the slot was released meanwhile)."""
        position = self.reported.get(slot)
        if position is not None:
            self.reported[slot] = position + n
        return position

"""What the decoding loop reports to the host: :class:`StepOutput` (one step) and
:class:`BlockOutput` (a block of steps, per slot), read from a step's (or a block of steps')
report buffer in one host read, with log-probabilities and top alternatives where asked."""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .processing import LogprobHistory
from .slots import SlotTable


@dataclass
class StepOutput:
    """What one :meth:`DecodeEngine.step` produced: one token per slot that was active.

    ``finished[i]`` is True when ``token_ids[i]`` is the slot's last token (end-of-text, a stop id,
    or max_new_tokens reached). ``logprobs`` (with ``output_logprobs``, or when a slot asks for
    ``SamplingParams.logprobs``) is the log-probability of each token under the model's
    processed distribution (penalties and bias applied) at temperature 1, before the filters;
    ``top_logprobs[i]`` (when a slot asks) its top ``logprobs`` alternatives as (id, logprob),
    best first (empty for slots that do not ask; their ``logprobs`` NaN on an engine without
    ``output_logprobs``).
    """

    slots: list[int]
    token_ids: list[int]
    finished: list[bool]
    logprobs: list[float] | None = None
    logits: Tensor | None = None  # [n, V] raw float32 logits of each token (``keep_logits``)
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class BlockOutput:
    """What a block of steps produced, per slot (the slots active when it started, in slot
    order): ``token_ids[i]`` are slot ``slots[i]``'s tokens in step order, up to its last
    (``finished[i]``: the last of them ends the slot), with their ``logprobs`` and
    ``top_logprobs`` as in :class:`StepOutput` (per token; ``top_logprobs`` None when no slot
    asks). :meth:`steps` gives the same as one :class:`StepOutput` per step."""

    slots: list[int]
    token_ids: list[list[int]]
    finished: list[bool]
    logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None

    def ended(self) -> set[int]:
        """The slots whose last token is in the block."""
        return {slot for slot, fin in zip(self.slots, self.finished) if fin}

    def steps(self) -> list[StepOutput]:
        """One :class:`StepOutput` per step, each with the slots not finished before it."""
        counts = [len(ids) for ids in self.token_ids]
        logprobs, tops = self.logprobs, self.top_logprobs
        outputs = []
        for i in range(max(counts, default=0)):
            live = [j for j, n in enumerate(counts) if n > i]
            out = StepOutput(
                [self.slots[j] for j in live],
                [self.token_ids[j][i] for j in live],
                [self.finished[j] and counts[j] == i + 1 for j in live],
                [logprobs[j][i] for j in live] if logprobs is not None else None,
                top_logprobs=[tops[j][i] for j in live] if tops is not None else None,
            )
            outputs.append(out)
        return outputs


#: Blocks of at most this many tokens are converted in Python (the fewest tensor operations),
#: larger ones with tensor operations (the fewest Python objects).
SMALL_BLOCK = 128


def _host_rows(host: Tensor, with_logprobs: bool) -> tuple[list, list | None, list, list]:
    """Per slot of a [k, 3, n] block on the host: its k tokens, its k log-probabilities (with
    ``with_logprobs``), how many of them it made (up to its first finished one: the device
    stopped advancing it there, or all k) and whether it finished."""
    k, n = host.shape[0], host.shape[2]
    if k * n <= SMALL_BLOCK:
        rows = host.permute(2, 1, 0).tolist()
        tokens = [[int(t) for t in row[0]] for row in rows]
        ended = [1.0 in row[1] for row in rows]
        counts = [row[1].index(1.0) + 1 if e else k for row, e in zip(rows, ended)]
        return tokens, [row[2] for row in rows] if with_logprobs else None, counts, ended
    finished = host[:, 1] != 0
    any_finished = finished.any(0)
    counts = finished.int().argmax(0).add(1).where(any_finished, k).tolist()
    logprobs = host[:, 2].T.tolist() if with_logprobs else None
    return host[:, 0].T.long().tolist(), logprobs, counts, any_finished.tolist()


def read_block(
    buffer: Tensor,
    slots: list[int],
    table: SlotTable,
    history: LogprobHistory | None,
    with_logprobs: bool,
) -> BlockOutput:
    """The :class:`BlockOutput` of ``slots`` from a block's report buffer ([steps, 3, batch]:
    token, finished, logprob) in one host read. Counts each slot's reported tokens (their
    positions in the history) and, where a slot asks for top alternatives, reads them and their
    log-probabilities from the history (NaN for the others where the engine keeps no
    ``output_logprobs``)."""
    if not slots:
        return BlockOutput([], [], [], [] if with_logprobs else None)
    index = torch.frombuffer(array.array("q", slots), dtype=torch.long).to(buffer.device)
    host = buffer.index_select(2, index).cpu()  # [k, 3, n]: the one host sync
    k = host.shape[0]
    tokens, logprobs, counts, ended = _host_rows(host, with_logprobs)

    def cut(rows: list[list]) -> list[list]:
        return [row if n == k else row[:n] for row, n in zip(rows, counts)]

    block = BlockOutput(slots, cut(tokens), ended, cut(logprobs) if logprobs is not None else None)
    asked: list[tuple[int, int, int]] = []  # index in slots, first position, top n
    for j, (slot, n) in enumerate(zip(slots, counts)):
        position = table.count_reported(slot, n)  # None: released while its block ran
        top_n = table.top_n.get(slot, 0)
        if position is not None and top_n:
            asked.append((j, position, top_n))
    if asked and history is not None:
        _attach_top(block, counts, asked, history)
    return block


def _attach_top(
    block: BlockOutput,
    counts: list[int],
    asked: list[tuple[int, int, int]],
    history: LogprobHistory,
) -> None:
    """Fill the log-probabilities and top alternatives of the ``asked`` slots (index, first
    position, top n) from the history ([] for the other slots; NaN log-probabilities where the
    block has none)."""
    if block.logprobs is None:
        block.logprobs = [[math.nan] * n for n in counts]
    block.top_logprobs = [[[] for _ in range(n)] for n in counts]
    rows: list[int] = []
    positions: list[int] = []
    top_n: list[int] = []
    for j, position, n_top in asked:
        n = counts[j]
        rows += [block.slots[j]] * n
        positions += range(position, position + n)
        top_n += [n_top] * n
    chosen, top = history.read(rows, positions, top_n)
    start = 0
    for j, _, _ in asked:
        end = start + counts[j]
        block.logprobs[j] = chosen[start:end]
        block.top_logprobs[j] = top[start:end]
        start = end

"""What the decoding loop reports to the host: :class:`StepOutput`, built from a step's (or a
block of steps') report buffer, with log-probabilities and top alternatives where asked."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def block_outputs(
    reports: list[list[list[float]]], slots: list[int], with_logprobs: bool
) -> tuple[list[StepOutput], set[int]]:
    """The outputs of a block's host-read reports ([steps][token, finished, logprob][slot]):
    each step's output holds the slots not finished before it. Also returns the slots that
    finished in the block."""
    outputs = []
    live = list(range(len(slots)))  # positions in `slots` not finished yet
    for tokens, finished, logprobs in reports:
        if not live:
            break
        out = StepOutput(
            [slots[j] for j in live],
            [int(tokens[j]) for j in live],
            [bool(finished[j]) for j in live],
            [logprobs[j] for j in live] if with_logprobs else None,
        )
        outputs.append(out)
        live = [j for j, fin in zip(live, out.finished) if not fin]
    return outputs, {slots[j] for j in set(range(len(slots))) - set(live)}


def attach_logprobs(
    outputs: list[StepOutput], table: SlotTable, history: LogprobHistory | None
) -> None:
    """Count each slot's reported tokens (their positions in the history) and, when a slot
    asks for top alternatives, fill ``top_logprobs`` and ``logprobs`` from the history (one
    read; NaN and [] for slots that asked for nothing, where the engine keeps no
    ``output_logprobs``)."""
    where: list[tuple[StepOutput, int, int, int]] = []  # output, index, slot, position
    for out in outputs:
        for i, slot in enumerate(out.slots):
            position = table.count_reported(slot)
            if position is not None:  # None: released while its block ran
                where.append((out, i, slot, position))
    top_n = table.top_n
    asked = [w for w in where if top_n.get(w[2], 0)]
    if not asked or history is None:
        return
    for out in outputs:
        out.top_logprobs = [[] for _ in out.slots]
        if out.logprobs is None:
            out.logprobs = [math.nan] * len(out.slots)
    chosen, top = history.read(
        [w[2] for w in asked], [w[3] for w in asked], [top_n[w[2]] for w in asked]
    )
    for (out, i, _, _), value, alternatives in zip(asked, chosen, top):
        assert out.logprobs is not None and out.top_logprobs is not None
        out.logprobs[i] = value
        out.top_logprobs[i] = alternatives

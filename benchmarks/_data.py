"""Synthetic training data shared by the benchmarks: a fixed random first-order Markov chain.

Every id has ``branching`` possible successors, so a model's loss can fall from ln(vocab) towards
ln(branching); batches are a function of the seed and the step only, so any process count or
framework (PLDR-LLM, the original, a transformers Llama) sees the same batches.
"""

from __future__ import annotations

import torch


def markov_batches(
    steps: int,
    batch: int,
    length: int,
    vocab: int,
    *,
    active: int = 2048,
    branching: int = 4,
    seed: int = 7,
) -> torch.Tensor:
    """[steps, batch, length + 1] int64 ids on the CPU (no id is 0, the padding id)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    active = min(active, vocab - 1)
    successors = torch.randint(1, active + 1, (active + 1, branching), generator=generator)
    rows = steps * batch
    ids = torch.empty(rows, length + 1, dtype=torch.long)
    ids[:, 0] = torch.randint(1, active + 1, (rows,), generator=generator)
    choice = torch.randint(0, branching, (rows, length + 1), generator=generator)
    for t in range(1, length + 1):
        ids[:, t] = successors[ids[:, t - 1], choice[:, t]]
    return ids.view(steps, batch, length + 1)

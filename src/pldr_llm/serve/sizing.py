"""The server's default ``--max-batch``: sized to the device and the model (issue #25).

On a GPU, the slots of the decoding engine are limited by memory: each holds a static KV-cache
row, a G-cache row and per-row sampling buffers (:func:`bytes_per_sequence`). Half of the free
memory goes to them (the rest is for the prefill's activations, the captured step graphs, the
engines of other cache modes and the allocator's slack), up to :data:`GPU_MAX_BATCH`: past it the
step is host-bound (an H200 at 256 rows of the 110M model: ~4.4 ms a step, of which ~0.5 ms reads
the weights and the cache), so more rows add latency, not throughput. On the CPU a step's time
grows with its rows; 8 rows a core (16 on 2 cores: the old fixed default) keeps a step short.

No torch import here: the caller passes the free memory (``torch.cuda.mem_get_info``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GPU_MAX_BATCH = 256
GPU_MEMORY_SHARE = 0.5
CPU_ROWS_PER_CORE = 8
CPU_MAX_BATCH = 16


def bytes_per_sequence(config: Any, element_bytes: int) -> int:
    """Device bytes one engine slot of a model with ``config`` takes (``element_bytes``: the
    cache dtype's size): keys and values of every layer over the context (rounded to 8 slots as
    the engine does), the G-cache's square matrices (A, G_LM, A_P and the running metric), and
    the sampling buffers of one row (float32 logits and probabilities, a sort's values and
    int64 indices, the row's history)."""
    layers, heads = int(config.num_layers), int(config.num_heads)
    depth = int(config.d_model) // heads
    slots = -(-int(config.max_seq_len) // 8) * 8
    kv = 2 * layers * heads * slots * depth * element_bytes
    g_cache = 4 * layers * heads * depth * depth * element_bytes
    sampling = int(config.input_vocab_size) * (4 + 4 + 4 + 8) + slots * (8 + element_bytes)
    return kv + g_cache + sampling


@dataclass(frozen=True)
class BatchSizing:
    """A default batch and why: printed when the server starts."""

    max_batch: int
    reason: str


def default_max_batch(
    config: Any,
    device_type: str,
    element_bytes: int,
    free_bytes: int | None = None,
    cpu_count: int | None = None,
) -> BatchSizing:
    """The ``--max-batch`` a server of ``config`` on ``device_type`` gets by default: on
    ``cuda``, from ``free_bytes`` of free device memory; elsewhere from ``cpu_count`` cores."""
    if device_type == "cuda":
        if free_bytes is None:
            raise ValueError("free_bytes is needed on cuda")
        per_sequence = bytes_per_sequence(config, element_bytes)
        fits = int(free_bytes * GPU_MEMORY_SHARE) // per_sequence
        batch = max(1, min(GPU_MAX_BATCH, fits))
        why = (
            f"{free_bytes / 2**30:.1f} GiB free, {per_sequence / 2**20:.1f} MiB per sequence, "
            f"{GPU_MEMORY_SHARE:.0%} of it for slots: {fits}, capped at {GPU_MAX_BATCH}"
        )
        return BatchSizing(batch, why)
    cores = max(1, cpu_count or 1)
    batch = max(1, min(CPU_MAX_BATCH, CPU_ROWS_PER_CORE * cores))
    return BatchSizing(batch, f"{cores} CPU core(s), {CPU_ROWS_PER_CORE} rows a core, at most 16")


def device_max_batch(model: Any) -> BatchSizing:
    """:func:`default_max_batch` for a loaded model on its device."""
    import os

    import torch

    device = model.device
    element = torch.empty((), dtype=model.dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return default_max_batch(model.config, "cuda", element, free_bytes=free)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return default_max_batch(model.config, device.type, element, cpu_count=cores)

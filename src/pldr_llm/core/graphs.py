"""CUDA-graph capture, torch.compile and the attention-kernel choice, shared by the decoding loop
(:mod:`pldr_llm.core.engine`) and the captured prefill (:mod:`pldr_llm.generation.captured`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch


def sdpa_backends() -> contextlib.AbstractContextManager[Any]:
    """Attention kernels without cuDNN, whose per-shape setup made every new length slow in bf16.

    Flash and memory-efficient attention (and the math fallback) need no per-shape planning.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        )
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - older torch
        return contextlib.nullcontext()


def maybe_compile(fn: Callable, compile: bool | dict[str, Any]) -> Callable:
    """``fn`` as is, or through torch.compile (``compile`` may be a dict of its options)."""
    if not compile:
        return fn
    options = dict(compile) if isinstance(compile, dict) else {}
    options.setdefault("dynamic", False)
    if "mode" not in options:
        # Inductor's coordinate-descent tuning of its reduction kernels: +10% tokens/s for
        # batch-1 fp32 decoding on an H200 (BENCHMARKS.md).
        options.setdefault("options", {"coordinate_descent_tuning": True})
    return torch.compile(fn, **options)


def capture_graph(
    fn: Callable[[], Any], warmup: int = 3, pool: Any = None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` up on a side stream (compiles, picks kernels), then capture it in a graph;
    returns the graph and the captured call's outputs (static tensors each replay rewrites).
    ``pool`` (``torch.cuda.graph_pool_handle()``) shares one memory pool between graphs that
    never run at the same time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out

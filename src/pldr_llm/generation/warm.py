"""Load the decoding loop's GPU code while the weights are read.

A fresh process pays, on its first decoding step on CUDA, for what every later step gets for
free: the CUDA context, cuBLAS and the kernels of each library (loaded on first use), and
Triton's first kernel (which hashes Triton's own install, ~0.4 s, before it looks in its
cache). None of it depends on the weights, only on the model's shapes and dtype, so
:func:`warm_up_in_background` runs one short decode of a model of the same configuration
(random values, built on the device) in a background thread, and the caller reads the weights
meanwhile (most of that time is file reads and copies, which leave the interpreter lock free).

The thread runs no CUDA graph capture (a capture forbids other threads' device calls): the
real model's graphs are captured by the first generation, which then finds every kernel loaded.

On a fresh machine most of the wait is Triton compiling the fused step's kernels (~0.5 s each,
one after another at their first launch). So on CUDA the thread first runs one step of the
decode inside :func:`pldr_llm.core.fused.compile_only`: its kernels compile side by side on a
small thread pool and none is launched; the decode after it then only loads them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from pldr_llm.core.config import PLDRConfig
from pldr_llm.core.errors import first_line
from pldr_llm.core.sampling import SamplingParams

if TYPE_CHECKING:
    from pldr_llm.core.engine_cache import EngineSpec
    from pldr_llm.core.fused import KernelCompiles
    from pldr_llm.core.model import PLDRModel


def _stand_in_model(config: PLDRConfig, dtype: torch.dtype, device: torch.device) -> PLDRModel:
    """A model of ``config`` on ``device`` in ``dtype`` whose values nobody reads.

    Built on the device itself, not on "meta": the meta kernel of ``normal_`` (the embedding's
    initializer) imports torch._dynamo, which takes seconds and holds the interpreter lock and
    the import lock the whole time, stalling the weights' loading in the main thread. The
    initialization draws on the device's default generator, which no sampling reads (rows draw
    from their own seeds). The rotary tables are computed on the CPU on purpose (rope.py), so
    the final ``to`` moves them."""
    from pldr_llm.core.model import PLDRModel

    with torch.device(device):
        model = PLDRModel(config)
    return model.to(device=device, dtype=dtype).eval()


def _decode_once(
    config: PLDRConfig,
    dtype: torch.dtype,
    device: torch.device,
    prompt_lengths: Sequence[int],
    length: int,
    sampling: SamplingParams | None = None,
) -> None:
    from pldr_llm.core.engine_cache import build_engine
    from pldr_llm.core.generate import engine_spec

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # per thread; "cuda" alone is the current device already
    triton_loading = _load_triton_in_background() if device.type == "cuda" else None
    with torch.no_grad():
        model = _stand_in_model(config, dtype, device)
        # The engine generate will use (its rows and positions, as on CUDA), and a prefill of
        # the same shape: prompts of different lengths take the masked path (left padding),
        # whose kernels differ -- loading them in the first real prefill cost ~0.08 s at 64
        # prompts. The uncaptured loop runs the captured loop's step (fused where it can be).
        spec = replace(
            engine_spec(model, len(prompt_lengths), length, cuda_graph=True), cuda_graph=False
        )
        assert spec.span is not None
        prompts = [[config.eos_id] * max(1, min(n, spec.span - 3)) for n in prompt_lengths]
        # The generation's own filters (greedy and top-p load different kernels); a fixed seed,
        # so that the thread draws nothing from the CPU generator the main thread uses.
        params = replace(
            sampling or SamplingParams(top_k=1), seed=0, max_new_tokens=3, stop_at_eos=False
        )
        try:
            _compile_step_kernels(model, spec, prompts, params, triton_loading)
        except Exception:  # noqa: BLE001 - an optimization only: the decode compiles them
            pass
        engine = build_engine(model, spec)
        engine.add_many(prompts, [params] * len(prompts))
        engine.advance(2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _compile_step_kernels(
    model: PLDRModel,
    spec: EngineSpec,
    prompts: list[list[int]],
    params: SamplingParams,
    triton_loading: threading.Thread | None = None,
) -> KernelCompiles | None:
    """Compile the Triton kernels of one fused decoding step of an engine of ``spec``, in
    parallel and launching none; returns what was compiled (None: the engine's step is not
    fused, nothing to compile).

    Its own engine, so that the decode after it starts from a clean state. Memory-safe without
    the kernels: the prefill runs no fused kernel; in the step, the unlaunched kernels leave
    their outputs uninitialized (``torch.empty``) and the engine's buffers as they were, and
    what runs on those outputs is dense arithmetic (cuBLAS projections, the logits) and, when
    sampling, sample_rows, whose indices are clamped or come from searchsorted/topk (in range
    whatever the logits, NaN included); the ids, counters and caches that index memory are
    the prefill's, as the bookkeeping kernel that would advance them is not launched either;
    nothing is read back to the host."""
    from pldr_llm.core import fused
    from pldr_llm.core.engine_cache import build_engine
    from pldr_llm.core.engine_options import choose_fused

    # The engine's own choice (CUDA, Triton, a model the kernels support, not torch.compile).
    if not choose_fused(model, spec.fused, spec.compile, spec.kv, spec.g, spec.record_deductive):
        return None
    engine = build_engine(model, spec)
    engine.add_many(prompts, [params] * len(prompts))
    if triton_loading is not None:
        # Triton's hash of its own install (~0.4 s) and its driver object, made once: without
        # them, each compile thread would start making its own.
        triton_loading.join()
    device = model.device
    index = torch.cuda.current_device() if device.type == "cuda" else None
    # ~9 distinct kernels a step: one thread each, as many as the cores allow.
    workers = min(9, os.cpu_count() or 1)
    with (
        ThreadPoolExecutor(
            workers, "pldr-llm-compile", initializer=_use_device, initargs=(index,)
        ) as pool,
        fused.compile_only(pool) as compiles,
    ):
        engine.advance(1)
    return compiles


def _use_device(index: int | None) -> None:
    """A compile thread's CUDA device (per thread): Triton compiles for, and caches the kernel
    under, the current device, which must be the warm-up's."""
    if index is not None:
        torch.cuda.set_device(index)


def _load_triton_in_background() -> threading.Thread:
    """Import Triton, compute its cache key of its own install (a hash of its ~0.5 GB library,
    the first thing its first kernel launch does) and make its CUDA driver object (which builds
    Triton's C helper module on a fresh machine) in a thread of its own, beside the CUDA start
    and the prefill below: the hashing, file reads and C compile leave the interpreter lock
    free. The results are kept by Python and Triton for the first fused kernel; where Triton or
    a function is missing, nothing happens. Returns the thread (started): the compile threads
    wait for it, as Triton makes neither of the two under a lock (each thread would make its
    own)."""

    def run() -> None:
        try:
            from triton.runtime.cache import triton_key  # where Triton 3.x keeps it

            triton_key()
        except Exception:  # noqa: BLE001 - an optimization only; the first launch does it
            pass
        try:
            from triton.runtime import driver

            _ = driver.active  # made on first use, by the first compile or launch otherwise
        except Exception:  # noqa: BLE001 - as above
            pass

    thread = threading.Thread(target=run, name="pldr-llm-triton", daemon=True)
    thread.start()
    return thread


class WarmUp(threading.Thread):
    """The warm-up's daemon thread; after ``join()``, ``error`` is the one-line reason it
    failed (None when it ran through). A failure only means the first generation loads the
    code itself, so the caller reports it rather than stopping."""

    def __init__(self, work: Callable[[], None]) -> None:
        super().__init__(name="pldr-llm-warm-up", daemon=True)
        self._work = work
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._work()
        except Exception as exc:  # noqa: BLE001 - an optimization only: generation loads it anyway
            self.error = first_line(exc)


def warm_up_in_background(
    config: PLDRConfig,
    dtype: torch.dtype | None,
    device: torch.device,
    prompt_lengths: Sequence[int] = (1,),
    length: int = 64,
    sampling: SamplingParams | None = None,
) -> WarmUp | None:
    """Start loading, in a daemon thread, the GPU code that decoding prompts of
    ``prompt_lengths`` tokens (one batch) up to ``length`` tokens with a model of ``config`` in
    ``dtype`` on ``device``, sampled as ``sampling`` says (its filters; default greedy), will
    use; returns the thread (``join()`` it before generating, then read its ``error``), or None
    where there is nothing to load (not CUDA)."""
    if device.type != "cuda":
        return None
    chosen = dtype or torch.float32
    thread = WarmUp(lambda: _decode_once(config, chosen, device, prompt_lengths, length, sampling))
    thread.start()
    return thread

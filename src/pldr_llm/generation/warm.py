"""Load the decoding loop's GPU code while the weights are read.

A fresh process pays, on its first decoding step on CUDA, for what every later step gets for
free: the CUDA context, cuBLAS and the kernels of each library (loaded on first use), and
Triton's first kernel (which hashes Triton's own install, ~0.4 s, before it looks in its
cache). None of it depends on the weights, only on the model's shapes and dtype, so
:func:`warm_up_in_background` runs one short decode of an uninitialized model of the same
configuration in a background thread, and the caller reads the weights meanwhile (most of that
time is file reads and copies, which leave the interpreter lock free).

The thread runs no CUDA graph capture (a capture forbids other threads' device calls): the
real model's graphs are captured by the first generation, which then finds every kernel loaded.
"""

from __future__ import annotations

import threading

import torch

from pldr_llm.config import PLDRConfig


def _decode_once(
    config: PLDRConfig,
    dtype: torch.dtype,
    device: torch.device,
    batch: int,
    prompt_length: int,
    length: int,
) -> None:
    from pldr_llm.generation.api import batch_bucket
    from pldr_llm.generation.engine import DecodeEngine
    from pldr_llm.generation.sampling import SamplingParams
    from pldr_llm.model.model import PLDRModel

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # per thread; "cuda" alone is the current device already
    with torch.no_grad():
        with torch.device("meta"):
            model = PLDRModel(config)
        # Uninitialized memory: the values are never read by anyone; only the kernels matter.
        model = model.to_empty(device=device).to(dtype).eval()
        rows = batch_bucket(batch)  # the rows of the engine generate will use
        span = max(2, min(length, config.max_seq_len))
        # The uncaptured loop runs the captured loop's step (fused where it can be).
        engine = DecodeEngine(model, rows, span, cuda_graph=False)
        prompt = [config.eos_id] * max(1, min(prompt_length, length - 2))
        params = SamplingParams(top_k=1, max_new_tokens=3, stop_at_eos=False)
        engine.add_many([prompt] * rows, [params] * rows)
        engine.advance(2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def warm_up_in_background(
    config: PLDRConfig,
    dtype: torch.dtype | None,
    device: torch.device,
    batch: int = 1,
    prompt_length: int = 1,
    length: int = 64,
) -> threading.Thread | None:
    """Start loading, in a daemon thread, the GPU code that decoding ``batch`` prompts of
    ``prompt_length`` tokens up to ``length`` tokens with a model of ``config`` in ``dtype`` on
    ``device`` will use; returns the thread (``join()`` it before generating), or None where
    there is nothing to load (not CUDA). A failure in the thread is silent: it only means the
    first generation loads the code itself."""
    if device.type != "cuda":
        return None
    dtype = dtype or torch.float32

    def run() -> None:
        try:
            _decode_once(config, dtype, device, batch, prompt_length, length)
        except Exception:  # noqa: BLE001 - an optimization only: generation loads it anyway
            pass

    thread = threading.Thread(target=run, name="pldr-llm-warm-up", daemon=True)
    thread.start()
    return thread

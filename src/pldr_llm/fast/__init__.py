"""Optimized paths for the GPU: fused loss, compiled layers, graph-captured decoding.

Everything here runs the model's own modules (:meth:`PLDRModel.run_layers`, the PLGA of
:mod:`pldr_llm.model.plga`); nothing re-implements the math. The eager path stays the reference:
``tests/test_fast.py`` checks these against it on the CPU. ``python -m pldr_llm.bench`` measures
them. See BENCHMARKS.md.

* :func:`causal_lm_loss` / :func:`linear_cross_entropy`: the LM loss, chunked, without the
  [B, L, V] float32 logits; :func:`packed_causal_lm_loss` for padding-free batches, without
  the host syncs of ``forward``'s checks.
* :func:`compile_decoder_layers`: ``torch.compile`` on each decoder layer, in place.
* Decoding (static KV-cache, CUDA-graph step): :class:`pldr_llm.generation.DecodeEngine`.
* :class:`CapturedForward`: a prompt's forward (prefill) captured in a CUDA graph.
"""

from pldr_llm.fast.compile import compile_decoder_layers, uncompile_decoder_layers
from pldr_llm.fast.decode import CapturedForward
from pldr_llm.fast.loss import (
    causal_lm_loss,
    chunk_loss_and_grad,
    linear_cross_entropy,
    packed_causal_lm_loss,
)

__all__ = [
    "CapturedForward",
    "causal_lm_loss",
    "chunk_loss_and_grad",
    "compile_decoder_layers",
    "linear_cross_entropy",
    "packed_causal_lm_loss",
    "uncompile_decoder_layers",
]

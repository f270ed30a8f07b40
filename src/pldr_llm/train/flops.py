"""The model FLOPs of a PLDR-LLM training step, the numerator of the logged MFU.

A matrix product of [m, k] by [k, n] costs ``2 m k n`` FLOPs; a training step costs three
forward passes (the backward pass computes two products per forward product: the gradients of
both operands). Per sequence of ``L`` tokens and per decoder layer, with ``d = d_model``, ``H``
heads of ``dk``, ``d_ff``, and the metric learner's ``R`` residual units of ``D`` GLUs of width
``A_dff``:

========================== ============================================================
projections                ``4 · 2 L d²`` (wq, wk, wv, dense)
feed-forward (SwiGLU)      ``3 · 2 L d d_ff``
attention                  ``2 · 2 L² d`` (``Q K^T`` and ``weights V`` over the whole
                           ``L × L`` square: no discount for the causal mask, PaLM's convention)
``Q G_LM``                 ``2 L d dk`` (each query times its head's dk × dk G_LM)
metric learner             ``2 L d dk`` (``Q^T Q``) ``+ H R D · 3 · 2 dk² A_dff`` (the GLUs on
                           dk × dk matrices) ``+ H · 2 · 2 dk³`` (``W A`` and ``a A_P``)
========================== ============================================================

plus the LM head, ``2 L d V``. The metric learner works on dk × dk matrices once per sequence,
not per token, so its GLUs weigh ``1/L`` of what their parameter count would say; with
``causal_metric`` it runs once per position instead (``L`` times the GLUs and power law). A
predefined G_LM (v510G) has no metric learner. Element-wise work (LayerNorms, the power law's
``pow``, softmax, activations) and the embedding lookup are not counted. Activation
checkpointing's recomputed forward is not counted either: MFU counts the model's FLOPs, not the
hardware's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["forward_flops", "training_flops_per_token"]


def forward_flops(config: Any, context: int) -> dict[str, float]:
    """Forward FLOPs of one sequence of ``context`` tokens, by part (see the module docstring).

    ``config`` is a :class:`~pldr_llm.core.config.PLDRConfig` (or anything with its fields).
    """
    L, d, dk = float(context), float(config.d_model), float(config.depth)
    heads, layers = float(config.num_heads), float(config.num_layers)
    per_layer = {
        "projections": 4 * 2 * L * d * d,
        "feed_forward": 3 * 2 * L * d * config.dff,
        "attention": 2 * 2 * L * L * d,
        "g_lm": 2 * L * d * dk,
        "metric_learner": 0.0,
    }
    if getattr(config, "version", "v510") != "v510G":
        glus = heads * config.num_reslayerA * config.num_denseA * 3 * 2 * dk * dk * config.A_dff
        power_law = heads * 2 * 2 * dk**3
        runs = L if getattr(config, "causal_metric", False) else 1.0
        per_layer["metric_learner"] = 2 * L * d * dk + runs * (glus + power_law)
    out = {name: layers * value for name, value in per_layer.items()}
    out["lm_head"] = 2 * L * d * config.input_vocab_size
    return out


def training_flops_per_token(config: Any, context: int) -> float:
    """Model FLOPs of training on one token at ``context``: three forward passes' worth."""
    return 3 * sum(forward_flops(config, context).values()) / context

"""torch.compile on the decoder layers, in place (state-dict keys unchanged)."""

from __future__ import annotations

from typing import Any

from torch import nn


def compile_decoder_layers(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile every decoder layer's ``forward`` of ``model`` in place with ``torch.compile``.

    The layer (PLGA with its metric learner, the FFN and the two LayerNorms) is where the small
    element-wise kernels are: the float32 rotary rotation, 16 GLUs and 9 LayerNorms of the metric
    learner, the power law, residual adds. Inductor fuses them. The modules are not wrapped
    (their ``forward`` is replaced), so ``state_dict()`` keeps the original names. Shapes are static by default (``dynamic=False``):
    each new (batch, length) compiles once, which suits fixed-size training batches.

    ``mode="reduce-overhead"`` adds CUDA-graph trees: each layer's forward and backward replay
    as one graph. At 110M parameters the compiled step is otherwise bound by the host (about
    3,400 kernel launches a step, many of them the metric learner's small matmuls): on an H200
    this took batch 16 x 1024 from ~62-75 ms to 38 ms a step (BENCHMARKS.md). With it, call
    ``torch.compiler.cudagraph_mark_step_begin()`` at the start of every training step, and do
    not keep a step's outputs past the next step without cloning them.
    Returns ``model``.
    """
    compile_kwargs.setdefault("dynamic", False)
    import torch

    for layer in _decoder_layers(model):
        # The layer's forward, not its __call__ (what ``nn.Module.compile`` wraps): module hooks
        # stay outside the compiled code, so FSDP2's all-gather / reduce-scatter hooks on a
        # sharded layer run eagerly around it, as torch.compile-then-shard setups do. The
        # instance attribute (what ``layer.forward = ...`` sets) shadows the class's method.
        layer.__dict__["forward"] = torch.compile(
            type(layer).forward.__get__(layer), **compile_kwargs
        )
    return model


def uncompile_decoder_layers(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_decoder_layers` (the layers run eagerly again)."""
    for layer in _decoder_layers(model):
        layer.__dict__.pop("forward", None)
    return model


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.decoder.dec_layers`` of a :class:`~pldr_llm.core.model.PLDRModel`."""
    layers = model.get_submodule("decoder.dec_layers")
    assert isinstance(layers, nn.ModuleList)
    return layers

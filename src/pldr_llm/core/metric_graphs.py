"""The prompt pass's metric learner and power law, replayed as CUDA graphs.

Admitting prompts into the decoding engine runs them through the model once (the prompt pass).
On a GPU that pass is bound by the host: for the 110M configuration it is about a thousand
operator calls, and half of them are each layer's metric learner (``LN(Q^T Q)``, eight
residual units of two GLUs each) and power law (A -> A_LM, A_P, G_LM). Their input, the raw
``Q^T Q`` [B, H, dk, dk], has the same shape whatever the prompts' length, so one graph per
layer and number of rows ``B`` serves every prompt pass of ``B`` rows: the engine replays it
(one copy in, one replay) instead of launching those kernels one by one.

The graphs replay the very kernels the uncaptured pass launches, on the same shapes (one graph
per exact row count, never a padded batch), so the pass computes the same values bit for bit
(``tests/test_generation.py`` checks it on a GPU). Graphs are captured on first use of a row count, up to
:data:`MAX_CAPTURED_ROWS` rows (a bigger admission runs uncaptured); every graph of one
:class:`MetricGraphs` shares one memory pool, and writes its outputs into one set of buffers per
layer, so the memory held does not grow with the number of graphs. A layer whose parameters were
replaced or moved (not changed in place: the graphs read them where they are), or a pass in
another dtype (autocast), is captured again. What is not a parameter (an activation, a
LayerNorm's eps, an adapter switched off) is part of the graphs: change it, then build a new
engine.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .graphs import capture_graph

#: The largest prompt pass (rows) whose metric learner is captured; the server admits what
#: arrived during one block, rarely more (a burst beyond this runs uncaptured, as before).
MAX_CAPTURED_ROWS = 32

MetricOutputs = tuple[Tensor, Tensor, Tensor, Tensor]  # A, A_LM, A_P, G_LM


class _LayerGraphs:
    """One layer's graphs by row count, the buffers they write, and the parameters they read."""

    def __init__(self, attention: Any, dtype: torch.dtype) -> None:
        self.attention = attention
        self.dtype = dtype  # of the raw metric its graphs read
        self.params: list[Tensor] = attention.metric_parameters()
        self.addresses = _addresses(self.params)
        self.registrations = _REGISTRATIONS[0]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: MetricOutputs | None = None  # [max_rows, H, dk, dk] each

    def current(self) -> bool:
        """Whether the graphs still read this layer's parameters: the same tensors (none
        replaced: checked again only after a module or parameter was registered anywhere in
        the process, which is rare) at the same addresses (``model.to()`` moves them)."""
        if self.registrations != _REGISTRATIONS[0]:
            now = self.attention.metric_parameters()
            if len(now) != len(self.params) or any(a is not b for a, b in zip(now, self.params)):
                return False
            self.registrations = _REGISTRATIONS[0]
        return _addresses(self.params) == self.addresses


def _addresses(params: list[Tensor]) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in params)


#: Parameters and submodules (re)registered so far in this process (a module's parameter
#: replaced by assignment, a layer wrapped by an adapter): counted by torch's global hooks, so
#: that a prompt pass compares one number instead of walking each metric learner's modules.
_REGISTRATIONS = [0]
_HOOKS: list[Any] = []


def _count_registration(*args: Any) -> None:
    _REGISTRATIONS[0] += 1


def _install_hooks() -> None:
    if not _HOOKS:
        from torch.nn.modules import module

        _HOOKS.append(module.register_module_parameter_registration_hook(_count_registration))
        _HOOKS.append(module.register_module_module_registration_hook(_count_registration))


class MetricGraphs:
    """Per layer, ``raw -> (A, A_LM, A_P, G_LM)`` of the prompt pass as replayed CUDA graphs.

    :meth:`runners` gives the layers' functions for :meth:`pldr_llm.core.model.PLDRModel.forward`'s
    ``metric_runners``. The tensors it returns are views of buffers the
    next pass of the same layer overwrites: the caller copies what it keeps (the decoding
    engine copies them into its caches before the next admission, in stream order).
    """

    def __init__(self, max_rows: int = MAX_CAPTURED_ROWS) -> None:
        _install_hooks()
        #: Passes of up to this many rows are captured (the engine's rows, at most 32).
        self.max_rows = min(max_rows, MAX_CAPTURED_ROWS)
        self._layers: dict[int, _LayerGraphs] = {}
        self._inputs: dict[torch.dtype, Tensor] = {}  # the raw metric, copied in
        self._pool_owner: torch.cuda.CUDAGraph | None = None  # its pool: every graph's

    def runners(self, model: Any) -> list[Any]:
        """Each layer's ``raw -> (A, A_LM, A_P, G_LM)``, for ``model.forward(metric_runners=)``."""
        return [
            functools.partial(self.run, index, layer.mha1)
            for index, layer in enumerate(model.decoder.dec_layers)
        ]

    def warm(self, model: Any, rows: int) -> None:
        """Capture now each layer's graphs for prompt passes of 1 to ``rows`` rows (at most
        :data:`MAX_CAPTURED_ROWS`)."""
        config = model.config
        for count in range(1, min(rows, self.max_rows) + 1):
            shape = (count, config.num_heads, config.depth, config.depth)
            raw = torch.zeros(shape, dtype=model.dtype, device=model.device)
            for run in self.runners(model):
                run(raw)

    def run(self, index: int, attention: Any, raw: Tensor) -> MetricOutputs:
        rows = raw.shape[0]
        if rows > self.max_rows or not raw.is_cuda:
            return attention.metric_to_G(raw)
        source = self._input(raw)  # (first: a new input buffer drops every layer's graphs)
        layer = self._layers.get(index)
        if (
            layer is None
            or layer.attention is not attention
            or layer.dtype != raw.dtype  # e.g. under autocast: other kernels, other buffers
            or not layer.current()
        ):
            layer = self._layers[index] = _LayerGraphs(attention, raw.dtype)
        graph = layer.graphs.get(rows)
        if graph is None:
            graph = layer.graphs[rows] = self._capture(layer, source[:rows])
        source[:rows].copy_(raw)
        graph.replay()
        assert layer.outputs is not None
        return tuple(t[:rows] for t in layer.outputs)  # type: ignore[return-value]

    def _input(self, raw: Tensor) -> Tensor:
        source = self._inputs.get(raw.dtype)
        if source is None or source.shape[1:] != raw.shape[1:] or source.device != raw.device:
            source = raw.new_zeros(self.max_rows, *raw.shape[1:])
            self._inputs[raw.dtype] = source
            self._layers.clear()  # their graphs read the old input
        return source

    def _capture(self, layer: _LayerGraphs, source: Tensor) -> torch.cuda.CUDAGraph:
        rows = source.shape[0]
        if layer.outputs is None:  # A, A_LM, A_P and G_LM all have the raw metric's shape
            layer.outputs = tuple(  # type: ignore[assignment]
                torch.empty_like(self._inputs[source.dtype]) for _ in range(4)
            )
        outputs = layer.outputs
        assert outputs is not None

        def metric_to_G() -> None:
            for buffer, t in zip(outputs, layer.attention.metric_to_G(source)):
                buffer[:rows].copy_(t)

        pool = self._pool_owner.pool() if self._pool_owner is not None else None
        graph, _ = capture_graph(metric_to_G, warmup=1, pool=pool)
        if self._pool_owner is None:
            # The pool lives while a graph of it does (a handle alone does not keep it: torch
            # 2.11 asserts on capturing into a pool whose graphs are all gone). This first
            # graph stays referenced here, whatever happens to the layers' graphs.
            self._pool_owner = graph
        return graph


def metric_graphs_for(
    model: Any, use_graph: bool, max_rows: int = MAX_CAPTURED_ROWS
) -> MetricGraphs | None:
    """The prompt pass's :class:`MetricGraphs` for an engine of ``model``: with CUDA graphs, when
    the model learns G from the whole prompt (not a predefined G, not a causal metric)."""
    config = model.config
    if not use_graph or config.version == "v510G" or config.causal_metric:
        return None
    return MetricGraphs(max_rows)

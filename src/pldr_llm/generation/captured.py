"""A prompt's forward (prefill) captured in a CUDA graph, for shapes that repeat.

Decoding itself lives in :mod:`pldr_llm.generation` (:class:`~pldr_llm.generation.DecodeEngine`,
the one decoding loop, with its own graph-captured step). This is the whole-sequence forward of
unpadded prompts of one [batch, length] shape -- what loglikelihood scoring repeats.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pldr_llm.errors import PLDRError
from pldr_llm.generation.graphs import capture_graph, maybe_compile, sdpa_backends
from pldr_llm.model.cache import GCacheEntry, LayerKV, PLDRCache
from pldr_llm.model.model import PLDRModel, PLDROutput


class CapturedForward:
    """The whole-sequence forward of a [batch, length] prompt without padding, in a CUDA graph.

    Same computation as ``model(input_ids, logits_to_keep=logits_to_keep)`` when no id is the pad
    id (plain causal attention, the metric learner on every layer). Calls return an
    :class:`~pldr_llm.model.PLDROutput` whose tensors are the graph's static outputs: they are
    overwritten by the next call (clone what you keep). On the CPU it runs eagerly.
    """

    def __init__(
        self,
        model: PLDRModel,
        batch_size: int,
        length: int,
        logits_to_keep: int = 1,
        cuda_graph: bool | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        if length > model.config.max_seq_len:
            raise PLDRError(f"length {length} exceeds max_seq_len={model.config.max_seq_len}")
        self.model = model
        device = model.device
        self.ids = torch.ones(batch_size, length, dtype=torch.long, device=device)
        self.positions = torch.arange(length, device=device)
        self.logits_to_keep = logits_to_keep
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        forward = maybe_compile(self._forward, compile)
        if self.use_graph:
            with torch.no_grad(), sdpa_backends():
                graph, outputs = capture_graph(forward)
            self._run = lambda: (graph.replay(), outputs)[1]
        else:
            self._run = forward

    @torch.no_grad()
    def _forward(self) -> tuple[Tensor, list[LayerKV], list[GCacheEntry]]:
        hidden, kv, g, _ = self.model.run_layers(self.ids, self.positions, None, True)
        return self.model.final_layer(hidden[:, -self.logits_to_keep :]), kv, g

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> PLDROutput:
        if input_ids.shape != self.ids.shape:
            raise PLDRError(
                f"this forward is for shape {tuple(self.ids.shape)}, got {tuple(input_ids.shape)}"
            )
        if bool((input_ids == self.model.config.pad_id).any()):
            raise PLDRError("CapturedForward takes no padding; use model.forward for padded input")
        self.ids.copy_(input_ids)
        logits, kv, g = self._run()
        valid = torch.ones(self.ids.shape, dtype=torch.bool, device=self.ids.device)
        return PLDROutput(logits=logits, cache=PLDRCache(kv=kv, g=g, key_valid=valid))

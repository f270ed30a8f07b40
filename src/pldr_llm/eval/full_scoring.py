"""``score_mode=full`` of the ``pldrllm`` lm-eval model: one pass over each request's context and
continuation, in padded chunks whose forwards are captured once a shape repeats.

A chunk is padded on the right with the core model's per-row attention mask (padding kept out of
A, the keys and the rotary positions), so padding changes no request's log-probabilities beyond
float rounding. With ``width_multiple`` > 1 its width is rounded up and a short last chunk is
filled with rows, so a run meets a handful of shapes; a shape's forward is captured
(:class:`~pldr_llm.generation.captured.CapturedForward`) the second time it comes.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pldr_llm.core.cache import GCacheEntry, PLDRCache
from pldr_llm.generation.captured import CapturedForward

#: ``score_mode=full`` pads a chunk's width up to a multiple of this (capped at max_seq_len).
DEFAULT_WIDTH_MULTIPLE = 64
#: Captured forwards kept at once. Requests are scored longest first, so each shape's chunks
#: come together and a shape once left is rarely met again; each graph holds its activations.
MAX_CAPTURED = 4
#: Uses of a shape by the eager forward before it is captured: a shape met once is not worth
#: a capture (warm-up passes plus the capture cost more than the one forward).
EAGER_USES_BEFORE_CAPTURE = 1


class FullScorer:
    """Log-probabilities of requests' scored positions from one forward per chunk of requests.

    ``width_multiple`` 1 pads a chunk only to its longest input; ``cuda_graph`` replays a
    repeated shape's forward from its capture (without a graph off CUDA: the same code).
    ``filler_id``: the one token of a filler row (any id but padding; never read).
    """

    def __init__(
        self,
        model: Any,
        batch_size: int,
        width_multiple: int,
        cuda_graph: bool,
        g_init: list[GCacheEntry] | None,
        filler_id: int,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.width_multiple = width_multiple
        self.cuda_graph = cuda_graph
        self.g_init = g_init
        self.filler_id = filler_id
        #: captured forwards by [rows, width], least recently used first (at most MAX_CAPTURED)
        self.captured: OrderedDict[tuple[int, int], CapturedForward] = OrderedDict()
        #: how often each [rows, width] ran (decides when a shape is captured)
        self.shape_uses: Counter[tuple[int, int]] = Counter()

    def padded_shape(self, inputs: list[list[int]]) -> tuple[int, int]:
        """[rows, width] of a chunk: with ``width_multiple`` > 1, ``batch_size`` rows and the
        longest input rounded up to the multiple (at most max_seq_len), so shapes repeat."""
        longest = max(len(x) for x in inputs)
        if self.width_multiple == 1:
            return len(inputs), longest
        step = self.width_multiple
        width = min(-(-longest // step) * step, int(self.model.config.max_seq_len))
        return max(self.batch_size, len(inputs)), max(width, longest)

    def captured_forward(self, shape: tuple[int, int]) -> CapturedForward | None:
        """The captured forward of ``shape`` once it is worth one (else None: run eagerly)."""
        self.shape_uses[shape] += 1
        if not self.cuda_graph:
            return None
        forward = self.captured.get(shape)
        if forward is not None:
            self.captured.move_to_end(shape)
            return forward
        if self.shape_uses[shape] <= EAGER_USES_BEFORE_CAPTURE:
            return None
        while len(self.captured) >= MAX_CAPTURED:
            self.captured.popitem(last=False)  # frees that graph's memory
        forward = CapturedForward(
            self.model,
            *shape,
            cuda_graph=self.device.type == "cuda",
            padded=True,
            g=self.g_init,
            output_hidden_states=True,
        )
        self.captured[shape] = forward
        return forward

    @property
    def captured_shapes(self) -> list[tuple[int, int]]:
        """The [rows, width] shapes whose captured forwards are kept now."""
        return list(self.captured)

    def score(self, inputs: list[list[int]], spans: list[tuple[int, int]]) -> list[Tensor]:
        """Log-probabilities [span, V] of each input's scored positions ``[start, end)``."""
        model, device = self.model, self.device
        shape = self.padded_shape(inputs)
        ids = torch.full(shape, model.config.pad_id, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        # Filler rows (a short last chunk) hold one token each, the end-of-text id, so that no
        # row is padding only (its queries would have no key to attend to). Never read.
        ids[len(inputs) :, 0] = self.filler_id
        mask[len(inputs) :, 0] = 1
        captured = self.captured_forward(shape)
        if captured is not None:
            # copied from the host straight into the graph's static input buffers
            hidden = captured(ids, mask).hidden_states
        else:
            hidden = model(
                ids.to(device),
                attention_mask=mask.to(device),
                cache=PLDRCache(g=self.g_init) if self.g_init is not None else None,
                output_hidden_states=True,
                logits_to_keep=1,
            ).hidden_states
        assert hidden is not None
        return self._head(hidden, spans)

    def _head(self, hidden: Tensor, spans: list[tuple[int, int]]) -> list[Tensor]:
        # Logits only where they are scored: [sum of spans, d_model] through the LM head.
        rows = torch.cat(
            [torch.full((e - s,), r, dtype=torch.long) for r, (s, e) in enumerate(spans)]
        )
        cols = torch.cat([torch.arange(s, e, dtype=torch.long) for s, e in spans])
        picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]
        logprobs = F.log_softmax(self.model.final_layer(picked).float(), dim=-1)
        return list(torch.split(logprobs, [e - s for s, e in spans]))

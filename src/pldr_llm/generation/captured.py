"""A whole-sequence forward captured in a CUDA graph, for shapes that repeat.

Decoding itself lives in :mod:`pldr_llm.generation` (:class:`~pldr_llm.generation.DecodeEngine`,
the one decoding loop, with its own graph-captured step). This is the whole-sequence forward of
one [batch, length] shape -- a prompt's prefill, or what loglikelihood scoring repeats
(:class:`pldr_llm.eval.lm_eval_model.PLDRLLMEvalModel` keeps one per padded shape).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pldr_llm.core.cache import GCacheEntry, LayerKV, PLDRCache
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.graphs import capture_graph, maybe_compile, sdpa_backends
from pldr_llm.core.model import PLDRModel, PLDROutput
from pldr_llm.core.rope import row_positions


class CapturedForward:
    """The whole-sequence forward of a [batch, length] input, in a CUDA graph.

    Without ``padded``: the same computation as ``model(input_ids, logits_to_keep=...)`` when no
    id is the pad id (plain causal attention, the metric learner on every layer); padded ids are
    refused. With ``padded=True`` each call also takes a per-row ``attention_mask`` [batch,
    length] (1 = token, 0 = padding), copied into a static buffer, and computes what
    ``model(input_ids, attention_mask=mask, cache=PLDRCache(g=g))`` does: padding is kept out of
    A, the keys and the rotary positions. The mask is turned into positions and an attention bias
    inside the captured work, by the model's own code with no read back to the host (the forward
    itself checks the ids and asks whether every key is a token; both wait for the GPU).

    ``g``: a G-cache (one :class:`~pldr_llm.core.cache.GCacheEntry` per layer, e.g. a prepared
    G_init) used instead of the metric learner in every call; the graph reads these very tensors,
    so keep them alive and unchanged. ``output_hidden_states`` returns the final hidden states
    [batch, length, d_model] (what scoring needs: logits only where they are scored).

    Calls return an :class:`~pldr_llm.core.model.PLDROutput` whose tensors are the graph's static
    outputs: they are overwritten by the next call (clone what you keep). Without a graph
    (``cuda_graph=False``, the default off CUDA) the same calls run eagerly.
    """

    def __init__(
        self,
        model: PLDRModel,
        batch_size: int,
        length: int,
        logits_to_keep: int = 1,
        cuda_graph: bool | None = None,
        compile: bool | dict[str, Any] = False,
        *,
        padded: bool = False,
        g: list[GCacheEntry] | None = None,
        output_hidden_states: bool = False,
    ) -> None:
        if length > model.config.max_seq_len:
            raise PLDRError(f"length {length} exceeds max_seq_len={model.config.max_seq_len}")
        if batch_size < 1 or length < 1:
            raise PLDRError(f"CapturedForward needs a positive shape, got [{batch_size}, {length}]")
        if g is not None and len(g) != model.config.num_layers:
            raise PLDRError(f"the G-cache has {len(g)} layers, the model {model.config.num_layers}")
        self.model = model
        device = model.device
        self.ids = torch.ones(batch_size, length, dtype=torch.long, device=device)
        self.positions = torch.arange(length, device=device)
        #: the per-row mask of a padded forward (filled by each call), else None
        self.mask = (
            torch.ones(batch_size, length, dtype=torch.bool, device=device) if padded else None
        )
        self.g = g
        self.logits_to_keep = logits_to_keep
        self.output_hidden_states = output_hidden_states
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.use_graph and device.type != "cuda":
            raise PLDRError(f"cuda_graph needs a model on a CUDA device, not {device}")
        forward = maybe_compile(self._forward, compile)
        if self.use_graph:
            with torch.no_grad(), sdpa_backends():
                graph, outputs = capture_graph(forward)

            def replay() -> Any:
                graph.replay()
                return outputs

            self._run = replay
        else:
            self._run = forward

    @property
    def shape(self) -> tuple[int, int]:
        """The [batch, length] this forward takes."""
        return (int(self.ids.shape[0]), int(self.ids.shape[1]))

    @torch.no_grad()
    def _forward(self) -> tuple[Tensor, Tensor, list[LayerKV], list[GCacheEntry], Tensor | None]:
        model, length = self.model, self.ids.shape[1]
        if self.mask is None:
            positions, bias, is_causal, query_valid = self.positions, None, True, None
            next_position = None
        else:
            # What PLDRModel.forward derives from an attention_mask, minus its host reads: the
            # bias is built whatever the mask holds (all_valid=False), so a full row gets the
            # explicit causal bias instead of SDPA's causal flag (the same values up to rounding).
            query_valid = self.mask
            positions = row_positions(self.mask)
            bias, is_causal = model.attention_mask_bias(self.mask, length, 0, all_valid=False)
            next_position = self.mask.long().sum(1)
        hidden, kv, g, _ = model.run_layers(
            self.ids, positions, bias, is_causal, g=self.g, query_valid=query_valid
        )
        head_input = hidden[:, -self.logits_to_keep :] if self.logits_to_keep else hidden
        return model.final_layer(head_input), hidden, kv, g, next_position

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> PLDROutput:
        """The forward of ``input_ids`` [batch, length] (and, when padded, ``attention_mask``:
        omitted means every position is a token)."""
        if tuple(input_ids.shape) != self.shape:
            raise PLDRError(f"this forward is for shape {self.shape}, got {tuple(input_ids.shape)}")
        if self.mask is None:
            if attention_mask is not None:
                raise PLDRError("this CapturedForward was built without padded=True: no mask")
            if bool((input_ids == self.model.config.pad_id).any()):
                raise PLDRError("CapturedForward takes no padding unless built with padded=True")
        elif attention_mask is None:
            self.mask.fill_(True)
        elif tuple(attention_mask.shape) != self.shape:
            raise PLDRError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                f"shape {self.shape}"
            )
        else:
            self.mask.copy_(attention_mask)  # any nonzero value is a token
        self.ids.copy_(input_ids)
        logits, hidden, kv, g, next_position = self._run()
        if self.mask is None:
            valid = torch.ones(self.ids.shape, dtype=torch.bool, device=self.ids.device)
            cache = PLDRCache(kv=kv, g=g, key_valid=valid)
        else:
            cache = PLDRCache(
                kv=kv, g=g, key_valid=self.mask, next_position=next_position, per_row=True
            )
        return PLDROutput(
            logits=logits,
            cache=cache,
            hidden_states=hidden if self.output_hidden_states else None,
        )

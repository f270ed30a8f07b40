"""Model versions built from another model: predefined G_LM (v510G) and inferred G_LM (v510Gi)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from pldr_llm.errors import PLDRError
from pldr_llm.model.cache import GCacheEntry, g_entries
from pldr_llm.model.model import PLDRModel
from pldr_llm.model.rope import RotaryEmbedding


def predefined_G_model(
    model: PLDRModel, G_list: Sequence[Tensor | tuple[Tensor | None, Tensor] | GCacheEntry]
) -> PLDRModel:
    """A v510G model: attends with the given G_LM per layer and shares every other weight.

    ``G_list`` holds one G_LM per layer ([H, dk, dk] or [1, H, dk, dk]), or ``(A_LM, G_LM)``
    pairs. The returned model has no metric-learner weights; its embedding, projections, FFNs,
    layer norms and LM head are the very ``nn.Parameter`` objects of ``model`` (transferred, not
    copied), so training one trains the other.
    """
    entries = g_entries(G_list)
    config = dataclasses.replace(model.config, version="v510G")
    with torch.device("meta"):
        g_model = PLDRModel(config)
    g_model.attn_implementation = model.attn_implementation
    shared = dict(model.named_parameters())
    for name, _ in list(g_model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = g_model.get_submodule(module_name)
        setattr(module, attr, shared[name])
    device = model.final_layer.weight.device
    for layer in g_model.decoder.dec_layers:
        # Buffers are per model: rotary tables are rebuilt on the right device, G set below.
        attention = layer.mha1
        attention.rotary = RotaryEmbedding.from_config(config).to(device)
        attention.predefined_G_LM = torch.empty(
            1, config.num_heads, config.depth, config.depth, device=device, dtype=model.dtype
        )
    if len(entries) != config.num_layers:
        raise PLDRError(f"G list has {len(entries)} layers, the model has {config.num_layers}")
    for index, entry in enumerate(entries):
        if entry.G_LM.shape[0] != 1:
            raise PLDRError(
                f"G_LM of layer {index} has batch size {entry.G_LM.shape[0]}; a predefined G_LM "
                "must be one tensor per layer (batch size 1)"
            )
    g_model.set_predefined_G([e.G_LM.to(device) for e in entries])
    g_model.train(model.training)
    return g_model


@torch.no_grad()
def infer_G(model: PLDRModel, token_id: int | None = None) -> list[GCacheEntry]:
    """G_LM of every layer inferred from one forward pass over the single token ``token_id``.

    The default token is the end-of-text id (3), as in the original's v510Gi.
    """
    token = model.config.eos_id if token_id is None else token_id
    ids = torch.tensor([[token]], device=model.final_layer.weight.device)
    out = model(ids)
    return [GCacheEntry(g.A_LM, g.G_LM, g.A_P) for g in out.cache.g]


def inference_G_model(model: PLDRModel, token_id: int | None = None) -> PLDRModel:
    """v510Gi: infer G_LM once from the end-of-text token, then build the v510G model on it.

    For inference only: the result is in eval mode and its parameters are those of ``model``.
    """
    was_training = model.training
    model.eval()
    entries = infer_G(model, token_id)
    model.train(was_training)
    g_model = predefined_G_model(model, entries)
    return g_model.eval()

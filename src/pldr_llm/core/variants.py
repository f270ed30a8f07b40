"""Model versions built from another model: predefined G_LM (v510G) and inferred G_LM (v510Gi)."""

from __future__ import annotations

import dataclasses

import torch

from .cache import GCacheEntry, GInit, check_g_init, g_entries
from .model import PLDRModel
from .rope import RotaryEmbedding


def predefined_G_model(model: PLDRModel, G_list: GInit) -> PLDRModel:
    """A v510G model: attends with the given G_LM per layer and shares every other weight.

    ``G_list`` holds one G_LM per layer ([H, dk, dk] or [1, H, dk, dk]), or ``(A_LM, G_LM)``
    pairs. The returned model has no metric-learner weights; its embedding, projections, FFNs,
    layer norms and LM head are the very ``nn.Parameter`` objects of ``model`` (transferred, not
    copied), so training one trains the other.
    """
    entries = g_entries(G_list)
    check_g_init(model.config, entries, what="the predefined G list")
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

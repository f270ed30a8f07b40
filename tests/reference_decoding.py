"""The oracle for decoding tests: the plain eager loop of the original, one prompt at a time.

It grows the cache with ``model.forward`` (concatenating KV-cache) exactly as the original's
``generate_text`` walks its cache modes, and samples with the scalar filters of the original
(:func:`pldr_llm.generation.filter_logits`) and the documented draw: the first token whose
cumulative probability under ``softmax(filtered)`` exceeds the row's uniform number of the step
(:func:`pldr_llm.generation.uniform_draws`). Nothing here shares code with
:class:`pldr_llm.generation.DecodeEngine` beyond the model itself, the filters and the uniform
numbers.
"""

from __future__ import annotations

import torch

from pldr_llm.core.cache import PLDRCache, g_entries
from pldr_llm.generation import filter_logits, uniform_draws


@torch.no_grad()
def reference_generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    *,
    kv: bool = True,
    g: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    g_init=None,
    return_logits: bool = False,
):
    """New ids of ``prompt`` alone (and the float32 logits of every step when asked)."""
    eos = model.config.eos_id
    init = g_entries(g_init) if g_init is not None else None
    sequence = torch.tensor([prompt], dtype=torch.long)
    kv_cache = None
    g_cache = init
    new: list[int] = []
    logits_seen = []
    for step in range(max_new_tokens):
        if kv_cache is None:
            cache = PLDRCache(g=g_cache) if g_cache is not None else None
            out = model(sequence, cache=cache, logits_to_keep=1)
        else:
            out = model(sequence[:, -1:], cache=kv_cache.with_g(g_cache), logits_to_keep=1)
        logits = out.logits[:, -1].float()
        logits_seen.append(logits[0])
        if kv:
            kv_cache = out.cache
        if g:
            g_cache = out.cache.g
        if temperature == 0 or top_k == 1:
            token = int(logits.argmax(-1))
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p)
            u = uniform_draws(torch.tensor(seed), torch.tensor(step))
            cumulative = torch.softmax(filtered, dim=-1)[0].cumsum(0)
            token = int((cumulative > u * cumulative[-1]).nonzero()[0])
        new.append(token)
        sequence = torch.cat((sequence, torch.tensor([[token]])), dim=1)
        if stop_at_eos and token == eos:
            break
    if return_logits:
        return new, torch.stack(logits_seen)
    return new

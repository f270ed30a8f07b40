"""The oracle for decoding tests: the plain eager loop of the original, one prompt at a time.

It grows the cache with ``model.forward`` (concatenating KV-cache) exactly as the original's
``generate_text`` walks its cache modes, and samples with the scalar filters of the original
(:func:`pldr_llm.generation.filter_logits`) and the documented draw: the first token whose
cumulative probability under ``softmax(filtered)`` exceeds the row's uniform number of the step
(:func:`pldr_llm.generation.uniform_draws`). Nothing here shares code with
:class:`pldr_llm.generation.DecodeEngine` beyond the model itself, the filters and the uniform
numbers. The logit processing (penalties, bias, a minimum length) is written out token by token
from the rules in :class:`pldr_llm.generation.SamplingParams`' docstring.
"""

from __future__ import annotations

import torch

from pldr_llm.core.cache import PLDRCache, g_entries
from pldr_llm.generation import filter_logits, uniform_draws


def reference_process(
    logits: torch.Tensor,
    prompt: list[int],
    new: list[int],
    *,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    min_new_tokens: int = 0,
    stop_ids: list[int] = (),
) -> torch.Tensor:
    """One row's [V] float32 logits after the processing, one token at a time."""
    out = logits.clone()
    for token in set(prompt) | set(new):  # repetition: every token seen, prompt included
        value = out[token]
        out[token] = value * repetition_penalty if value < 0 else value / repetition_penalty
    for token in set(new):  # OpenAI's penalties: generated tokens only
        out[token] = out[token] - frequency_penalty * new.count(token)
        out[token] = out[token] - presence_penalty
    for token, bias in (logit_bias or {}).items():
        out[token] = out[token] + bias
    if len(new) < min_new_tokens:
        for token in stop_ids:
            out[token] = float("-inf")
    return out


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
    stop_token_ids: tuple[int, ...] = (),
    return_logprobs: bool = False,
    **processing,
):
    """New ids of ``prompt`` alone (and the float32 logits of every step, or each token's
    log-probability and the [steps, V] log-softmax of the processed logits, when asked);
    ``processing``: the keyword arguments of :func:`reference_process`."""
    eos = model.config.eos_id
    stop_ids = list(stop_token_ids) + ([eos] if stop_at_eos else [])
    chosen: list[float] = []
    distributions = []
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
        if processing:
            logits = reference_process(logits[0], prompt, new, stop_ids=stop_ids, **processing)
            logits = logits[None]
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
        distribution = torch.log_softmax(logits[0], -1)
        distributions.append(distribution)
        chosen.append(float(distribution[token]))
        sequence = torch.cat((sequence, torch.tensor([[token]])), dim=1)
        if token in stop_ids:
            break
    if return_logprobs:
        return new, chosen, torch.stack(distributions)
    if return_logits:
        return new, torch.stack(logits_seen)
    return new

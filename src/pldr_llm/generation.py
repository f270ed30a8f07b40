"""Text generation with KV-cache and G-cache, as the original's ``generate_text`` does it.

The four cache modes of the original:

* KV on, G on: the prompt runs once, then one token per step; G_LM is inferred once.
* KV on, G off: one token per step; G_LM is recomputed every step from the cached metric tensor.
* KV off, G on: the whole sequence runs every step, with G_LM from the first pass.
* KV off, G off: the whole sequence runs every step and A is recomputed on the grown sequence.

``G_init`` replaces the G-cache of the first pass (and of every pass when the G-cache is off), as
the original's ``Gcachelst_init``. Sampling filters stack in the original's order: temperature,
top-p, then top-k; ``top_k=1`` is greedy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pldr_llm.errors import PLDRError
from pldr_llm.model.cache import GCacheEntry, PLDRCache, g_entries
from pldr_llm.model.model import PLDRModel

FILTERED_LOGIT = -1e10  # the original's value for filtered-out logits

GInit = Sequence[tuple[Tensor | None, Tensor] | GCacheEntry | Tensor]


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Reject sampling settings the original refuses, with one-line messages."""
    if not (0.0 < temperature <= 1.0):
        raise PLDRError(
            f"temperature must be in (0, 1], got {temperature} (for greedy decoding use top_k=1)"
        )
    if not (0.0 < top_p <= 1.0):
        raise PLDRError(f"top_p must be in (0, 1], got {top_p} (1 disables nucleus sampling)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise PLDRError(f"top_k must be an integer >= 0, got {top_k!r} (0 disables top-k)")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th kept), others -1e10."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return torch.where(logits < kth, torch.full_like(logits, FILTERED_LOGIT), logits)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the tokens whose cumulative probability stays <= p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    keep = ((cumulative <= p).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
    threshold = sorted_logits.gather(-1, keep)
    return torch.where(logits < threshold, torch.full_like(logits, FILTERED_LOGIT), logits)


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Temperature, then top-p, then top-k, as the original stacks them."""
    if temperature < 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    return logits


def sample_next(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """One id per row from [B, V] logits."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float(), temperature, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationOutput:
    """Ids (prompt + new, per the input's rank) and, when asked, the logits of every step."""

    ids: Tensor | list[list[int]]
    new_ids: list[list[int]]
    step_logits: Tensor | None = None  # [steps, B, V]: last-position logits before filtering


def _prepare_prompt(
    prompt_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: Tensor | None,
    eos_id: int,
    pad_id: int,
) -> tuple[Tensor, Tensor | None, str]:
    """Return ([B, L] ids, mask or None, input kind: 'vector' | 'matrix' | 'list')."""
    if isinstance(prompt_ids, Tensor):
        ids = prompt_ids.long()
        kind = "vector" if ids.dim() == 1 else "matrix"
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
        if ids.dim() != 2:
            raise PLDRError(f"prompt_ids must be [L] or [B, L], got shape {tuple(ids.shape)}")
        if ids.shape[1] == 0:  # empty prompt: start from end-of-text, like the original
            ids = torch.full((ids.shape[0], 1), eos_id, dtype=torch.long, device=ids.device)
            attention_mask = None
        return ids, attention_mask, kind
    items = list(prompt_ids)
    if not items or isinstance(items[0], (int, Tensor)) and not isinstance(items[0], list):
        if items and isinstance(items[0], Tensor) and items[0].dim() > 0:
            rows, kind = [[int(t) for t in r] for r in items], "list"
        else:
            rows, kind = [[int(t) for t in items]], "vector"  # a flat list of ids
    else:
        rows, kind = [[int(t) for t in r] for r in items], "list"
    if not rows:
        raise PLDRError("no prompt given")
    if kind == "vector":
        ids = torch.tensor([rows[0] or [eos_id]], dtype=torch.long)
        return ids, None, "vector"
    rows = [r if r else [eos_id] for r in rows]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row) :] = 1
    if all(len(r) == length for r in rows) and attention_mask is None:
        return ids, None, kind
    return ids, mask, kind


@torch.inference_mode()
def generate_details(
    model: PLDRModel,
    prompt_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    enable_kvcache: bool = True,
    enable_Gcache: bool = True,
    G_init: GInit | None = None,
    stop_at_eos: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
    stopping_criteria: Callable[[int, list[int]], bool] | None = None,
    streamer: Callable[[Tensor], None] | None = None,
    output_logits: bool = False,
) -> GenerationOutput:
    """:func:`generate` with the step logits and the new ids per row."""
    validate_sampling(temperature, top_k, top_p)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise PLDRError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    config = model.config
    eos = config.eos_id if eos_id is None else eos_id
    device = model.device
    ids, mask, kind = _prepare_prompt(prompt_ids, attention_mask, eos, config.pad_id)
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    batch, prompt_len = ids.shape
    if prompt_len > config.max_seq_len:
        raise PLDRError(
            f"prompt has {prompt_len} tokens, longer than max_seq_len={config.max_seq_len}"
        )
    if prompt_len + max_new_tokens > config.max_seq_len:
        raise PLDRError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={config.max_seq_len}"
        )

    init_g = None
    if G_init is not None:
        init_g = g_entries(G_init)
        if len(init_g) != config.num_layers:
            raise PLDRError(f"G_init has {len(init_g)} layers, the model has {config.num_layers}")
        dtype = model.dtype
        init_g = [
            GCacheEntry(
                e.A_LM.to(device, dtype) if e.A_LM is not None else None,
                e.G_LM.to(device, dtype),
                e.A_P.to(device, dtype) if e.A_P is not None else None,
            )
            for e in init_g
        ]

    was_training = model.training
    model.eval()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_ids: list[list[int]] = [[] for _ in range(batch)]
    step_logits: list[Tensor] = []
    sequence, sequence_mask = ids, mask
    kv_cache: PLDRCache | None = None
    g_cache = init_g
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    try:
        for _ in range(max_new_tokens):
            if kv_cache is None:
                cache = PLDRCache(g=g_cache) if g_cache is not None else None
                out = model(sequence, attention_mask=sequence_mask, cache=cache, logits_to_keep=1)
            else:
                out = model(generated[:, -1:], cache=kv_cache.with_g(g_cache), logits_to_keep=1)
            logits = out.logits[:, -1, :]
            if output_logits:
                step_logits.append(logits.float().clone())
            if enable_kvcache:
                kv_cache = out.cache
            if enable_Gcache:
                g_cache = out.cache.g
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            next_ids = torch.where(finished, torch.full_like(next_ids, config.pad_id), next_ids)
            generated = torch.cat((generated, next_ids[:, None]), dim=1)
            if not enable_kvcache:
                sequence = torch.cat((sequence, next_ids[:, None]), dim=1)
                if sequence_mask is not None:
                    sequence_mask = torch.cat(
                        (sequence_mask, torch.ones_like(next_ids[:, None])), 1
                    )
            if streamer is not None:
                streamer(next_ids)
            values = next_ids.tolist()
            for row in range(batch):
                if finished[row]:
                    continue
                new_ids[row].append(values[row])
                if stop_at_eos and values[row] == eos:
                    finished[row] = True
                elif stopping_criteria is not None and stopping_criteria(row, new_ids[row]):
                    finished[row] = True
            if bool(finished.all()):
                break
    finally:
        model.train(was_training)

    logits_out = torch.stack(step_logits) if output_logits else None
    if kind == "list":
        prompts = [
            ids[r][mask[r].bool()].tolist() if mask is not None else ids[r].tolist()
            for r in range(batch)
        ]
        return GenerationOutput([p + n for p, n in zip(prompts, new_ids)], new_ids, logits_out)
    full = torch.cat((ids, generated), dim=1)
    if kind == "vector":
        full = full[0, : prompt_len + len(new_ids[0])]
    return GenerationOutput(full, new_ids, logits_out)


def generate(
    model: PLDRModel,
    prompt_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    enable_kvcache: bool = True,
    enable_Gcache: bool = True,
    G_init: GInit | None = None,
    stop_at_eos: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
    stopping_criteria: Callable[[int, list[int]], bool] | None = None,
    streamer: Callable[[Tensor], None] | None = None,
) -> Tensor | list[list[int]]:
    """Generate up to ``max_new_tokens`` ids after ``prompt_ids``.

    ``prompt_ids`` is [L] or [B, L] (returns the same rank, new ids appended; rows that stopped
    early are filled with the pad id), or a list of id lists of different lengths (returns a list,
    each prompt + its new ids). Rows of a batch are generated exactly as each would be alone:
    padding is kept out of A, the keys and the rotary positions (pass ``attention_mask`` for a
    padded [B, L] tensor). An empty prompt starts from the end-of-text id, like the original.
    """
    return generate_details(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        enable_kvcache=enable_kvcache,
        enable_Gcache=enable_Gcache,
        G_init=G_init,
        stop_at_eos=stop_at_eos,
        eos_id=eos_id,
        generator=generator,
        attention_mask=attention_mask,
        stopping_criteria=stopping_criteria,
        streamer=streamer,
    ).ids

"""Causal-leak audit: how much a PLDR-LLM's teacher-forced loss relies on future tokens.

In a full-sequence pass each layer's metric tensor ``A = LN(Q^T Q)`` sums over every position,
so the output at position t depends on tokens after t through A and G_LM. :func:`leak_audit`
scores one text three ways, every figure a next-token cross-entropy in nats, computed in float64
from the logits:

* **as trained** -- the pass the trainer makes: one pass over the inputs ``ids[:-1]`` (A over
  every input, the last token being only a target, as in training), each position scoring the
  next token;
* **causal** -- position t scored by a pass over the prefix ``ids[:t+1]`` alone, i.e. what a
  model that sees one more token at a time (no cache, everything recomputed) computes. Prefixes
  are run ``block`` at a time as one left-padded batch with an explicit attention mask, which
  keeps the padding out of A, of the keys and of the rotary positions, so each row computes what
  the prefix computes alone;
* **generation** -- the first ``prompt_len`` tokens run as a prompt, then the rest scored with
  the prompt's KV-cache and G-cache, as ``generate`` decodes: A and G_LM frozen on the prompt.

For a model with ``causal_metric`` the as-trained and causal losses agree (the model is causal).
With a predefined G_LM (v510G) all three agree. Otherwise causal - as trained is the part of the
training loss that comes from seeing later inputs through A (the leak training has); the last
position's two scores are the same pass. See docs/deductive.md for how to read the figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import atomic_write_text
from pldr_llm.core.losses import token_cross_entropy
from pldr_llm.deductive.runs import _as_ids, _EvalMode, _model_device

#: Prefixes per batch of the causal pass.
DEFAULT_BLOCK = 16


@dataclass
class LayerLeak:
    """How far one layer's G_LM moves away from the as-trained one (float64 RMSE over heads,
    entries and, for ``causal``, every scored prefix); ``*_relative`` divides by the RMS of the
    as-trained G_LM (the pass over ``ids[:-1]``)."""

    layer: int
    g_rms_full: float
    g_rmse_causal: float
    g_rmse_causal_relative: float
    g_rmse_prompt: float
    g_rmse_prompt_relative: float


@dataclass
class LeakAudit:
    """What :func:`leak_audit` measured on one text.

    ``loss_full[k]``, ``loss_causal[k]`` are the losses of predicting token ``k + 1``;
    ``loss_generation[k]`` that of token ``prompt_len + k``. ``overall`` holds the means: over every
    position (``full``, ``causal``, ``causal_minus_full``) and over the positions generation scores
    (``*_window``: tokens ``prompt_len`` .. end).
    """

    num_tokens: int
    prompt_len: int
    block: int
    loss_full: list[float]
    loss_causal: list[float]
    loss_generation: list[float]
    layers: list[LayerLeak]
    overall: dict[str, float] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = "pldr-llm-leak-audit"
        data["description"] = (
            "next-token cross-entropy (nats): full = as trained, one pass over ids[:-1] as the "
            "trainer makes; "
            "causal = each position scored by a pass over its prefix alone; generation = A and "
            "G_LM frozen on the first prompt_len tokens, the rest scored with KV- and G-cache"
        )
        return data

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Standard JSON (no NaN); written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    def summary(self) -> str:
        """A short table: overall losses, their differences, and per layer G_LM movement."""
        o = self.overall
        lines = [
            f"causal-leak audit: {self.num_tokens} tokens, prompt {self.prompt_len} "
            f"(generation scores the last {len(self.loss_generation)})",
            f"{'':24}{'all positions':>14}{'generation window':>19}",
            f"{'loss as trained':24}{o['full']:>14.4f}{o['full_window']:>19.4f}",
            f"{'causal loss':24}{o['causal']:>14.4f}{o['causal_window']:>19.4f}",
            f"{'generation-time loss':24}{'-':>14}{o['generation_window']:>19.4f}",
            f"{'causal - as trained':24}{o['causal_minus_full']:>+14.4f}"
            f"{o['causal_minus_full_window']:>+19.4f}",
            f"{'generation - as trained':24}{'-':>14}{o['generation_minus_full_window']:>+19.4f}",
            f"{'generation - causal':24}{'-':>14}{o['generation_minus_causal_window']:>+19.4f}",
            "G_LM vs as-trained G_LM (RMSE, relative to its RMS):",
            f"{'layer':>7}{'rms full':>12}{'causal':>12}{'rel':>9}{'prompt':>12}{'rel':>9}",
        ]
        for x in self.layers:
            lines.append(
                f"{x.layer:>7}{x.g_rms_full:>12.4g}{x.g_rmse_causal:>12.4g}"
                f"{x.g_rmse_causal_relative:>9.4f}{x.g_rmse_prompt:>12.4g}"
                f"{x.g_rmse_prompt_relative:>9.4f}"
            )
        return "\n".join(lines)


def _token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per position in float64: logits [N, V], targets [N] -> [N]."""
    return token_cross_entropy(logits.to(torch.float64), targets)


def _g_stack(cache: Any) -> list[Tensor]:
    """G_LM per layer from a pass's G-cache, as float64 [B or 1, H, dk, dk] on the CPU."""
    return [e.G_LM.detach().to("cpu", torch.float64) for e in cache.g]


def _causal_pass(
    model: Any, seq: Tensor, g_full: list[Tensor], block: int
) -> tuple[Tensor, list[Tensor]]:
    """Each prefix ``seq[:t+1]`` (t = 0 .. L-2) on its own, left-padded into batches of ``block``
    rows: its next-token logits [L-1, vocab] and, per layer, the summed squared difference of
    its G_LM from the full pass's ``g_full``."""
    length = int(seq.shape[1])
    causal_logits = []
    sq_causal = [torch.zeros(()) for _ in g_full]
    for start in range(0, length - 1, block):
        ends = range(start + 1, min(start + block, length - 1) + 1)  # prefix lengths
        width = ends[-1]
        batch_ids = seq.new_full((len(ends), width), model.config.eos_id)  # any non-pad id
        mask = torch.zeros(len(ends), width, dtype=torch.long, device=seq.device)
        for row, end in enumerate(ends):
            batch_ids[row, width - end :] = seq[0, :end]
            mask[row, width - end :] = 1
        out = model(batch_ids, attention_mask=mask, logits_to_keep=1)
        causal_logits.append(out.logits[:, -1])
        for index, g in enumerate(_g_stack(out.cache)):
            # One G_LM per row ([1, ...] when it does not depend on the text: v510G).
            diff = g.expand(len(ends), -1, -1, -1) - g_full[index]
            sq_causal[index] = sq_causal[index] + diff.pow(2).sum()
    return torch.cat(causal_logits), sq_causal


def _layer_leaks(
    g_full: list[Tensor], g_prompt: list[Tensor], sq_causal: list[Tensor], prefixes: int
) -> list[LayerLeak]:
    """Per layer: how far the causal passes' and the prompt's G_LM are from the full pass's."""
    layers = []
    for index, (gf, gp) in enumerate(zip(g_full, g_prompt, strict=True)):
        rms = float(gf.pow(2).mean().sqrt())
        causal = float((sq_causal[index] / (gf.numel() * prefixes)).sqrt())
        prompt_rmse = float((gp - gf).pow(2).mean().sqrt())
        layers.append(
            LayerLeak(
                layer=index,
                g_rms_full=rms,
                g_rmse_causal=causal,
                g_rmse_causal_relative=causal / rms if rms > 0 else 0.0,
                g_rmse_prompt=prompt_rmse,
                g_rmse_prompt_relative=prompt_rmse / rms if rms > 0 else 0.0,
            )
        )
    return layers


@torch.no_grad()
def leak_audit(
    model: Any,
    ids: Sequence[int] | Tensor,
    prompt_len: int | None = None,
    block: int = DEFAULT_BLOCK,
    source: dict[str, Any] | None = None,
) -> LeakAudit:
    """Score ``ids`` (one text, [L] or [1, L]) as trained, causally and as generation does.

    ``prompt_len`` (default: half the text) is the prompt prefix P on which generation freezes A
    and G_LM; ``block`` the number of prefixes run per batch in the causal pass (memory grows with
    ``block * L``). Runs in eval mode and restores the model's mode.
    """
    device = _model_device(model)
    seq = _as_ids(ids, device)
    length = int(seq.shape[1])
    if length < 2:
        raise PLDRError("the text must have at least 2 tokens to score a next token")
    config = model.config
    if length > config.max_seq_len:
        raise PLDRError(
            f"the text has {length} tokens, more than max_seq_len={config.max_seq_len}; "
            "cut it (each position is scored within one context)"
        )
    if bool((seq == config.pad_id).any()):
        raise PLDRError(
            f"the text contains the padding id {config.pad_id}, which the model masks as a key; "
            "the audit needs text without it"
        )
    prompt_len = length // 2 if prompt_len is None else int(prompt_len)
    if not 1 <= prompt_len < length:
        raise PLDRError(f"the prompt length must be in [1, {length - 1}], got {prompt_len}")
    if block < 1:
        raise PLDRError(f"the block must be at least 1 prefix, got {block}")
    targets = seq[0, 1:]

    with _EvalMode(model):
        # As trained: the trainer's pass, inputs ids[:-1] (the last token is only a target).
        full = model(seq[:, :-1])
        loss_full = _token_losses(full.logits[0], targets)
        g_full = _g_stack(full.cache)

        causal_logits, sq_causal = _causal_pass(model, seq, g_full, block)
        loss_causal = _token_losses(causal_logits, targets)

        # Generation: the prompt pass, then the rest with its KV- and G-cache (A, G_LM frozen).
        prompt = model(seq[:, :prompt_len])
        rest = model(seq[:, prompt_len:-1], cache=prompt.cache) if prompt_len < length - 1 else None
        gen_logits = [prompt.logits[0, -1:]] + ([rest.logits[0]] if rest is not None else [])
        loss_gen = _token_losses(torch.cat(gen_logits), targets[prompt_len - 1 :])
        g_prompt = _g_stack(prompt.cache)

    layers = _layer_leaks(g_full, g_prompt, sq_causal, length - 1)
    lf, lc, lg = (x.cpu().numpy() for x in (loss_full, loss_causal, loss_gen))
    window = slice(prompt_len - 1, None)
    overall = {
        "full": float(lf.mean()),
        "causal": float(lc.mean()),
        "causal_minus_full": float(lc.mean() - lf.mean()),
        "full_window": float(lf[window].mean()),
        "causal_window": float(lc[window].mean()),
        "generation_window": float(lg.mean()),
        "causal_minus_full_window": float(lc[window].mean() - lf[window].mean()),
        "generation_minus_full_window": float(lg.mean() - lf[window].mean()),
        "generation_minus_causal_window": float(lg.mean() - lc[window].mean()),
    }
    if not all(np.isfinite(v) for v in overall.values()):
        raise PLDRError("the model produced non-finite losses on this text")
    return LeakAudit(
        num_tokens=length,
        prompt_len=prompt_len,
        block=block,
        loss_full=[float(v) for v in lf],
        loss_causal=[float(v) for v in lc],
        loss_generation=[float(v) for v in lg],
        layers=layers,
        overall=overall,
        source=dict(source or {}),
    )

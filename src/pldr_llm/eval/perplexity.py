"""Perplexity and bits per byte of a model on a text, offline (``pldr-llm eval --text FILE``).

The standard strided recipe: the text's ids are cut into windows of at most ``context`` ids that
start ``stride`` ids apart; each window scores only the ids no earlier window scored, so every id
is scored exactly once, with between ``context - stride`` and ``context`` ids of left context
(``stride == context``: disjoint windows, fastest; ``stride == 1``: always a full context, slowest).

The ids are the end-of-text id followed by the text's ids: the end-of-text id is the context of
the first token (as the original starts generation from it), so every token of the text is
scored and bits per byte cover every byte: ``bits_per_byte = total NLL / ln 2 / UTF-8 bytes``.

Unlike an ordinary causal LM, a PLDR-LLM's metric tensor ``A = LN(Q^T Q)`` sums over every
position of its input, so a token's score depends on the whole window, not only on its prefix.
Windows therefore follow the training convention exactly -- inputs ``ids[b:e]``, targets
``ids[b+1:e+1]`` -- so one window over a text gives its training loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.losses import token_cross_entropy

__all__ = ["PerplexityResult", "perplexity", "strided_windows"]


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` measured."""

    perplexity: float  #: ``exp(nll / tokens)``
    bits_per_byte: float  #: ``nll / ln 2 / bytes``
    nll: float  #: summed negative log-likelihood of every token, in nats
    tokens: int  #: tokens scored (every token of the text)
    bytes: int  #: UTF-8 bytes of the text
    windows: int  #: forward passes' rows
    context: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def strided_windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, first, last)`` per window over ``length`` ids.

    The window's input is ``ids[begin:last]`` (at most ``context`` ids) and it scores the targets
    ``ids[first..last]`` (inclusive), each predicted from the ids before it in the window.
    Position 0 is never a target (nothing precedes it).
    """
    if context < 1 or not 1 <= stride <= context:
        raise PLDRError(f"need 1 <= stride <= context, got context {context}, stride {stride}")
    windows, scored, begin = [], 0, 0
    while scored < length - 1:
        last = min(begin + context, length - 1)
        if last > scored:
            windows.append((begin, scored + 1, last))
            scored = last
        begin += stride
    return windows


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    text: str,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity and bits per byte of ``model`` on ``text`` (see the module docstring).

    Args:
        model: a :class:`~pldr_llm.PLDRModel` (its device and dtype are used as they are).
        tokenizer: a :class:`~pldr_llm.PLDRTokenizer`.
        text: the text (not empty).
        context: ids per window, at most the model's ``max_seq_len`` (default: that).
        stride: ids between window starts, 1..context (default: ``context // 2``, at least 1).
        batch_size: windows per forward pass.
    """
    if not text:
        raise PLDRError("the text to score is empty")
    max_len = int(model.config.max_seq_len)
    context = max_len if context is None else int(context)
    if not 1 <= context <= max_len:
        raise PLDRError(
            f"--context must be in 1..{max_len} (the model's max_seq_len), got {context}"
        )
    stride = max(1, context // 2) if stride is None else int(stride)
    if not 1 <= stride <= context:
        raise PLDRError(f"--stride must be in 1..{context} (the context), got {stride}")
    if batch_size < 1:
        raise PLDRError(f"--batch-size must be >= 1, got {batch_size}")
    eos = int(tokenizer.eos_id)
    ids = [eos, *tokenizer.encode(text, add_eos=False)]
    if len(ids) < 2:
        raise PLDRError("the text encodes to no token")
    device = next(model.parameters()).device
    sequence = torch.tensor(ids, dtype=torch.long, device=device)
    windows = strided_windows(len(ids), context, stride)
    # Windows of equal length batch without padding (padding would enter the metric tensor A
    # unless masked); all but the last one or two are `context` long.
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for window in windows:
        by_length.setdefault(window[2] - window[0], []).append(window)
    nll = 0.0
    was_training = model.training
    model.eval()
    try:
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                inputs = torch.stack([sequence[b:last] for b, _, last in chunk])
                logits = model(inputs).logits.float()
                for row, (b, first, last) in enumerate(chunk):
                    # Input position j predicts id b + j + 1; keep targets first..last.
                    scored = logits[row, first - b - 1 : last - b]
                    targets = sequence[first : last + 1]
                    nll += float(token_cross_entropy(scored, targets).double().sum())
    finally:
        model.train(was_training)
    tokens = len(ids) - 1
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(
        perplexity=math.exp(nll / tokens),
        bits_per_byte=nll / math.log(2) / n_bytes,
        nll=nll,
        tokens=tokens,
        bytes=n_bytes,
        windows=len(windows),
        context=context,
        stride=stride,
    )

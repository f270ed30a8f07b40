"""Log-probabilities as the OpenAI API reports them: per token its text, its logprob and the
``n`` most likely alternatives, for generated tokens and (``echo``) for the prompt's.

A token's ``text`` is its piece *in context*: the text its id adds to the decode of the ids
before it (:class:`~pldr_llm.generation.Detokenizer`, one id at a time), so leading spaces are
kept and the pieces of a row concatenate to its text. A character split over byte-fallback ids
is the text of the id that completes it (the ones before have ""). Alternatives are texts of the
id alone (leading space kept; a byte piece as ``bytes:\\xNN``, as OpenAI writes partial tokens).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pldr_llm.generation import Detokenizer

#: What OpenAI and vLLM report for a logprob of -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class TokenLogprob:
    """One token of a choice: its id, its text in context, its logprob (None: the prompt's first
    token, which has nothing before it) and the most likely alternatives ``(id, logprob)``."""

    token_id: int
    text: str
    logprob: float | None
    top: list[tuple[int, float]]


def finite(value: float) -> float:
    """``value`` as JSON can carry it (-inf: :data:`MIN_LOGPROB`)."""
    return value if math.isfinite(value) else MIN_LOGPROB


class TokenTexts:
    """The text of one id alone, as an alternative's key: decoded after the unknown id (as the
    Detokenizer does), so a leading space is kept; byte pieces as ``bytes:\\xNN``. Cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        unk = getattr(tokenizer, "unk_id", None)
        self._anchor = [unk] if isinstance(unk, int) else []
        self._anchor_len = len(tokenizer.decode(self._anchor)) if self._anchor else 0
        self._piece = getattr(tokenizer, "id_to_piece", None)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> str:
        return self.text_and_bytes(token_id)[0]

    def text_and_bytes(self, token_id: int) -> tuple[str, bytes]:
        """The id's text and its bytes (a byte piece: that one byte)."""
        cached = self._cache.get(token_id)
        if cached is None:
            byte = _BYTE_PIECE.fullmatch(self._piece(token_id)) if self._piece else None
            if byte is not None:
                value = int(byte.group(1), 16)
                cached = (f"bytes:\\x{value:02x}", bytes([value]))
            else:
                text = self.tokenizer.decode(self._anchor + [token_id])[self._anchor_len :]
                cached = (text, text.encode("utf-8"))
            self._cache[token_id] = cached
        return cached


class PieceTracker:
    """The :class:`TokenLogprob` of a generated row, released in step with its text.

    :meth:`add` takes each new token (with its logprob and alternatives) and its piece; the
    server's text of the row may lag (held back while it may be the start of a stop string) or
    end early (cut before a stop string), so :meth:`release` hands out only the tokens whose
    pieces lie inside the text sent so far, and at the end trims the pieces to the final text:
    the released pieces always concatenate to a prefix of the row's text, and at the end to all
    of it. Trailing ids whose text is still open (bytes of an unfinished character) are held, so
    that what the end adds (U+FFFD for a character cut off) has a token to go to.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._detok = Detokenizer(tokenizer, prompt_ids)
        self._held: list[TokenLogprob] = []
        self._released_chars = 0
        self._text_chars = 0

    def take(
        self,
        text: str,
        tokens: Sequence[int],
        logprobs: Sequence[float],
        tops: Sequence[list[tuple[int, float]]],
        final: bool = False,
    ) -> list[TokenLogprob]:
        """One event of the row: its text delta and its tokens (logprobs, alternatives); the
        tokens now inside the text received (``final``: the row's last event, all of them)."""
        for k, token in enumerate(tokens):
            self.add(token, logprobs[k], list(tops[k]) if k < len(tops) else [])
        self._text_chars += len(text)
        return self.release(self._text_chars, final)

    def add(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> None:
        piece = self._detok.push([token_id])
        self._held.append(TokenLogprob(token_id, piece, logprob, top))

    def release(self, text_chars: int, final: bool = False) -> list[TokenLogprob]:
        """The held tokens whose pieces end within the first ``text_chars`` characters of the
        row's text (``final``: all of them, their pieces cut at ``text_chars``)."""
        if final and self._held:
            self._held[-1].text += self._detok.finish()
        out = []
        while self._held:
            entry = self._held[0]
            end = self._released_chars + len(entry.text)
            if not final and not entry.text and not any(e.text for e in self._held):
                break  # the ids of a character still open: its text goes to the last of them
            if end > text_chars:
                if not final:
                    break
                entry.text = entry.text[: max(0, text_chars - self._released_chars)]
            out.append(self._held.pop(0))
            self._released_chars += len(entry.text)
        return out


def prompt_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The in-context text of each prompt id: they concatenate to ``tokenizer.decode(ids)``."""
    detok = Detokenizer(tokenizer, [])
    pieces = [detok.push([t]) for t in ids]
    if pieces:
        pieces[-1] += detok.finish()
    return pieces


def score_prompt(model: Any, ids: Sequence[int], top_n: int) -> list[tuple[float, list]]:
    """Per prompt token after the first: its logprob given the ones before and the ``top_n``
    alternatives, from one uncached pass over ``ids[:-1]`` -- the pass training and ``pldr-llm
    eval`` (``score_mode=full``) make, so the numbers are theirs. (The metric tensor A sees that
    whole input, so a position's logits also depend on the later input ids; see docs/deductive.md
    on the leak.) Runs on the server's worker thread."""
    import torch

    if len(ids) < 2:
        return []
    device = next(model.parameters()).device
    inputs = torch.tensor([list(ids[:-1])], dtype=torch.long, device=device)
    with torch.inference_mode():
        logits = model(inputs).logits[0].float()
        # logit - logsumexp where needed: no second [L, V] tensor (the log-softmax's values).
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        targets = torch.tensor(list(ids[1:]), dtype=torch.long, device=device)
        chosen = (logits.gather(1, targets[:, None]) - norm)[:, 0].tolist()
        if top_n > 0:
            values, indices = torch.topk(logits, top_n, dim=-1)
            values = values - norm
            tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        else:
            tops = [[] for _ in chosen]
    return list(zip(chosen, tops))


def completion_logprobs(
    entries: Sequence[TokenLogprob], texts: TokenTexts, offset: int = 0
) -> dict[str, Any]:
    """The ``logprobs`` object of ``/v1/completions``; ``offset``: where the first token's text
    starts in the choice's text (``text_offset``)."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [None if e.logprob is None else finite(e.logprob) for e in entries],
        "top_logprobs": [_top_dict(e, texts) for e in entries],
        "text_offset": offsets,
    }


def _top_dict(entry: TokenLogprob, texts: TokenTexts) -> dict[str, float] | None:
    """Alternatives keyed by text, most likely first (of two ids with one text, the likelier)."""
    if entry.logprob is None:
        return None
    top: dict[str, float] = {}
    for token_id, logprob in entry.top:
        top.setdefault(texts(token_id), finite(logprob))
    return top


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    """The ``logprobs`` object of ``/v1/chat/completions`` (``content``: one item per token)."""

    def item(text: str, raw: bytes, logprob: float | None) -> dict[str, Any]:
        value = finite(logprob) if logprob is not None else None
        return {"token": text, "logprob": value, "bytes": list(raw)}

    return {
        "content": [
            {
                **item(e.text, e.text.encode("utf-8"), e.logprob),
                "top_logprobs": [item(*texts.text_and_bytes(t), lp) for t, lp in e.top],
            }
            for e in entries
        ]
    }

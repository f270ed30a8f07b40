"""From ids to text: the final text of a row, stop strings, and its incremental detokenizer.

:func:`final_text` is what a row's text is (prompt and new ids decoded together, cut before the
earliest stop string in the new text). :class:`Detokenizer` gives the same text piece by piece as
ids arrive -- every delta final once returned -- and is the one streaming detokenizer: ``pldr-llm
generate --stream`` prints its deltas, the server sends them as stream chunks, and
:class:`StopStrings` asks it whether a row has reached a stop string.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

#: What a decoder writes for bytes that are not (yet) a whole UTF-8 character.
REPLACEMENT = "\ufffd"


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest match of any of ``stop`` in ``text``, else None."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def find_stop_ending_after(text: str, stop: Sequence[str], after: int) -> int | None:
    """Index of the earliest match of any of ``stop`` in ``text`` that ends past ``after``."""
    found = []
    for s in stop:
        i = text.find(s) if s else -1
        while i >= 0 and i + len(s) <= after:
            i = text.find(s, i + 1)
        if i >= 0:
            found.append(i)
    return min(found) if found else None


def final_text(
    tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int], stops: Sequence[str] = ()
) -> str:
    """The original's result: prompt and new ids decoded together, cut before a stop string."""
    text = tokenizer.decode(list(prompt_ids) + list(new_ids))
    if stops:
        start = len(tokenizer.decode(list(prompt_ids)))
        cut = find_stop(text[start:], stops)
        if cut is not None:
            text = text[: start + cut]
    return text


#: Per tokenizer, each id's text decoded after the anchor alone: what an id adds to a row whose
#: text is all committed (most ids of most rows), a pure function of the id, so it is decoded
#: once per process instead of once per token (``_ALONE_LIMIT`` ids at most).
_ALONE: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()
_ALONE_LIMIT = 1 << 18


def _alone_texts(tokenizer: Any) -> dict[int, str]:
    """The ids' texts of ``tokenizer`` decoded so far (a new dict for one that cannot be a
    weak key: kept for one row)."""
    try:
        texts = _ALONE.get(tokenizer)
        if texts is None:
            texts = _ALONE[tokenizer] = {}
        return texts
    except TypeError:
        return {}


class Detokenizer:
    """The text of a growing row, as deltas that never change once returned.

    ``push(ids)`` adds new ids and returns the text that is now safe to show; ``finish()``
    returns the rest. Together they are exactly ``final_text(tokenizer, prompt_ids, new_ids,
    stops)`` past the prompt's text (with ``echo=True``: including it, so a printer can show the
    prompt first), where ``new_ids`` (:attr:`new_ids`) are the ids pushed up to the one that
    completed a stop string; :attr:`stopped` is then set and later ids are ignored. That is the
    id at which :class:`StopStrings` stops a row, so a streamed row shows what the finished row
    prints.

    Held back, until it cannot change any more: ids whose text is still open (bytes of an
    incomplete UTF-8 character of byte-fallback pieces decode as U+FFFD until the last one
    comes), and the end of the new text where it is the beginning of a stop string.

    Each id costs the same at position 10 and 1000: text is committed (a prefix of every later
    decode) by decoding only the ids since the last commit, behind one anchor id. SentencePiece's
    decoding is piece by piece except for two things, which decide where text can be committed
    and why the anchor is there: consecutive byte pieces decode together (so a commit waits
    until the text does not end in U+FFFD: the bytes then end a whole character), and it drops
    the leading spaces of the text (every leading "▁" piece, not only the first), so the ids
    after a commit are decoded after the unknown id (never dropped, never a byte, its text
    " ⁇ " cut off again), not alone, and, while no text is committed yet, from the start.
    A push of several ids (the server's tokens of a block of steps) decodes them together, once,
    where that is what they give one by one: their text ends no character open and completes no
    stop string.

    Args:
        tokenizer: has ``decode(ids) -> str``; its ``unk_id``, where it has one, is the anchor
            (a tokenizer without one must decode id by id apart from byte runs, as
            :class:`~pldr_llm.data.ByteTokenizer` does).
        prompt_ids: the row's prompt.
        stops: stop strings (empty ones are ignored, as :func:`find_stop` does).
        echo: the deltas start with the prompt's text (``push([])`` returns it at once).
        stops_in_prompt: a stop string may begin in the prompt's text (it must still end in
            the new text), as transformers' ``stop_strings`` do; :attr:`stopped` is then what
            counts (the text is not cut inside the prompt).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stops: Sequence[str] = (),
        *,
        echo: bool = False,
        stops_in_prompt: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self._stops_in_prompt = stops_in_prompt
        self.stops = [s for s in stops if s]
        # A stop string with U+FFFD might match a character still open: ids go one by one.
        self._unsplittable = any(REPLACEMENT in s for s in self.stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._firsts = {s[0] for s in self.stops}
        unk = getattr(tokenizer, "unk_id", None)
        self._anchor = [unk] if isinstance(unk, int) else []
        self._alone = _alone_texts(tokenizer)
        self._anchor_len = len(tokenizer.decode(self._anchor)) if self._anchor else 0
        self._ids = [int(i) for i in prompt_ids]
        self._prompt_len = len(self._ids)
        #: The prompt's own text (``final_text`` cuts the new text at its length).
        self.prompt_text: str = tokenizer.decode(self._ids)
        self._start = len(self.prompt_text)  # where the new text, searched for stops, begins
        # The committed text is kept from ``_base`` on (``_buf``): what is not returned yet and
        # the last characters a stop string may still start in, so that a long row costs no
        # more per id than a short one. Positions below are in the whole text.
        if self.prompt_text and not self.prompt_text.endswith(REPLACEMENT):
            self._buf, self._read = self.prompt_text, len(self._ids)
        else:  # a prompt ending in half a character: nothing is committed yet
            self._buf, self._read = "", 0
        self._base = 0
        self._committed = len(self._buf)  # length of the committed text
        # Text of the ids past ``_read`` (the decode of all ids is committed text + ``_tail``).
        self._tail = self.prompt_text[len(self._buf) :]
        self._sent = 0 if echo else self._start  # characters of the text already returned
        self._end: int | None = None  # where the text ends, once a stop string is found
        self._finished = False
        #: A stop string was found; the text ends before it.
        self.stopped = False

    @property
    def new_ids(self) -> list[int]:
        """The ids pushed after the prompt, up to the one that completed a stop string."""
        return self._ids[self._prompt_len :]

    @property
    def new_count(self) -> int:
        """``len(new_ids)``, without copying them."""
        return len(self._ids) - self._prompt_len

    def push(self, ids: Iterable[int]) -> str:
        """Add new ids; return the text that is now safe to show (``push([])``: what is safe
        before any, e.g. the prompt with ``echo``). Ids after a stop string are ignored."""
        if self._finished:
            return ""
        ids = [int(token) for token in ids]
        if len(ids) < 2 or self.stopped or not self._push_whole(ids):
            for token in ids:
                if self.stopped:
                    break
                committed = self._committed
                self._ids.append(token)
                self._advance()
                self._search(committed)
        return self._take(self._safe_end())

    def finish(self) -> str:
        """The rest of the text: what was held back (the row has ended, so nothing changes)."""
        if self._finished:
            return ""
        self._finished = True
        # The last push already searched the whole decode for stop strings.
        end = self._end if self._end is not None else self._committed + len(self._tail)
        return self._take(end)

    # ------------------------------------------------------------------ internals
    def _push_whole(self, ids: list[int]) -> bool:
        """Add ``ids`` with one decode where that is what adding them one by one gives: their
        text does not end in U+FFFD (no character left open: one by one, the last id would
        commit it all, and the commits put together are this decode, as every commit is a
        prefix of the later decodes) and completes no stop string (one by one, no id would
        have found one: each search sees a prefix of this text, or one that ends in a
        character still open, which no stop string here holds). False: nothing changed (the
        caller adds them one by one, to find the id a stop string ends at)."""
        if self._unsplittable:
            return False
        if self._committed:
            ids_after = self._anchor + self._ids[self._read :] + ids
            tail = self.tokenizer.decode(ids_after)[self._anchor_len :]
        else:
            tail = self.tokenizer.decode(self._ids + ids)
        if not tail or tail.endswith(REPLACEMENT):
            return False
        if self.stops:
            start = max(0 if self._stops_in_prompt else self._start,
                        self._committed - self._longest + 1)  # fmt: skip
            text = (self._buf + tail)[start - self._base :]
            if find_stop_ending_after(text, self.stops, self._start - start) is not None:
                return False
        self._ids += ids
        self._buf += tail
        self._committed += len(tail)
        self._read = len(self._ids)
        self._tail = ""
        return True

    def _advance(self) -> None:
        """Decode the ids past the last commit; commit them if their text is whole."""
        decode = self.tokenizer.decode
        if self._committed:
            ids = self._ids[self._read :]
            tail = self._alone.get(ids[0]) if len(ids) == 1 else None
            if tail is None:
                tail = decode(self._anchor + ids)[self._anchor_len :]
                if len(ids) == 1 and len(self._alone) < _ALONE_LIMIT:
                    self._alone[ids[0]] = tail
        else:  # nothing committed: the ids so far may still lose their leading spaces
            tail = decode(self._ids)
        if tail and not tail.endswith(REPLACEMENT):
            self._buf += tail
            self._committed += len(tail)
            self._read = len(self._ids)
            tail = ""
        self._tail = tail

    def _text(self, start: int, end: int | None = None) -> str:
        """The whole text (committed and tail) from ``start`` (not before ``_base``)."""
        full = self._buf + self._tail
        return full[start - self._base : None if end is None else end - self._base]

    def _search(self, committed: int) -> None:
        """Look for a stop string in the new text that the last id changed. The text before
        ``committed`` was searched before, so a new match ends past it."""
        if not self.stops:
            return
        # The prompt's text was never searched: a match must end past it.
        start = max(0 if self._stops_in_prompt else self._start, committed - self._longest + 1)
        cut = find_stop_ending_after(self._text(start), self.stops, self._start - start)
        if cut is not None:
            self.stopped = True
            self._end = start + cut

    def _safe_end(self) -> int:
        """How far the text is final: the committed text, less a tail that starts a stop."""
        if self._end is not None:
            return self._end
        end = self._committed
        if not self.stops:
            return end
        # The longest end of the new text that a stop string starts with: text before it
        # cannot be part of a later match (a match inside the committed text was found).
        for i in range(max(self._start, self._sent, end - self._longest + 1), end):
            if self._buf[i - self._base] in self._firsts:
                rest = self._buf[i - self._base :]
                if any(s.startswith(rest) for s in self.stops):
                    return i
        return end

    def _take(self, end: int) -> str:
        """The text from what was returned up to ``end``; drop what no later step reads."""
        if end <= self._sent:
            return ""
        delta = self._text(self._sent, end)
        self._sent = end
        keep = min(self._sent, self._committed - max(self._longest - 1, 0))
        if keep > self._base:
            self._buf = self._buf[keep - self._base :]
            self._base = keep
        return delta


class StopStrings:
    """A ``stopping_criteria`` for :func:`~pldr_llm.core.generate.generate`: a row stops when its
    new text (what decoding prompt + new ids adds after the prompt's text) holds one of
    ``stops``. Each row's calls are one generation's (its new ids so far, one more each time);
    a :class:`Detokenizer` per row looks only at the text that changed (each id costs the same
    at any position). ``stops_in_prompt``: a stop string may begin in the prompt's text, as
    transformers' ``stop_strings`` do."""

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[Sequence[int]],
        stops: Sequence[str],
        *,
        stops_in_prompt: bool = False,
    ) -> None:
        self.rows = [
            Detokenizer(tokenizer, p, stops, stops_in_prompt=stops_in_prompt) for p in prompts
        ]
        self._seen = [0] * len(self.rows)  # ids of each row pushed so far

    def __call__(self, row: int, new_ids: list[int]) -> bool:
        detok = self.rows[row]
        detok.push(new_ids[self._seen[row] :])
        self._seen[row] = len(new_ids)
        return detok.stopped

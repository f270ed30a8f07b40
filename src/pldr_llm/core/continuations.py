"""A bounded record of the continuations ``generate()`` produced, for decoding them.

SentencePiece drops the leading "\u2581" of the first piece it decodes (the dummy prefix its
encoder put before a text). transformers' text-generation pipeline decodes the new ids of a
generation alone, where that space is a real one. ``PldrllmForCausalLM.generate`` records what
it produced here, and ``PldrllmTokenizer.decode`` keeps the first space of ids that begin one
of those continuations (see :mod:`.tokenization_pldrllm`).

Standard library only: the model's and the tokenizer's code (each may be a transformers folder's
copy) share this module.
"""

import collections
import threading
from collections.abc import Sequence
from typing import Any

# The newest continuations (new ids only): a bounded record, so a long-running process keeps
# only the recent ones.
_CONTINUATIONS: collections.deque[tuple[int, ...]] = collections.deque(maxlen=64)
_LOCK = threading.Lock()


def remember_continuations(sequences: Any, prompt_length: int) -> None:
    """Record the new ids of ``sequences`` ([B, prompt_length + new], what ``generate()``
    returned: a tensor or nested lists)."""
    rows = sequences.tolist() if hasattr(sequences, "tolist") else list(sequences)
    with _LOCK:
        for row in rows:
            new = tuple(int(i) for i in row[prompt_length:])
            if new:
                _CONTINUATIONS.append(new)


def begins_a_continuation(ids: Sequence[int]) -> bool:
    """Whether ``ids`` (non-empty) begins a continuation recorded by
    :func:`remember_continuations`."""
    key = tuple(int(i) for i in ids)
    if not key:
        return False
    with _LOCK:
        return any(c[: len(key)] == key for c in _CONTINUATIONS)

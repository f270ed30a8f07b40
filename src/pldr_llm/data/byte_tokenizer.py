"""A dependency-free byte-level tokenizer, for tests and quick experiments.

Ids follow the project's special-id layout: 0 padding, 1 unknown, 2 beginning of text, 3 end of
text; byte ``b`` is id ``b + 4``, so the vocabulary has 260 entries. Real runs use a SentencePiece
model (:mod:`pldr_llm.tokenizer`); this one exists so the data pipeline and the trainer can be
exercised without training a tokenizer first.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_OFFSET = 4


class ByteTokenizer:
    """UTF-8 bytes shifted past the four special ids."""

    vocab_size = 256 + _OFFSET
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str, add_eos: bool = True, add_bos: bool = False) -> list[int]:
        """Ids of ``text``'s UTF-8 bytes, with end-of-text (3) appended when ``add_eos``."""
        ids = [b + _OFFSET for b in text.encode("utf-8")]
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids are left out, invalid UTF-8 is replaced."""
        data = bytes(i - _OFFSET for i in ids if _OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

"""``PldrllmTokenizer``: the PLDR-LLM SentencePiece tokenizer as a transformers tokenizer.

It encodes exactly as :class:`pldr_llm.tokenizer.PLDRTokenizer` does, minus the end-of-text id:
transformers' causal-LM convention is that ``tokenizer(text)`` gives the prompt, and
``generate()`` continues it, which is what the original's ``generate_text`` does after it drops
that id. Decoding is SentencePiece's own (control ids decode to nothing).

Special pieces of PLDR-LLM tokenizers: pad 0 ``[PAD]``, unk 1 ``[UNK]``, start 2 ``[START]``,
end 3 ``[END]``. There is no beginning-of-text token in the transformers sense (the original never
adds the start id), so ``bos_token`` is unset and tools that need a prefix for an empty context
(lm-eval) fall back to the end-of-text id, as the original's models were trained.

Text is handed to SentencePiece whole: a literal ``[END]`` in the text is encoded as characters,
not as the end-of-text id, as the original does. Tokens added with ``add_tokens`` /
``add_special_tokens`` are the exception: each is matched in the text and encoded as its own id,
as in every transformers tokenizer (``split_special_tokens=False``).

Continuations keep their leading space. SentencePiece drops the leading "▁" of the first
piece it decodes: at the start of a text that is the dummy prefix its encoder added, but in the
middle of a text (what ``pipeline("text-generation")`` and ``TextStreamer(skip_prompt=True)``
decode: the new ids alone) it is a real space, and dropping it glues the first new word to the
prompt ("The listof ..."). ``decode(ids, continuation=True)`` keeps it. Without the argument, the
ids are a continuation when they begin a continuation ``generate()`` produced (see
:mod:`.continuations`); any other ids decode as a whole text, as before.

This file is copied into exported folders; of this package it imports only its sibling
``.continuations``.
"""

import os
import shutil
from typing import Any

from transformers import PreTrainedTokenizer

from .continuations import begins_a_continuation

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class PldrllmTokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer of PLDR-LLMs (``tokenizer.model`` of a model folder).

    Args:
        vocab_file: the SentencePiece ``.model`` file.
        add_bos_token / add_eos_token: add the start / end-of-text id when ``add_special_tokens``
            (both off: the causal-LM convention).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    #: ``decode`` takes ``continuation=`` (read by the model's ``generate()`` for streamers).
    decodes_continuations = True

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "[UNK]",
        eos_token: str = "[END]",
        pad_token: str = "[PAD]",
        bos_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        split_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        import sentencepiece as spm

        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.sp_model = spm.SentencePieceProcessor()
        # From bytes: SentencePiece's own file reader cannot open every non-ASCII path.
        with open(vocab_file, "rb") as handle:
            self.sp_model.LoadFromSerializedProto(handle.read())
        super().__init__(
            unk_token=unk_token,
            eos_token=eos_token,
            pad_token=pad_token,
            bos_token=bos_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            split_special_tokens=split_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return int(self.sp_model.get_piece_size())

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    @property
    def start_token_id(self) -> int:
        """The start id ([START], 2), which the original never adds."""
        return int(self.sp_model.bos_id())

    # ------------------------------------------------------------------ encode / decode
    # PreTrainedTokenizer.tokenize's own signature, which narrows PreTrainedTokenizerBase's.
    def tokenize(self, text: str, **kwargs: Any) -> list[str]:  # type: ignore[override]
        """Pieces of ``text``: each added token (``add_tokens``, ``add_special_tokens``, ids past
        the SentencePiece vocabulary) is its own piece; the rest is SentencePiece's encoding, in
        which the model's own special pieces (``[END]``, ...) are characters, as in the original.
        ``split_special_tokens=True`` encodes added tokens as characters too."""
        split = bool(kwargs.pop("split_special_tokens", self.split_special_tokens))
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        added = {
            token.content
            for index, token in self._added_tokens_decoder.items()
            if index >= self.vocab_size
        }
        if split or not added:
            return self._tokenize(text)
        from transformers.tokenization_python import Trie

        trie = Trie()
        for content in added:
            trie.add(content)
        pieces: list[str] = []
        for part in trie.split(text):
            if part in added:
                pieces.append(part)
            elif part:
                pieces.extend(self._tokenize(part))
        return pieces

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return list(self.sp_model.encode(text, out_type=str))

    def _convert_token_to_id(self, token: str) -> int:
        return int(self.sp_model.piece_to_id(token))

    def _convert_id_to_token(self, index: int) -> str:
        return str(self.sp_model.id_to_piece(int(index)))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return str(self.sp_model.decode_pieces(list(tokens)))

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        continuation: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Decode ``token_ids`` with SentencePiece (byte pieces, control ids: as the original).

        ``continuation``: the ids continue a text, so the first piece's leading space is kept
        (see the module docstring); ``None``: when they begin a ``generate()`` continuation.
        Added tokens decode to their content.
        """
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        if continuation is None:
            continuation = begins_a_continuation(ids)
        size, unk = self.vocab_size, int(self.sp_model.unk_id())
        pieces: list[str] = []
        run: list[int] = []  # SentencePiece ids not yet decoded
        for i in ids:
            if i >= size and i in self._added_tokens_decoder:
                pieces.append(self._decode_run(run, continuation or bool(pieces)))
                pieces.append(self._added_tokens_decoder[i].content)
                run = []
            else:
                run.append(i if 0 <= i < size else unk)
        pieces.append(self._decode_run(run, continuation or bool(pieces)))
        text = "".join(pieces)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def _decode_run(self, ids: list[int], keep_leading_space: bool) -> str:
        """SentencePiece's decoding of ``ids``; with ``keep_leading_space`` the first piece's
        "▁" decodes as a space, as it would after any other piece."""
        if not ids:
            return ""
        if not keep_leading_space:
            return str(self.sp_model.decode(ids))
        # Decode after an anchor piece, then drop the anchor's text: SentencePiece strips only a
        # text's first space, so the real first space survives (bytes and control ids decode as
        # they would anywhere).
        anchor = self._anchor_id()
        anchor_text = str(self.sp_model.decode([anchor]))
        return str(self.sp_model.decode([anchor, *ids]))[len(anchor_text) :]

    def _anchor_id(self) -> int:
        """A piece that decodes to visible text with no leading space (cached)."""
        cached = self.__dict__.get("_anchor")
        if cached is not None:
            return cached
        for piece_id in range(self.vocab_size):
            piece = self.sp_model.id_to_piece(piece_id)
            if (
                self.sp_model.is_control(piece_id)
                or self.sp_model.is_unknown(piece_id)
                or self.sp_model.is_byte(piece_id)
                or self.sp_model.is_unused(piece_id)
            ):
                continue
            if piece and not piece.startswith("▁") and str(self.sp_model.decode([piece_id])):
                self.__dict__["_anchor"] = piece_id
                return piece_id
        raise ValueError("the SentencePiece model has no plain piece to decode after")

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        start = [self.start_token_id] if self.add_bos_token else []
        end = [self.eos_token_id] if self.add_eos_token else []
        ids = start + list(token_ids_0) + end
        if token_ids_1 is not None:
            ids = ids + start + list(token_ids_1) + end
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids) | {self.start_token_id}
            return [1 if i in special else 0 for i in token_ids_0]
        start = [1] if self.add_bos_token else []
        end = [1] if self.add_eos_token else []
        mask = start + [0] * len(token_ids_0) + end
        if token_ids_1 is not None:
            mask = mask + start + [0] * len(token_ids_1) + end
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        per_sequence = int(self.add_bos_token) + int(self.add_eos_token)
        return per_sequence * (2 if pair else 1)

    # ------------------------------------------------------------------ saving
    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory} is not a folder")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, target)
            else:
                with open(target, "wb") as handle:
                    handle.write(self.sp_model.serialized_model_proto())
        return (target,)

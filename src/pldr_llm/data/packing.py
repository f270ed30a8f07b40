"""Fixed-length samples from tokenized documents: ``pack``, ``pad`` and ``nopad``.

The original prepares data in groups of ``batch_size * batch_agg_count`` tokenized documents (each
ending with the end-of-text id). A group's documents are concatenated and cut into samples of a
fixed number of ids; what happens to the last, shorter piece depends on the padding type:

``pack``
    The short remainder is carried over and put in front of the next group's ids, so no sample is
    ever padded. The remainder left after the last group of the stream is dropped.
``pad``
    The short remainder becomes one more sample, right-padded with the padding id (0). Nothing is
    carried over.
``nopad``
    The short remainder is dropped (the original left it short, which cannot be batched).

This module holds the pure function that does it for one group; the streaming, shuffling and
batching live in :mod:`pldr_llm.data.batches`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from pldr_llm.core.errors import PLDRError

PADDING_TYPES = ("pack", "pad", "nopad")


def check_padding_type(padding_type: str) -> str:
    """Return ``padding_type`` if it is one of :data:`PADDING_TYPES`, else raise PLDRError."""
    if padding_type not in PADDING_TYPES:
        raise PLDRError(
            f"padding_type must be one of {', '.join(PADDING_TYPES)}, got {padding_type!r}"
        )
    return padding_type


def chunk_group(
    token_lists: Iterable[Sequence[int]],
    sample_length: int,
    padding_type: str = "pack",
    carry: Sequence[int] = (),
    pad_id: int = 0,
) -> tuple[torch.Tensor, list[int]]:
    """Cut one group of tokenized documents into samples of ``sample_length`` ids.

    Args:
        token_lists: the group's documents, already tokenized (with their end-of-text id).
        sample_length: ids per sample (the trainer uses ``context_length + 1``).
        padding_type: ``"pack"``, ``"pad"`` or ``"nopad"`` (see the module docstring).
        carry: ids left over from the previous group; only ``pack`` may pass a non-empty one.
        pad_id: the id that fills the last sample in ``pad`` mode.

    Returns:
        ``(samples, carry_out)``: a LongTensor ``[n, sample_length]`` (``n`` may be 0) and the ids
        to put in front of the next group (non-empty only for ``pack``, always shorter than
        ``sample_length``).
    """
    check_padding_type(padding_type)
    if sample_length < 1:
        raise PLDRError(f"sample length must be at least 1, got {sample_length}")
    if carry and padding_type != "pack":
        raise PLDRError(f"padding_type {padding_type!r} carries nothing between groups")
    import torch  # here, not at module level: config checks must not wait for torch

    ids = torch.tensor(list(itertools.chain(carry, *token_lists)), dtype=torch.long)
    full = ids.numel() // sample_length
    samples = ids[: full * sample_length].view(full, sample_length)
    rest = ids[full * sample_length :]
    if padding_type == "pack":
        return samples, rest.tolist()
    if padding_type == "pad" and rest.numel():
        last = torch.full((1, sample_length), pad_id, dtype=torch.long)
        last[0, : rest.numel()] = rest
        samples = torch.cat([samples, last])
    return samples, []

"""KV-cache and G-cache of a PLDR-LLM.

The KV-cache holds, per decoder layer, the rotary-embedded keys, the values and the metric tensor
``A`` learned from the prompt's queries. The G-cache holds, per layer, the deductive outputs that
PLGA needs to attend: ``A_LM`` and the energy-curvature tensor ``G_LM`` (and ``A_P`` when known).
With a G-cache the whole metric learner and power-law step are skipped: G_LM is inferred once.

Besides the tensors, the cache tracks which cached keys are real tokens (``key_valid``) and the
rotary position of the next token of every row (``next_position``), so batched rows of different
lengths decode exactly as they would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerKV:
    """One layer's KV-cache: keys and values [B, H, T, dk], metric tensor A [B, H, dk, dk]."""

    key: Tensor
    value: Tensor
    metric_tensor: Tensor | None

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The cached keys/values followed by the new ones (new tensors; the cache is unchanged)."""
        return torch.cat((self.key, keys), dim=-2), torch.cat((self.value, values), dim=-2)


@dataclass
class StaticLayerKV:
    """A preallocated KV-cache layer for static decoding (see :mod:`pldr_llm.generation`).

    ``key`` and ``value`` are [B, H, T_max, dk] buffers whose addresses never change; ``append``
    writes one new key/value per row in place, row ``b`` at slot ``write_index[b]`` ([B] long, on
    the device), and returns the whole buffers. Slots not yet written hold stale values: the
    caller's attention bias must mask them.
    """

    key: Tensor
    value: Tensor
    write_index: Tensor
    metric_tensor: Tensor | None = None

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        batch, heads, _, depth = self.key.shape
        index = self.write_index.view(batch, 1, 1, 1).expand(batch, heads, 1, depth)
        self.key.scatter_(-2, index, keys.to(self.key.dtype))
        self.value.scatter_(-2, index, values.to(self.value.dtype))
        return self.key, self.value


@dataclass
class GCacheEntry:
    """One layer's G-cache: A_LM and G_LM ([B or 1, H, dk, dk]); A_P when it was computed."""

    A_LM: Tensor | None
    G_LM: Tensor
    A_P: Tensor | None = None


@dataclass
class PLDRCache:
    """The caches a forward pass returns and a later pass may reuse.

    ``kv`` is ``None`` (no KV-cache) or one :class:`LayerKV` per layer; ``g`` is ``None`` (no
    G-cache: G_LM is computed from A) or one :class:`GCacheEntry` per layer.
    """

    kv: list[LayerKV] | None = None
    g: list[GCacheEntry] | None = None
    key_valid: Tensor | None = None  # [B, T] bool: False where a cached key is padding
    next_position: Tensor | None = None  # [B] long: rotary position of each row's next token
    per_row: bool = field(default=False)  # True when built with an explicit attention_mask

    @property
    def seq_len(self) -> int:
        """Number of cached key positions (0 without a KV-cache)."""
        if not self.kv:
            return 0
        return int(self.kv[0].key.shape[-2])

    def drop_kv(self) -> PLDRCache:
        """The same cache without its KV part (keeps the G-cache)."""
        return PLDRCache(kv=None, g=self.g)

    def drop_g(self) -> PLDRCache:
        """The same cache without its G part (keeps the KV-cache)."""
        return PLDRCache(
            kv=self.kv,
            g=None,
            key_valid=self.key_valid,
            next_position=self.next_position,
            per_row=self.per_row,
        )

    def with_g(self, g: list[GCacheEntry] | None) -> PLDRCache:
        """The same KV-cache with another G-cache."""
        return PLDRCache(
            kv=self.kv,
            g=g,
            key_valid=self.key_valid,
            next_position=self.next_position,
            per_row=self.per_row,
        )

    @classmethod
    def from_g_list(
        cls, entries: Sequence[tuple[Tensor | None, Tensor] | GCacheEntry | Tensor]
    ) -> PLDRCache:
        """A G-only cache from ``(A_LM, G_LM)`` pairs (or bare G_LM tensors), one per layer.

        Tensors of shape [H, dk, dk] are given a batch dimension of 1, which broadcasts.
        """
        return cls(kv=None, g=g_entries(entries))

    def select_rows(self, rows: Tensor) -> PLDRCache:
        """Keep only the batch rows ``rows`` (used when batched generation drops finished rows)."""

        def pick(t: Tensor | None) -> Tensor | None:
            if t is None or t.shape[0] == 1:
                return t
            return t.index_select(0, rows)

        kv = None
        if self.kv is not None:
            kv = [LayerKV(pick(e.key), pick(e.value), pick(e.metric_tensor)) for e in self.kv]
        g = None
        if self.g is not None:
            g = [GCacheEntry(pick(e.A_LM), pick(e.G_LM), pick(e.A_P)) for e in self.g]
        return PLDRCache(
            kv=kv,
            g=g,
            key_valid=pick(self.key_valid),
            next_position=pick(self.next_position),
            per_row=self.per_row,
        )


def _batched(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    return t.unsqueeze(0) if t.dim() == 3 else t


def g_entries(
    entries: Sequence[tuple[Tensor | None, Tensor] | GCacheEntry | Tensor],
) -> list[GCacheEntry]:
    """Normalize a G list (pairs, entries or bare G_LM tensors) into :class:`GCacheEntry` items."""
    out = []
    for item in entries:
        if isinstance(item, GCacheEntry):
            out.append(GCacheEntry(_batched(item.A_LM), _batched(item.G_LM), _batched(item.A_P)))
        elif isinstance(item, Tensor):
            out.append(GCacheEntry(None, _batched(item)))
        else:
            a_lm, g_lm = item[0], item[1]
            out.append(GCacheEntry(_batched(a_lm), _batched(g_lm)))
    return out


def register_pytree_dataclass(cls: type) -> type:
    """Make a dataclass a pytree node, so tensors inside model outputs are visible to PyTorch's
    tree utilities (FSDP2 registers its pre-backward hooks on the forward's output tensors, and
    torch.compile flattens outputs the same way)."""
    try:
        from torch.utils._pytree import register_dataclass

        register_dataclass(cls)
    except (ImportError, TypeError, ValueError):  # older torch, or registered already
        pass
    return cls


for _cls in (LayerKV, StaticLayerKV, GCacheEntry, PLDRCache):
    register_pytree_dataclass(_cls)

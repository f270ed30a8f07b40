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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from .errors import PLDRError

#: A tensor or an optional one: a helper typed with it keeps "never None" for a Tensor argument.
_MaybeTensor = TypeVar("_MaybeTensor", Tensor, Tensor | None)


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
    """A preallocated KV-cache layer for static decoding (see :mod:`pldr_llm.core.engine`).

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
        return self.with_g(None)

    def with_g(self, g: list[GCacheEntry] | None) -> PLDRCache:
        """The same KV-cache with another G-cache."""
        return dataclasses.replace(self, g=g)

    @classmethod
    def from_g_list(cls, entries: GInit) -> PLDRCache:
        """A G-only cache from a G list (see :func:`g_entries`), one entry per layer.

        Tensors of shape [H, dk, dk] are given a batch dimension of 1, which broadcasts.
        """
        return cls(kv=None, g=g_entries(entries))

    def select_rows(self, rows: Tensor) -> PLDRCache:
        """Keep only the batch rows ``rows`` (used when batched generation drops finished rows)."""

        def pick(t: _MaybeTensor) -> _MaybeTensor:
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

    # ---------------------------------------------------------------- transformers' cache API
    # transformers' generate() reorders beams, and assisted / prompt-lookup decoding roll back
    # rejected draft tokens, through these methods (in place, as its Cache classes do).

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Keep, in place, the batch rows ``beam_idx`` (beam search's reordering)."""
        chosen = self.select_rows(beam_idx.to(self._device()))
        for name in ("kv", "g", "key_valid", "next_position"):
            setattr(self, name, getattr(chosen, name))

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep, in place, the batch rows ``indices``."""
        self.reorder_cache(indices)

    @property
    def is_croppable(self) -> bool:
        """Always: cropping drops cached keys/values; the metric tensor A and the G-cache come
        from the prompt, which no crop reaches in transformers' use (rejected draft tokens)."""
        return True

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether it is a linear-attention (recurrent) layer: none is."""
        return [False] * max(1, len(self.kv or self.g or ()))

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Nothing to do: this cache keeps every position, so a crop needs no recorded past."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached key positions (transformers' name for :attr:`seq_len`)."""
        return self.seq_len

    def crop(self, max_length: int) -> None:
        """Drop cached positions in place: ``max_length`` < 0 removes the last ``-max_length``,
        > 0 keeps the first ``max_length`` (transformers' two conventions), 0 changes nothing.

        A G-only cache (no KV part) holds no positions and is unchanged.
        """
        length = self.seq_len
        keep = length + max_length if max_length < 0 else (max_length or length)
        if not self.kv or keep >= length:
            return
        if keep < 0:
            raise PLDRError(f"cannot crop {-max_length} positions from a cache of {length}")
        dropped_valid = None
        if self.key_valid is not None:
            dropped_valid = self.key_valid[:, keep:]
            self.key_valid = self.key_valid[:, :keep]
        if self.next_position is not None and dropped_valid is not None:
            self.next_position = self.next_position - dropped_valid.long().sum(1)
        self.kv = [
            LayerKV(e.key[..., :keep, :], e.value[..., :keep, :], e.metric_tensor) for e in self.kv
        ]

    def _device(self) -> torch.device:
        for tensor in (self.key_valid, self.next_position):
            if tensor is not None:
                return tensor.device
        if self.kv:
            return self.kv[0].key.device
        if self.g:
            return self.g[0].G_LM.device
        return torch.device("cpu")


#: A G_init, or any G list: a :class:`PLDRCache` (its G-cache); a tensor whose first dimension is
#: the layer; or a sequence with, per layer, a G_LM tensor, an ``(A_LM, G_LM)`` pair (A_LM may be
#: ``None``) or an object with ``A_LM``/``G_LM`` attributes (:class:`GCacheEntry`, ``Deductive``).
GInit = PLDRCache | Tensor | Sequence[Any]


def _layer_tensor(t: Any, what: str) -> Tensor | None:
    """One tensor of a G list, checked; [H, dk, dk] given a batch dimension of 1 (it broadcasts)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise PLDRError(f"{what} is a {type(t).__name__}, not a tensor")
    if t.dim() < 2 or t.shape[-1] != t.shape[-2]:
        raise PLDRError(f"{what} has shape {list(t.shape)}; expected [..., dk, dk]")
    if t.is_sparse or t.is_complex() or not t.is_floating_point():
        raise PLDRError(f"{what} has dtype {t.dtype}; expected a real floating-point tensor")
    return t.unsqueeze(0) if t.dim() == 3 else t


def g_entries(source: GInit) -> list[GCacheEntry]:
    """Any G list (see :data:`GInit`) as one :class:`GCacheEntry` per layer.

    The one reading of a G list: G files load through it, G_init and ``save_g_file`` accept what
    it accepts. Tensors keep their device and dtype; [H, dk, dk] ones get a batch dimension of 1.
    Raises :class:`PLDRError` for anything else, and when layers differ in shape.
    """
    # Duck-typed, not isinstance: a cache made by a copy of this module (a transformers folder's
    # code) must read the same.
    if hasattr(source, "g") and not isinstance(source, (Tensor, list, tuple)):
        cache: Any = source  # duck-typed: a PLDRCache-like object
        source = cache.g
        if source is None:
            raise PLDRError("the cache holds no G-cache")
    if isinstance(source, Tensor):
        if source.dim() < 3:
            raise PLDRError(f"a G tensor of shape {list(source.shape)} has no layer dimension")
        source = list(source.unbind(0))
    if not isinstance(source, (list, tuple)) or not source:
        raise PLDRError(f"expected a non-empty list of per-layer G_LM, got {type(source).__name__}")
    entries = []
    for i, item in enumerate(source):
        if isinstance(item, Tensor):
            a_lm, g_lm, a_p = None, item, None
        elif hasattr(item, "G_LM"):
            a_lm, g_lm, a_p = getattr(item, "A_LM", None), item.G_LM, getattr(item, "A_P", None)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            (a_lm, g_lm), a_p = item, None
        else:
            raise PLDRError(
                f"layer {i} is a {type(item).__name__}; expected a G_LM tensor or an "
                "[A_LM, G_LM] pair"
            )
        g = _layer_tensor(g_lm, f"layer {i} G_LM")
        if g is None:
            raise PLDRError(f"layer {i} has no G_LM")
        entries.append(
            GCacheEntry(
                _layer_tensor(a_lm, f"layer {i} A_LM"), g, _layer_tensor(a_p, f"layer {i} A_P")
            )
        )
    shape = entries[0].G_LM.shape
    for i, e in enumerate(entries):
        if e.G_LM.shape != shape:
            raise PLDRError(
                f"layer {i} G_LM has shape {list(e.G_LM.shape)}, layer 0 has {list(shape)}"
            )
        if e.A_LM is not None and e.A_LM.shape != shape:
            raise PLDRError(
                f"layer {i} A_LM has shape {list(e.A_LM.shape)} but G_LM has {list(shape)}"
            )
    return entries


def check_g_init(
    config: Any, entries: Sequence[GCacheEntry], rows: int | None = None, what: str = "G_init"
) -> None:
    """Raise :class:`PLDRError` unless ``entries`` fit a model of ``config`` (a ``PLDRConfig``):
    one per layer, each tensor [1, H, dk, dk] -- or [rows, H, dk, dk] when ``rows`` is given (a
    G_init per batch row, which transformers' own decoding loop accepts). ``what`` names the
    entries in the message."""
    if len(entries) != config.num_layers:
        raise PLDRError(f"{what} has {len(entries)} layers, the model has {config.num_layers}")
    want = (config.num_heads, config.depth, config.depth)
    batches = (1,) if rows is None else (1, rows)
    for index, e in enumerate(entries):
        for name, t in (("A_LM", e.A_LM), ("G_LM", e.G_LM), ("A_P", e.A_P)):
            if t is not None and (t.dim() != 4 or t.shape[0] not in batches or t.shape[1:] != want):
                first = "1" if rows is None or rows == 1 else f"1 or {rows}"
                raise PLDRError(
                    f"{what} {name} of layer {index} has shape {list(t.shape)}, the model needs "
                    f"[{first}, {want[0]}, {want[1]}, {want[2]}] (batch, num_heads, dk, dk)"
                )


class _ModelLike(Protocol):
    """What :func:`prepare_g_init` reads of a :class:`~pldr_llm.core.model.PLDRModel`."""

    @property
    def config(self) -> Any: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...


def prepare_g_init(
    model: _ModelLike, source: GInit | None, rows: int | None = None
) -> list[GCacheEntry] | None:
    """A G_init for ``model``: read by :func:`g_entries`, checked by :func:`check_g_init` and
    cast to the model's device and dtype; ``None`` stays ``None``.

    Every place that accepts a G_init goes through here (``pldr_llm.generate``, the decoding
    engine, transformers' ``generate``, lm-eval, the CLI). A G file is read first with
    :func:`pldr_llm.gfile.load_g_file`.
    """
    if source is None:
        return None
    entries = g_entries(source)
    check_g_init(model.config, entries, rows)
    device, dtype = model.device, model.dtype

    def cast(t: _MaybeTensor) -> _MaybeTensor:
        return None if t is None else t.to(device=device, dtype=dtype)

    return [GCacheEntry(cast(e.A_LM), cast(e.G_LM), cast(e.A_P)) for e in entries]


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

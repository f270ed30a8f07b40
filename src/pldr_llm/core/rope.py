"""Rotary position embedding, in the two layouts published PLDR-LLMs use.

* ``interleaved=True`` (the original's, ``reference_rope: true`` in the authors' transformers
  format): feature pairs are (0, 1), (2, 3), ..., and the rotation is computed in float32 whatever
  the input dtype, then cast back: that is what the original's checkpoints expect.
* ``interleaved=False`` (``reference_rope: false``): transformers' Llama rotate-half layout, pairs
  (i, i + dk/2), with ``rope_scaling`` (``linear`` or ``llama3``) applied to the frequencies as
  transformers does. As in transformers, the cos/sin tables are computed in float32 and the
  rotation itself runs in the input's dtype.

The base is ``rope_theta`` (10000 in the original).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import PLDRConfig


def inverse_frequencies(dim: int, base: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """``1 / base^(2i/dim)`` for i < dim/2 (float32), with transformers' ``rope_scaling`` applied."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        assert scaling is not None
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1's frequency-dependent scaling: long wavelengths divided by ``factor``, short
        # ones kept, and a smooth interpolation between the two bands.
        assert scaling is not None
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary embedding with a precomputed cos/sin table of ``max_seq_len`` rows [L, dk/2]."""

    cos: Tensor  # buffers (register_buffer below)
    sin: Tensor

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        base: float = 10000.0,
        interleaved: bool = True,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.interleaved = interleaved
        self.scaling = scaling
        cos, sin = self.tables()
        # Not saved in checkpoints: the original's state dicts have no rotary tables.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def from_config(cls, config: PLDRConfig) -> RotaryEmbedding:
        """The rotary embedding a model of ``config`` uses in every layer."""
        return cls(
            config.depth,
            config.max_seq_len,
            config.rope_theta,
            interleaved=config.reference_rope,
            scaling=config.rope_scaling,
        )

    def tables(self) -> tuple[Tensor, Tensor]:
        """Freshly computed (cos, sin) tables [max_seq_len, dk] on the CPU, float32.

        They are laid out for :meth:`rotate`, which computes ``x * cos + partner(x) * sin``:
        ``partner`` swaps each feature with the one it is rotated with, and the sign of the
        sine sits in the table (``-sin`` for the first feature of each pair). Because
        ``a * c + b * (-s)`` rounds exactly like ``a * c - b * s``, this is the same arithmetic
        as the two-formula rotation of the original, in three element-wise kernels.
        """
        with torch.device("cpu"):
            theta = inverse_frequencies(self.dim, self.base, self.scaling)
            positions = torch.arange(self.max_seq_len, dtype=theta.dtype)
            angles = torch.outer(positions, theta).float()  # [L, dk/2]
            cos, sin = torch.cos(angles), torch.sin(angles)
            if self.interleaved:  # pairs (2i, 2i + 1)
                return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
            return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)  # pairs (i, i + dk/2)

    def rotation(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The float32 (cos, sin) rows of ``positions`` ([L] shared, or [B, L] per row) for
        :meth:`rotate`: [..., L, 1, dk], broadcast over heads. Every layer rotates at the same
        positions, so a forward computes this once."""
        # Positions are checked against max_seq_len by PLDRModel.forward (and by the decoding
        # loop) before they get here: a check here would read a device value back.
        return self.cos[positions][..., None, :], self.sin[positions][..., None, :]

    def rotate(self, x: Tensor, rotation: tuple[Tensor, Tensor]) -> Tensor:
        """Rotate ``x`` [B, L, H, dk] by ``rotation`` (from :meth:`rotation`)."""
        cos, sin = rotation
        if not self.interleaved:  # as transformers: the rotation runs in the input's dtype
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            half = self.dim // 2
            partner = torch.cat((x[..., half:], x[..., :half]), dim=-1)
            return x * cos + partner * sin
        # The original rotates in float32 whatever the input dtype, then casts back.
        xf = x.float()
        partner = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return (xf * cos + partner * sin).type_as(x)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` [B, L, H, dk] at ``positions`` ([L] shared, or [B, L] per row)."""
        return self.rotate(x, self.rotation(positions))


def row_positions(valid: Tensor) -> Tensor:
    """Rotary positions [B, L] of a per-row mask ``valid`` [B, L] (bool): each row counts only its
    tokens, so padding moves no token's position (padding itself gets its left neighbour's, or 0).
    Reads nothing back to the host (the captured padded forward builds its positions with it)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)

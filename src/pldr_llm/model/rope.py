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
    from pldr_llm.config import PLDRConfig


def inverse_frequencies(dim: int, base: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """``1 / base^(2i/dim)`` for i < dim/2 (float32), with transformers' ``rope_scaling`` applied."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])  # type: ignore[index]
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
        """Freshly computed (cos, sin) tables on the CPU, float32."""
        with torch.device("cpu"):
            theta = inverse_frequencies(self.dim, self.base, self.scaling)
            positions = torch.arange(self.max_seq_len, dtype=theta.dtype)
            angles = torch.outer(positions, theta).float()
            return torch.cos(angles), torch.sin(angles)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` [B, L, H, dk] at ``positions`` ([L] shared, or [B, L] per row)."""
        # Positions are checked against max_seq_len by PLDRModel.forward (and by the fast paths'
        # constructors) before they get here: a check here would read a device value per layer.
        cos = self.cos[positions][..., None, :]  # [L, 1, dk/2] or [B, L, 1, dk/2]: over heads
        sin = self.sin[positions][..., None, :]
        if not self.interleaved:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            first, second = x[..., : self.dim // 2], x[..., self.dim // 2 :]
            return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        x_even, x_odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1)
        return rotated.flatten(-2).type_as(x)

"""Rotary position embedding in the interleaved pair layout PLDR-LLM was trained with.

Feature pairs are (0, 1), (2, 3), ... (not the half-split layout of Llama in transformers), the
base is 10000, and the rotation is computed in float32 whatever the input dtype, then cast back:
that is what the original's checkpoints expect.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Interleaved-pair rotary embedding with a precomputed cos/sin table of ``max_seq_len`` rows."""

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        theta = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        positions = torch.arange(max_seq_len, dtype=theta.dtype)
        angles = torch.outer(positions, theta).float()
        # Not saved in checkpoints: the original's state dicts have no rotary tables.
        self.register_buffer("cos", torch.cos(angles), persistent=False)
        self.register_buffer("sin", torch.sin(angles), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` [B, L, H, dk] at ``positions`` ([L] shared, or [B, L] per row)."""
        # Positions are checked against max_seq_len by PLDRModel.forward (and by the fast paths'
        # constructors) before they get here: a check here would read a device value per layer.
        cos = self.cos[positions][..., None, :]  # [L, 1, dk/2] or [B, L, 1, dk/2]: over heads
        sin = self.sin[positions][..., None, :]
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        x_even, x_odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1)
        return rotated.flatten(-2).type_as(x)

"""The rotary embedding's three-kernel form against the two-formula rotation it replaces.

The original rotates pairs as ``(a cos - b sin, b cos + a sin)``; :class:`RotaryEmbedding`
computes ``x * cos + partner(x) * sin_signed``. ``a * c + b * (-s)`` rounds exactly like
``a * c - b * s`` in IEEE arithmetic, so the two must agree bit for bit (no tolerance).
"""

from __future__ import annotations

import pytest
import torch

from pldr_llm.core.rope import RotaryEmbedding, inverse_frequencies


def two_formula_rotation(rope: RotaryEmbedding, x: torch.Tensor, positions: torch.Tensor):
    theta = inverse_frequencies(rope.dim, rope.base, rope.scaling)
    angles = torch.outer(torch.arange(rope.max_seq_len, dtype=theta.dtype), theta).float()
    cos = torch.cos(angles)[positions][..., None, :]
    sin = torch.sin(angles)[positions][..., None, :]
    if not rope.interleaved:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        first, second = x[..., : rope.dim // 2], x[..., rope.dim // 2 :]
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).type_as(x)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("per_row", [False, True])
def test_rotation_equals_the_two_formula_rotation_bit_for_bit(interleaved, dtype, per_row):
    torch.manual_seed(0)
    scaling = None if interleaved else {"rope_type": "linear", "factor": 2.0}
    rope = RotaryEmbedding(16, 64, 10000.0, interleaved=interleaved, scaling=scaling)
    x = torch.randn(3, 7, 4, 16).to(dtype)
    positions = torch.randint(0, 64, (3, 7)) if per_row else torch.arange(20, 27)
    got = rope(x, positions)
    want = two_formula_rotation(rope, x, positions)
    assert got.dtype == x.dtype
    assert torch.equal(got, want)
    # A rotation computed once serves every call at the same positions (what a forward does).
    assert torch.equal(rope.rotate(x, rope.rotation(positions)), want)


def test_rotation_preserves_norms_of_pairs():
    rope = RotaryEmbedding(8, 32)
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    out = rope(x, torch.arange(5))
    norms = x.unflatten(-1, (-1, 2)).norm(dim=-1)
    assert torch.allclose(out.unflatten(-1, (-1, 2)).norm(dim=-1), norms, atol=1e-12)
    assert not torch.allclose(out[:, 1:], x[:, 1:])  # positions > 0 actually rotate

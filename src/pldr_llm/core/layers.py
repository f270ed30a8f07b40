"""Building blocks shared by the decoder and the metric learner: the SwiGLU-style GLU variant."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "tanh": F.tanh,
    "sigmoid": F.sigmoid,
}


def xavier_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """A Linear initialized like the original (Xavier-uniform weight, zero bias)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class GLU(nn.Module):
    """``gluw3(act(gluw1 x) * gluw2 x)`` (SwiGLU for act = SiLU); ``bias=False`` drops the biases."""

    def __init__(
        self, d_in: int, hidden: int, d_out: int, activation: str = "silu", bias: bool = True
    ) -> None:
        super().__init__()
        self.gluw1 = xavier_linear(d_in, hidden, bias)
        self.gluw2 = xavier_linear(d_in, hidden, bias)
        self.gluw3 = xavier_linear(hidden, d_out, bias)
        self.activation = ACTIVATION_FUNCTIONS[activation]

    def forward(self, x: Tensor, packed: PackedLinear | None = None) -> Tensor:
        """``packed`` (gluw1 and gluw2 as one matrix, see :class:`PackedLinear`) computes both
        input projections with one matrix product."""
        if packed is None:
            return self.gluw3(self.activation(self.gluw1(x)) * self.gluw2(x))
        gate, up = packed(x).chunk(2, dim=-1)
        return self.gluw3(self.activation(gate) * up)


class PackedLinear:
    """Several Linear layers of one input packed into one weight (rows stacked) for inference:
    one matrix product instead of several, which is what decoding one token is made of.

    The packed tensors are copies: :meth:`refresh` copies the layers' weights again (into the
    same tensors, so a captured CUDA graph stays valid) when any of them changed in place
    (their version counters) or was replaced.
    """

    def __init__(self, layers: tuple[nn.Linear, ...]) -> None:
        self.layers = layers
        with torch.no_grad():
            self.weight = torch.cat([layer.weight for layer in layers])
            biases: list[Tensor] = [layer.bias for layer in layers if layer.bias is not None]
            self.bias = torch.cat(biases) if len(biases) == len(layers) else None
        self._seen = self._state()

    def _state(self) -> list[tuple[int, int]]:
        tensors = [t for layer in self.layers for t in (layer.weight, layer.bias) if t is not None]
        return [(t._version, t.data_ptr()) for t in tensors]

    def refresh(self) -> None:
        """Copy the layers' weights again if any changed since the last copy."""
        state = self._state()
        if state == self._seen:
            return
        with torch.no_grad():
            torch.cat([layer.weight for layer in self.layers], out=self.weight)
            if self.bias is not None:
                torch.cat([layer.bias for layer in self.layers], out=self.bias)
        self._seen = state

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

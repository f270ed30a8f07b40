"""Building blocks shared by the decoder and the metric learner: the SwiGLU-style GLU variant."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATION_FUNCTIONS = {
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

    def forward(self, x: Tensor) -> Tensor:
        return self.gluw3(self.activation(self.gluw1(x)) * self.gluw2(x))

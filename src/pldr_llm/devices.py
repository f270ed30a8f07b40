"""Which device to run on: :func:`resolve_device`, for the loaders, the CLI and the trainer."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pldr_llm.core.errors import PLDRError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device"]


def resolve_device(spec: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available) as a usable
    ``torch.device`` (None: cpu).

    ``local_rank`` (a process of a multi-GPU run) turns ``"cuda"`` and ``"auto"`` into that
    process's GPU, ``cuda:<local_rank mod GPUs>``; without it ``"cuda"`` is the current GPU.
    An unknown name, or CUDA on a machine without it, is a PLDRError.
    """
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = str(spec or "cpu").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise PLDRError(f"unknown device {spec!r}: use cpu, cuda or cuda:N")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PLDRError(f"device {spec!r} asked for, but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is None and local_rank is not None:
            return torch.device("cuda", local_rank % max(count, 1))
        if device.index is not None and device.index >= count:
            raise PLDRError(
                f"device {spec!r} does not exist: this machine has {count} CUDA device(s)"
            )
    return device

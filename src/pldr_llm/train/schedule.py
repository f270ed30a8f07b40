"""Learning-rate schedule: linear warm-up, then cosine decay to ``alpha * lr``.

This is the schedule of the original PLDR-LLM trainer. The multiplier at optimizer step ``s`` is

* ``s / warmup_steps`` while ``s <= warmup_steps`` (so step 0 runs at rate 0: the first update of a
  run changes nothing, which is why the first two losses of a fresh run are equal),
* ``alpha + (1 - alpha) * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2``
  after that, and
* ``alpha`` once ``s >= total_steps`` (the step is clamped, so a run longer than the schedule keeps
  training at the floor rate instead of climbing back up the cosine).

``total_steps`` is its own setting (``lr_total_steps``): stopping a run early or extending it never
reshapes the curve.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pldr_llm.core.errors import PLDRError

if TYPE_CHECKING:  # torch is imported lazily so that config validation stays fast
    import torch
    from torch.optim.lr_scheduler import LambdaLR

__all__ = ["lr_multiplier", "WarmupCosineSchedule", "build_scheduler", "restore_scheduler"]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, alpha: float = 0.0) -> float:
    """Factor applied to the peak learning rate at optimizer step ``step`` (0-based)."""
    total = float(total_steps)
    warmup = float(warmup_steps)
    s = min(float(step), total)
    if warmup > 0 and s <= warmup:
        return s / warmup
    if total <= warmup:  # no decay phase at all: stay at the peak
        return 1.0
    progress = (s - warmup) / (total - warmup)
    return alpha + (1.0 - alpha) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Picklable callable form of :func:`lr_multiplier` for :class:`~torch.optim.lr_scheduler.LambdaLR`.

    A plain object (not a closure) so the scheduler's ``state_dict`` can be saved and restored.
    """

    def __init__(self, total_steps: int, warmup_steps: int, alpha: float = 0.0) -> None:
        validate_schedule(total_steps, warmup_steps, alpha)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.alpha = float(alpha)

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.total_steps, self.warmup_steps, self.alpha)

    def __repr__(self) -> str:
        return (
            f"WarmupCosineSchedule(total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, alpha={self.alpha})"
        )


def validate_schedule(total_steps: int, warmup_steps: int, alpha: float) -> None:
    """Raise :class:`PLDRError` naming the offending key for an impossible schedule."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise PLDRError(f"'lr_total_steps' must be a positive integer, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise PLDRError(f"'warmup_steps' must be a non-negative integer, got {warmup_steps!r}")
    if warmup_steps > total_steps:
        raise PLDRError(
            f"'warmup_steps' ({warmup_steps}) must not exceed 'lr_total_steps' ({total_steps})"
        )
    if not 0.0 <= float(alpha) <= 1.0:
        raise PLDRError(f"'lr_alpha' must be between 0 and 1, got {alpha!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, alpha: float = 0.0
) -> LambdaLR:
    """A :class:`LambdaLR` that applies :func:`lr_multiplier` to every parameter group.

    Call ``scheduler.step()`` once after each optimizer step; ``scheduler.get_last_lr()[0]`` is
    then the rate the *next* step will use.
    """
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, WarmupCosineSchedule(total_steps, warmup_steps, alpha))


def restore_scheduler(scheduler: LambdaLR, saved: dict, step: int, learning_rate: float) -> None:
    """Move ``scheduler`` (and its optimizer's rates) to a checkpoint's position.

    The schedule's position comes from the checkpoint (``saved``: its scheduler's state); its
    shape and peak learning rate from this run's config (a resumed run may lower
    ``train.learning_rate``): this scheduler's own state, moved to the saved step, through the
    scheduler's ``load_state_dict``.
    """
    optimizer = scheduler.optimizer
    own = scheduler.state_dict()
    own["base_lrs"] = [learning_rate] * len(optimizer.param_groups)
    own["last_epoch"] = saved["last_epoch"]
    own["_step_count"] = saved.get("_step_count", own.get("_step_count"))
    own["_last_lr"] = [b * scheduler.lr_lambdas[0](step) for b in own["base_lrs"]]
    scheduler.load_state_dict(own)
    for group, base, lr in zip(optimizer.param_groups, own["base_lrs"], own["_last_lr"]):
        group["initial_lr"] = base
        group["lr"] = lr

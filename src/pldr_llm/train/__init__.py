"""Pretraining PLDR-LLMs: :class:`Trainer`, :class:`TrainConfig`, schedule, FSDP2, checkpoints.

Typical use::

    from pldr_llm.train import Trainer, TrainConfig

    trainer = Trainer(model, TrainConfig(learning_rate=1e-3, warmup_steps=100, lr_total_steps=1000))
    for batch in batches:                 # LongTensor [B, L + 1]
        out = trainer.train_step(batch)   # {"loss", "accuracy", "lr", ...}

or the whole run, with metrics, checkpoints, resume and export: ``trainer.fit(batches, run_dir)``.
See ``docs/training.md``.

Only :mod:`pldr_llm.train.config` and :mod:`pldr_llm.train.schedule` load without torch, so that
``pldr-llm train`` can reject a bad config before the (slow) torch import; the trainer is imported
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pldr_llm.train.config import TrainConfig
from pldr_llm.train.schedule import WarmupCosineSchedule, build_scheduler, lr_multiplier

if TYPE_CHECKING:
    from pldr_llm.train.trainer import FitResult, NonFiniteLossError, Trainer

__all__ = [
    "Trainer",
    "TrainConfig",
    "FitResult",
    "NonFiniteLossError",
    "lr_multiplier",
    "build_scheduler",
    "WarmupCosineSchedule",
]

_LAZY = {"Trainer", "FitResult", "NonFiniteLossError"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from pldr_llm.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'pldr_llm.train' has no attribute {name!r}")

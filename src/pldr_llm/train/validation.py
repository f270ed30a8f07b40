"""Validation of a training run: :func:`evaluate` (loss and accuracy over held-out batches) and
:class:`Validator`, which owns when :meth:`Trainer.fit <pldr_llm.train.trainer.Trainer.fit>`
validates and where the result is written."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pldr_llm.core.losses import dag_regularizer, weighted_dag
from pldr_llm.train.distributed import all_ranks, all_reduce_sum

if TYPE_CHECKING:
    from pldr_llm.train.loop import MetricsLogger

__all__ = ["Validator", "evaluate"]


@torch.no_grad()
def evaluate(trainer: Any, batches: Any, max_batches: int | None = None) -> dict[str, Any]:
    """Mean loss and accuracy of ``trainer.model`` over up to ``max_batches`` batches (all ranks,
    token-weighted), with the loss a training step takes (:meth:`Trainer._lm_loss_terms`).

    ``batches`` is an iterable of [B, L+1] batches; one with ``reset()`` is reset first, so
    every validation sees the same data. Ranks that run out early wait for the others.
    """
    use_dag = trainer.config.use_dag_loss
    device = trainer.device
    reset = getattr(batches, "reset", None)
    if callable(reset):
        reset()
    iterator = iter(batches)
    trainer.model.eval()
    # ce_sum, correct, tokens, dag_A*B, dag_A_P*B, dag_G*B (+ sequences below)
    stats = torch.zeros(6, dtype=torch.float64, device=device)
    n_seqs = torch.zeros(1, dtype=torch.float64, device=device)
    done = 0
    while max_batches is None or done < max_batches:
        batch = next(iterator, None)
        have = batch is not None
        if trainer.sharded:  # every rank runs the same number of forward passes
            have = all_ranks(have, device)
        if not have:
            break
        assert batch is not None  # a rank with no batch left stopped above with the others
        batch = batch.to(device).long()
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if trainer.levers["cuda_graphs"]:
            torch.compiler.cudagraph_mark_step_begin()
        with trainer._autocast():
            out, ce_sum, correct = trainer._lm_loss_terms(
                inputs, targets, output_deductive=use_dag, output_scores=False
            )
        stats[0] += ce_sum.double()
        stats[1] += correct.double()
        stats[2] += (targets != trainer.pad_id).sum().double()
        if use_dag:
            for k, value in enumerate(dag_regularizer(out.deductive)):
                stats[3 + k] += value.double() * batch.shape[0]
        n_seqs += batch.shape[0]
        done += 1
    if trainer.sharded:
        all_reduce_sum(stats)
        all_reduce_sum(n_seqs)
    dag_coeffs = trainer.config.dag_reg_coeffs if use_dag else None
    return _figures(stats.tolist(), float(n_seqs.item()), done, dag_coeffs)


def _figures(
    values: list[float], sequences: float, batches: int, dag_coeffs: Any | None
) -> dict[str, Any]:
    """The result of :func:`evaluate` from its sums (DAG terms unless ``dag_coeffs`` is None)."""
    tokens = max(values[2], 1.0)
    result: dict[str, Any] = {
        "val_loss": values[0] / tokens if values[2] else float("nan"),
        "val_accuracy": values[1] / tokens if values[2] else float("nan"),
        "val_tokens": int(values[2]),
        "val_batches": batches,
    }
    if dag_coeffs is not None:
        dag = [v / max(sequences, 1.0) for v in values[3:6]]
        result.update(
            val_dag_A=dag[0], val_dag_A_P=dag[1], val_dag_G=dag[2], val_lm_loss=result["val_loss"]
        )
        result["val_loss"] = result["val_lm_loss"] + weighted_dag(dag, dag_coeffs)
    return result


class Validator:
    """When a run validates (every ``val_every`` steps, and once more at the end of a completed
    run whose last step was not a multiple) and where the result goes (an ``event: val`` record
    and a line for the user). Without validation data or ``val_every`` it never validates."""

    def __init__(self, trainer: Any, val_data: Any, metrics: MetricsLogger) -> None:
        self.trainer = trainer
        self.val_data = val_data
        self.metrics = metrics
        self.every = trainer.config.val_every if val_data is not None else None
        self.max_batches = trainer.config.val_batches

    def should_validate(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0  # type: ignore[operator]

    def validate(self, announce: bool = True) -> dict[str, Any]:
        """Validate now; write the record (and, with ``announce``, a line for the user)."""
        trainer = self.trainer
        val = evaluate(trainer, self.val_data, self.max_batches)
        self.metrics.writer.write({"event": "val", "step": trainer.step, **val})
        if announce:
            self.metrics.progress.write(
                f"step {trainer.step}: val_loss {val['val_loss']:.4f} "
                f"val_accuracy {val['val_accuracy']:.4f}"
            )
            self.metrics.pause()
        return val

    def validate_at_end(self) -> None:
        """The final figure of a completed run that trained, unless its last step had one."""
        if self.every and self.metrics.record is not None:
            if not self.should_validate(self.trainer.step):
                self.validate(announce=False)

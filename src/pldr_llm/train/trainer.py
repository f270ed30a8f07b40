"""The PLDR-LLM trainer: one optimizer step (:meth:`Trainer.step_async`; :meth:`Trainer.train_step`
runs it and reads its figures back at once) and the run loop (:meth:`Trainer.fit`, over the
components of :mod:`pldr_llm.train.loop` and :mod:`pldr_llm.train.validation`) with metrics,
validation, checkpoints, resume, clean shutdown and the export of :mod:`pldr_llm.train.export`.

One step, as in the original: inputs ``batch[:, :-1]``, targets ``batch[:, 1:]``; masked
cross-entropy (padding id 0 ignored) plus, optionally, the DAG regularizer
``c_A dag_A + c_AP dag_A_P + c_G dag_G``; backward; gradient clipping by value; AdamW (betas
0.9/0.95, eps 1e-5, decoupled weight decay); the learning-rate schedule advances once per step.

Loss normalization across micro-batches and ranks: the loss of a step is the mean over *all*
non-padding target tokens of the global batch (not a mean of per-rank means), so one process and N
processes compute the same gradient from the same global batch even when padding is spread
unevenly. The DAG terms, means over (layers, batch, heads), are weighted by sequences the same way.

This step is also the fast path: on a GPU it runs with the speed levers of
:meth:`TrainConfig.levers` (SDPA, the loss inside the model's forward, compiled layers with CUDA
graphs, fused AdamW) and never waits for the device; ``docs/training.md`` explains each lever and
how far the result may drift from the eager arithmetic.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.losses import dag_loss, masked_ce_sum_and_hits, weighted_dag
from pldr_llm.core.model import PLDRModel
from pldr_llm.train.config import TrainConfig
from pldr_llm.train.distributed import (
    DistEnv,
    all_reduce_sum,
    current_env,
    resolve_device,
    shard_model,
)
from pldr_llm.train.export import export_run
from pldr_llm.train.loop import (
    Checkpointer,
    EpochTracker,
    MetricsLogger,
    end_epoch,
    stop_on_signals,
)
from pldr_llm.train.prefetch import PreparedBatch, prepare_batch
from pldr_llm.train.schedule import build_scheduler, restore_scheduler
from pldr_llm.train.validation import Validator, evaluate

__all__ = ["Trainer", "FitResult", "NonFiniteLossError", "PendingStep", "PreparedBatch"]

logger = logging.getLogger("pldr_llm.train")


# The figures one step keeps on the device: cross-entropy sum, arg-max hits, the three DAG
# terms (sequence-weighted), non-finite flag, stop flag, non-padding targets, sequences.
_STATS = ("ce_sum", "correct", "dag_A", "dag_A_P", "dag_G", "bad", "stop", "tokens", "sequences")


@dataclass
class PendingStep:
    """A step whose figures are still on the device (:meth:`Trainer.read_steps` reads them)."""

    step: int
    lr: float
    stats: torch.Tensor


class NonFiniteLossError(PLDRError):
    """Raised when more than ``max_nonfinite_steps`` steps had a NaN/inf loss or gradient."""


@dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended.

    ``status`` is ``"completed"`` (reached the end), ``"interrupted"`` (SIGTERM/SIGINT: a
    checkpoint was saved; run again to resume) or ``"diverged"`` (too many non-finite steps).
    """

    status: str
    step: int
    signal: int | None = None
    last_checkpoint: Path | None = None
    export_dir: Path | None = None
    last_metrics: dict[str, Any] | None = None


class Trainer:
    """Trains a :class:`~pldr_llm.core.model.PLDRModel` with the original PLDR-LLM recipe.

    Args:
        model: the model to train. When a process group is initialized (always under
            ``pldr-llm train``, one process or many) it is sharded in place with FSDP2; the
            trained module is ``trainer.model`` either way.
        config: the :class:`TrainConfig`.
        env: where this process stands (rank, world, device); default: from the current
            process group and ``config.device``.
        shard: shard with FSDP2 (default: whenever a process group is initialized).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        env: DistEnv | None = None,
        shard: bool | None = None,
    ) -> None:
        self.config = config
        if env is None:
            base = current_env()
            device = resolve_device(config.device, base.local_rank)
            env = DistEnv(
                base.rank, base.world_size, base.local_rank, base.local_world_size, device
            )
        self.env = env
        self.device = env.device
        self.pad_id = int(getattr(getattr(model, "config", None), "pad_id", 0))
        self.batch_size = config.resolve_batch_size(env.world_size)
        if (
            config.use_dag_loss
            and getattr(getattr(model, "config", None), "version", "") == "v510G"
        ):
            raise PLDRError(
                "'dag_reg_coeffs' needs a model that learns G_LM (version v510), not v510G"
            )
        model.to(self.device)
        # Before compiling and sharding: the checkpoint then sits inside each compiled layer
        # (traced, recomputed within the layer's graph) and inside each FSDP unit's hooks.
        _apply_model_options(model, config)
        if shard is None:
            # With one process FSDP's sharding is the identity but still costs its hooks and
            # copies (about +45% per step for the tiny preset on a CPU): a plain module computes
            # the same numbers, and checkpoints load either way.
            shard = env.distributed and env.world_size > 1
        if shard:
            # The decoder layers also return their KV tensors, which are views; FSDP2 warns about
            # in-place ops on returned views, and the trainer never does any.
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            shard_model(
                model,
                env,
                strategy=config.fsdp_sharding_strategy,
                cpu_offload=config.fsdp_cpu_offload,
                mixed_precision=not config.disable_fsdp_mixed_precision,
                reduce_dtype=config.fsdp_reduce_dtype,
                prefetch=config.backward_prefetch,
            )
        self.sharded = bool(shard)
        self.model = model
        #: the speed levers in effect (TrainConfig.levers for this device, with FSDP or not)
        self.levers = config.levers(self.device.type, sharded=self.sharded)
        if self.levers["compile_layers"]:
            from pldr_llm.core.compile import compile_decoder_layers

            options = {"mode": "reduce-overhead"} if self.levers["cuda_graphs"] else {}
            compile_decoder_layers(model, **options)
        self._forward_module: Callable[..., Any] = torch.compile(model) if config.compile else model
        vocab = getattr(getattr(model, "config", None), "input_vocab_size", None)
        self._vocab: int | None = int(vocab) if vocab is not None else None
        self.amp = self.device.type == "cuda" and not config.disable_amp
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=config.learning_rate,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            fused=True if self.levers["fused_optimizer"] else None,
        )
        self.scheduler = build_scheduler(
            self.optimizer, config.lr_total_steps, config.warmup_steps, config.lr_alpha
        )
        #: optimizer steps taken so far (skipped non-finite steps count: they consumed a batch)
        self.step = 0
        self.nonfinite_steps = 0
        self.tokens_seen = 0
        self._context = 0
        #: set (e.g. by a signal handler) to make every rank stop after the current step
        self.stop_requested = False
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ one step
    def prepare_batch(self, batch: torch.Tensor | list | tuple) -> PreparedBatch:
        """Check and split a raw batch [B, L+1] on the host (thread-safe; no device work): see
        :func:`pldr_llm.train.prefetch.prepare_batch`."""
        return prepare_batch(
            batch,
            self.config.grad_accum_steps,
            pad_id=self.pad_id,
            vocab=self._vocab,
            pin=self.device.type == "cuda",
        )

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _gradient_sync(self, enabled: bool) -> None:
        # FSDP2: skip the reduce-scatter on all but the last micro-batch of a step.
        setter = getattr(self.model, "set_requires_gradient_sync", None)
        if self.sharded and setter is not None:
            setter(enabled)

    def train_step(
        self, batch: torch.Tensor | list[torch.Tensor] | PreparedBatch
    ) -> dict[str, Any]:
        """One optimizer step on ``batch`` [B, L+1] (or a list of micro-batches).

        The batch is split into ``grad_accum_steps`` micro-batches. Returns ``loss`` (the
        objective: cross-entropy plus weighted DAG terms), ``accuracy``, ``lr`` (the rate this
        step used), ``tokens`` (non-padding targets, all ranks), ``sequences``, ``skipped``
        (non-finite loss or gradient: no update), ``stop`` (a rank asked to stop) and, with the
        DAG loss, ``lm_loss``, ``dag_A``, ``dag_A_P``, ``dag_G``.

        This reads the step's figures back from the device at once; :meth:`fit` runs the same
        step (:meth:`step_async`) and reads a whole log interval of them in one go.
        """
        return self.read_steps([self.step_async(batch)])[0]

    def step_async(self, batch: torch.Tensor | list[torch.Tensor] | PreparedBatch) -> PendingStep:
        """:meth:`train_step` without reading anything back: the figures stay on the device
        (pass the result to :meth:`read_steps`). No host synchronization on a GPU with the
        default levers: ids are checked and counted on the CPU copy, a non-finite step is
        skipped by the fused optimizer itself (``found_inf``, as under a gradient scaler)."""
        prep = batch if isinstance(batch, PreparedBatch) else self.prepare_batch(batch)
        cfg = self.config
        device = self.device
        world = self.env.world_size if self.sharded else 1
        use_dag = cfg.use_dag_loss

        if self.sharded:
            # Global counts normalize every micro-batch's loss; they stay on the device.
            counts = prep.counts.to(device, non_blocking=True)
            all_reduce_sum(counts)
            # FSDP averages gradients over ranks; scaling by the world size undoes it, so the
            # gradient is that of the global token mean.
            token_scale: Any = world / counts[0].clamp(min=1.0)
            seq_total: Any = counts[1]
        else:
            token_scale = 1.0 / max(prep.tokens, 1)
            seq_total = float(prep.sequences)

        lr = float(self.optimizer.param_groups[0]["lr"])
        self.model.train()
        stats = torch.zeros(len(_STATS), dtype=torch.float64, device=device)
        for index, mb in enumerate(prep.micro):
            if self.levers["cuda_graphs"]:
                # CUDA-graph trees: a new step begins, earlier outputs may be overwritten.
                torch.compiler.cudagraph_mark_step_begin()
            mb = mb.to(device, non_blocking=True).long()
            self._context = mb.shape[1] - 1
            inputs, targets = mb[:, :-1], mb[:, 1:]
            self._gradient_sync(index == len(prep.micro) - 1)
            forward_kwargs: dict[str, Any] = {
                "output_deductive": use_dag,
                "output_scores": False,  # the DAG terms need A_LM, A_P, G_LM, not the scores
                "key_padding": prep.padded[index],
                "check_ids": False,  # checked on the CPU copy in prepare_batch
            }
            with self._autocast():
                out, ce_sum, correct = self._lm_loss_terms(inputs, targets, **forward_kwargs)
                loss = ce_sum * token_scale
                if use_dag:
                    dag_total, dag_values = dag_loss(out.deductive, cfg.dag_reg_coeffs)
                    loss = loss + (mb.shape[0] / seq_total * world) * dag_total
            loss.backward()
            with torch.no_grad():
                stats[0] += ce_sum.detach().double()
                stats[1] += correct.double()
                if use_dag:
                    for k, value in enumerate(dag_values):
                        stats[2 + k] += value.detach().double() * (mb.shape[0] / seq_total)
            del out, loss

        with torch.no_grad():
            # One reduction carries every figure and flag of the step (no host read).
            stats[5] = (~torch.isfinite(stats[:5])).any().double() + self._nan_gradients()
            # Host values go in with one asynchronous copy (writing a Python number into a
            # device tensor would wait for the device).
            host = torch.tensor(
                [1.0 if self.stop_requested else 0.0, float(prep.tokens), float(prep.sequences)],
                dtype=torch.float64,
            )
            if device.type == "cuda":
                host = host.pin_memory()
            stats[6:9].copy_(host, non_blocking=True)
            if self.sharded:
                all_reduce_sum(stats)  # tokens and sequences summed too: the global counts
            bad = stats[5] > 0

        if cfg.clip_grad_value is not None:
            nn.utils.clip_grad_value_(self.model.parameters(), cfg.clip_grad_value)
        if self.levers["fused_optimizer"]:
            # Fused AdamW skips the whole update (and its step count) where found_inf is 1,
            # deciding on the device, the way it does under torch.amp's GradScaler.
            self.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
            self.optimizer.step()
        elif not bool(bad):  # a host read: free on the CPU, one sync a step on a GPU
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The schedule follows the step count (as in the original, whose scheduler steps
        # whatever the gradient scaler decided).
        with warnings.catch_warnings():
            # torch warns when the scheduler steps without an optimizer step: intended here.
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            self.scheduler.step()
        self.step += 1
        return PendingStep(self.step, lr, stats)

    def _lm_loss_terms(
        self, inputs: torch.Tensor, targets: torch.Tensor, **forward_kwargs: Any
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """The forward's output, the summed cross-entropy over non-padding targets and the
        arg-max hits -- of a training step and of validation alike.

        With the ``chunked_loss`` lever the loss is taken inside the forward, a chunk of rows at
        a time from the hidden states (the [B, L, vocab] float32 logits never exist, which at
        the paper's vocabulary is gigabytes a batch); otherwise from full logits.
        """
        if self.levers["chunked_loss"]:
            out = self._forward_module(inputs, labels=targets, **forward_kwargs)
            count = (targets != self.pad_id).sum()
            ce_sum = torch.where(count > 0, out.loss * count, out.loss.new_zeros(()))
            return out, ce_sum, out.correct
        out = self._forward_module(inputs, **forward_kwargs)
        ce_sum, correct = masked_ce_sum_and_hits(out.logits, targets, self.pad_id)
        return out, ce_sum, correct

    def flops_per_token(self, context: int) -> float:
        """Training FLOPs per token at ``context``
        (:func:`pldr_llm.train.flops.training_flops_per_token`: the metric learner and the
        attention included); 0 for a model without a PLDR config."""
        from pldr_llm.train.flops import training_flops_per_token

        config = getattr(self.model, "config", None)
        return training_flops_per_token(config, context) if config is not None else 0.0

    def read_steps(self, pending: list[PendingStep]) -> list[dict[str, Any]]:
        """The results of steps run by :meth:`step_async` (one host read for all of them).

        Counts skipped steps, warns about each, and marks ``diverged`` on the step that went
        past ``max_nonfinite_steps``. Adds the steps' tokens to ``tokens_seen``.
        """
        if not pending:
            return []
        table = torch.stack([p.stats for p in pending]).tolist()
        cfg = self.config
        results = []
        for item, values in zip(pending, table):
            result = _step_result(item, values, cfg.dag_reg_coeffs, cfg.use_dag_loss)
            self.tokens_seen += result["tokens"]
            if result["skipped"]:
                self.nonfinite_steps += 1
                if _skipped_too_often(result, self.nonfinite_steps, cfg.max_nonfinite_steps):
                    result["diverged"] = True
            results.append(result)
        return results

    def _nan_gradients(self) -> torch.Tensor:
        """Number of gradient tensors holding a NaN, as a device scalar.

        inf gradients are clipped to +-clip_grad_value like in the original; NaN cannot be.
        """
        grads = []
        for param in self.model.parameters():
            grad = param.grad
            if grad is None:
                continue
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            if local.numel():
                grads.append(local)
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        # One fused norm per group of tensors instead of two kernels per parameter (~700
        # launches a step at 110M): a norm is NaN exactly when its tensor holds a NaN (an inf
        # alone gives inf).
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        return torch.isnan(norms).sum().to(device=self.device, dtype=torch.float64)

    def evaluate(self, batches: Any, max_batches: int | None = None) -> dict[str, Any]:
        """Mean loss and accuracy over ``batches`` (:func:`pldr_llm.train.validation.evaluate`)."""
        return evaluate(self, batches, max_batches)

    def state_dict(self) -> dict[str, Any]:
        """Trainer counters and the scheduler (the model and optimizer go through DCP)."""
        return {
            "step": self.step,
            "nonfinite_steps": self.nonfinite_steps,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        # Its position from the checkpoint, its peak learning rate from this run's config.
        restore_scheduler(
            self.scheduler, dict(state["scheduler"]), self.step, self.config.learning_rate
        )

    # ------------------------------------------------------------------ the run
    def fit(
        self,
        train_data: Any,
        run_dir: str | Path,
        *,
        val_data: Any = None,
        resume: bool = True,
        tokenizer_file: str | Path | None = None,
        export_dir: str | Path | None = None,
    ) -> FitResult:
        """Train until ``max_steps`` (or ``epochs``), with metrics, checkpoints and resume.

        ``train_data`` yields [B, L+1] batches; if it has ``state_dict``/``load_state_dict`` its
        position is checkpointed (exact resume) and if it has ``epoch`` that is the epoch logged.
        With ``resume``, the newest complete checkpoint in ``run_dir/checkpoints`` is loaded
        first. SIGTERM/SIGINT stop after the current step with a checkpoint. A completed run is
        exported to ``export_dir`` (default ``run_dir``): :func:`pldr_llm.train.export.export_run`.
        """
        cfg, total = self.config, self.config.total_steps()
        run_dir = Path(run_dir)
        if self.env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLogger(self, run_dir)
        checkpointer = Checkpointer(self, run_dir, metrics)
        epochs = EpochTracker(self, train_data)
        validator = Validator(self, val_data, metrics)
        status, export = "completed", Path(export_dir) if export_dir is not None else run_dir
        restore_signals = stop_on_signals(self)
        try:
            if resume:
                checkpointer.resume(epochs)
            epochs.start()
            with _frozen_garbage(self) as after_step:
                metrics.start()
                while total is None or self.step < total:
                    fed = epochs.next_batch()
                    if fed is None:  # a finite iterable ended: that was an epoch
                        metrics.flush()
                        if end_epoch(epochs, metrics, checkpointer) or metrics.status:
                            break
                        epochs.rewind(restart=True)
                        continue
                    ended = epochs.data_moved_on(fed)
                    if ended is not None:
                        metrics.epoch_ended_before(self.step + 1, ended, self.step)
                        if total is None and epochs.epoch >= cfg.epochs:
                            break
                    metrics.add(self.step_async(fed.batch), epochs.epoch)
                    epochs.took(fed)
                    after_step()
                    validate, epoch_over = validator.should_validate(self.step), epochs.is_over()
                    last = self.step == total or (self.stop_requested and self.env.world_size == 1)
                    metrics.read_if_due(final=last, needed=validate or epoch_over)
                    if metrics.status == "diverged":
                        break
                    if validate:
                        validator.validate()
                    if epoch_over:
                        if end_epoch(epochs, metrics, checkpointer) and cfg.max_steps is None:
                            break
                        epochs.rewind()
                    checkpointer.save_if_due(epochs)
                    if metrics.status == "interrupted":
                        break
            status = _wrap_up(metrics, validator, checkpointer, epochs, export, tokenizer_file)
        finally:
            epochs.close()
            restore_signals()
            metrics.close()
        return FitResult(
            status=status,
            step=self.step,
            signal=self._stop_signal,
            last_checkpoint=checkpointer.last_checkpoint,
            export_dir=export if status == "completed" else None,
            last_metrics=metrics.record,
        )


def _wrap_up(
    metrics: MetricsLogger,
    validator: Validator,
    checkpointer: Checkpointer,
    epochs: EpochTracker,
    export_dir: Path,
    tokenizer_file: str | Path | None,
) -> str:
    """After the loop: the last figures, a completed run's last validation and export
    (:func:`~pldr_llm.train.export.export_run`), the checkpoint a stopped run (or
    ``save_at_end``) needs; how the run ended (``FitResult.status``)."""
    trainer = metrics.trainer
    metrics.finish()
    status = metrics.status or "completed"
    if status == "completed":
        validator.validate_at_end()
    if status != "completed" or trainer.config.save_at_end:
        checkpointer.save_unless_saved(epochs)
    if status == "completed":
        export_run(
            trainer.model,
            trainer.config,
            export_dir,
            is_main=trainer.env.is_main,
            tokenizer_file=tokenizer_file,
            last_metrics=metrics.record,
        )
        metrics.note(f"exported the model to {export_dir}")
    return status


def _step_result(
    item: PendingStep, values: list[float], dag_coeffs: Any, use_dag: bool
) -> dict[str, Any]:
    """The figures of one step from its row of ``_STATS`` (see :meth:`Trainer.train_step`)."""
    n_tokens, n_seqs = values[7], values[8]
    ce_mean = values[0] / max(n_tokens, 1.0)
    dag = values[2:5]
    objective = ce_mean + weighted_dag(dag, dag_coeffs)
    result: dict[str, Any] = {
        "step": item.step,
        "loss": objective,
        "accuracy": values[1] / max(n_tokens, 1.0),
        "lr": item.lr,
        "tokens": int(n_tokens),
        "sequences": int(n_seqs),
        "skipped": values[5] > 0 or not math.isfinite(objective),
        "stop": values[6] > 0,
    }
    if use_dag:
        result.update(lm_loss=ce_mean, dag_A=dag[0], dag_A_P=dag[1], dag_G=dag[2])
    return result


def _skipped_too_often(result: dict[str, Any], skipped: int, allowed: int) -> bool:
    """Warn about a skipped step (the ``skipped``-th); whether that is more than ``allowed``."""
    logger.warning(
        "step %d: non-finite loss or gradient (loss %s); update skipped (%d of %d allowed)",
        result["step"],
        result["loss"],
        skipped,
        allowed,
    )
    return skipped > allowed


@contextlib.contextmanager
def _frozen_garbage(trainer: Trainer) -> Iterator[Callable[[], None]]:
    """The run's long-lived objects (modules, compiled code, the data) go to the permanent
    generation: a full garbage collection then no longer walks them, which stalled one step in a
    few (gen-2 collections are triggered by the autograd graph's allocations). Yields the call
    to make after each step: compilation and CUDA-graph recording make many long-lived objects
    in the first steps, frozen too three steps in."""
    refreeze_at = trainer.step + 3

    def after_step() -> None:
        if trainer.step == refreeze_at:
            gc.collect()
            gc.freeze()

    gc.collect()
    gc.freeze()
    try:
        yield after_step
    finally:
        gc.unfreeze()


def _apply_model_options(model: nn.Module, config: TrainConfig) -> None:
    """The TrainConfig options that set the model itself: activation checkpointing and the
    attention implementation (refused for a module other than a PLDRModel, which would take
    the attribute and silently ignore it)."""
    setter = getattr(model, "set_activation_checkpointing", None)
    if setter is not None:
        setter(config.activation_checkpointing)
    elif config.activation_checkpointing != "off":
        raise PLDRError("'activation_checkpointing' needs a PLDRModel")
    if config.attn_implementation is not None:
        if not isinstance(model, PLDRModel):
            raise PLDRError("'attn_implementation' needs a PLDRModel")
        model.attn_implementation = config.attn_implementation

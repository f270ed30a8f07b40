"""The PLDR-LLM trainer: one optimizer step (:meth:`Trainer.train_step`) and the run loop
(:meth:`Trainer.fit`) with metrics, validation, checkpoints, resume and clean shutdown.

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
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pldr_llm.core.config import check_token_range
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.losses import dag_loss, dag_regularizer, masked_ce_sum_and_hits, weighted_dag
from pldr_llm.train.checkpointing import (
    CheckpointManager,
    capture_rng_state,
    export_model,
    original_export,
    restore_rng_state,
)
from pldr_llm.train.config import TrainConfig
from pldr_llm.train.distributed import (
    DistEnv,
    all_ranks,
    all_reduce_sum,
    current_env,
    resolve_device,
    shard_model,
)
from pldr_llm.train.metrics import (
    MetricsWriter,
    ProgressBar,
    RateMeter,
    TrainMeters,
    model_flops_per_token,
)
from pldr_llm.train.prefetch import BatchFeed
from pldr_llm.train.schedule import build_scheduler

__all__ = ["Trainer", "FitResult", "NonFiniteLossError", "PendingStep", "PreparedBatch"]

logger = logging.getLogger("pldr_llm.train")


# The figures one step keeps on the device: cross-entropy sum, arg-max hits, the three DAG
# terms (sequence-weighted), non-finite flag, stop flag, non-padding targets, sequences.
_STATS = ("ce_sum", "correct", "dag_A", "dag_A_P", "dag_G", "bad", "stop", "tokens", "sequences")


@dataclass
class PreparedBatch:
    """A batch checked and split on the host by :meth:`Trainer.prepare_batch`."""

    micro: list[torch.Tensor]  #: the micro-batches [b, L+1] (pinned CPU memory for a GPU)
    tokens: int  #: non-padding targets of this rank
    sequences: int
    padded: list[bool]  #: whether each micro-batch's inputs hold the pad id
    counts: torch.Tensor  #: ``[tokens, sequences]`` float64, for the global counts under FSDP


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
        if config.attn_implementation is not None:
            model.attn_implementation = config.attn_implementation
        #: the speed levers in effect (TrainConfig.levers for this device, with FSDP or not)
        self.levers = config.levers(self.device.type, sharded=self.sharded)
        if self.levers["compile_layers"]:
            from pldr_llm.core.compile import compile_decoder_layers

            options = {"mode": "reduce-overhead"} if self.levers["cuda_graphs"] else {}
            compile_decoder_layers(model, **options)
        self._forward_module: nn.Module = torch.compile(model) if config.compile else model
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
        """Check and split a raw batch [B, L+1] on the host (thread-safe; no device work).

        Everything the step would otherwise read back from the GPU is found here, on the CPU
        copy: the ids' range, the number of non-padding targets and whether each micro-batch's
        inputs hold padding (which picks the plain causal kernel or a mask).
        """
        micro = self._split(batch)
        vocab = self._vocab
        tokens = 0
        padded: list[bool] = []
        pin = self.device.type == "cuda"
        prepared: list[torch.Tensor] = []
        for mb in micro:
            if vocab is not None:
                check_token_range(int(mb.min()), int(mb.max()), vocab)
            tokens += int((mb[:, 1:] != self.pad_id).sum())
            padded.append(bool((mb[:, :-1] == self.pad_id).any()))
            if pin and mb.device.type == "cpu":
                mb = mb.long().pin_memory()
            prepared.append(mb)
        sequences = sum(mb.shape[0] for mb in micro)
        counts = torch.tensor([float(tokens), float(sequences)], dtype=torch.float64)
        if pin:
            counts = counts.pin_memory()
        return PreparedBatch(prepared, tokens, sequences, padded, counts)

    def _split(self, batch: torch.Tensor | list | tuple) -> list[torch.Tensor]:
        if isinstance(batch, (list, tuple)):
            micro = list(batch)
        else:
            if not isinstance(batch, torch.Tensor) or batch.dim() != 2:
                raise PLDRError("a training batch must be a LongTensor [batch, length + 1]")
            n = self.config.grad_accum_steps
            if batch.shape[0] % n:
                raise PLDRError(
                    f"batch of {batch.shape[0]} sequences cannot be split into "
                    f"'grad_accum_steps' = {n} micro-batches"
                )
            micro = list(batch.chunk(n)) if n > 1 else [batch]
        for mb in micro:
            if not isinstance(mb, torch.Tensor) or mb.dim() != 2 or mb.shape[1] < 2:
                shape = tuple(mb.shape) if isinstance(mb, torch.Tensor) else type(mb).__name__
                raise PLDRError(
                    f"a training batch must be [batch, length + 1] with length >= 1, got {shape}"
                )
            if mb.dtype not in (torch.int64, torch.int32):
                raise PLDRError(f"a training batch must hold integer ids, got {mb.dtype}")
        return micro

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
        """Training FLOPs per token at ``context`` (:func:`metrics.model_flops_per_token`)."""
        config = getattr(self.model, "config", None)
        embedding = getattr(getattr(self.model, "decoder", None), "embedding", None)
        return model_flops_per_token(
            sum(p.numel() for p in self.model.parameters()),
            embedding.weight.numel() if embedding is not None else 0,
            int(getattr(config, "num_layers", 0)),
            int(getattr(config, "d_model", 0)),
            context,
        )

    def read_steps(self, pending: list[PendingStep]) -> list[dict[str, Any]]:
        """The results of steps run by :meth:`step_async` (one host read for all of them).

        Counts skipped steps, warns about each, and marks ``diverged`` on the step that went
        past ``max_nonfinite_steps``. Adds the steps' tokens to ``tokens_seen``.
        """
        if not pending:
            return []
        table = torch.stack([p.stats for p in pending]).tolist()
        cfg = self.config
        use_dag = cfg.use_dag_loss
        results = []
        for item, values in zip(pending, table):
            n_tokens, n_seqs = values[7], values[8]
            ce_mean = values[0] / max(n_tokens, 1.0)
            dag = values[2:5]
            objective = ce_mean + weighted_dag(dag, cfg.dag_reg_coeffs)
            skipped = values[5] > 0 or not math.isfinite(objective)
            self.tokens_seen += int(n_tokens)
            result: dict[str, Any] = {
                "step": item.step,
                "loss": objective,
                "accuracy": values[1] / max(n_tokens, 1.0),
                "lr": item.lr,
                "tokens": int(n_tokens),
                "sequences": int(n_seqs),
                "skipped": skipped,
                "stop": values[6] > 0,
            }
            if use_dag:
                result.update(lm_loss=ce_mean, dag_A=dag[0], dag_A_P=dag[1], dag_G=dag[2])
            if skipped:
                self.nonfinite_steps += 1
                logger.warning(
                    "step %d: non-finite loss or gradient (loss %s); update skipped "
                    "(%d of %d allowed)",
                    item.step,
                    objective,
                    self.nonfinite_steps,
                    cfg.max_nonfinite_steps,
                )
                if self.nonfinite_steps > cfg.max_nonfinite_steps:
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

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self, batches: Any, max_batches: int | None = None) -> dict[str, Any]:
        """Mean loss and accuracy over up to ``max_batches`` batches (all ranks, token-weighted).

        ``batches`` is an iterable of [B, L+1] batches; one with ``reset()`` is reset first, so
        every validation sees the same data. Ranks that run out early wait for the others.
        """
        use_dag = self.config.use_dag_loss
        reset = getattr(batches, "reset", None)
        if callable(reset):
            reset()
        iterator = iter(batches)
        self.model.eval()
        stats = torch.zeros(6, dtype=torch.float64, device=self.device)
        # ce_sum, correct, tokens, dag_A*B, dag_A_P*B, dag_G*B (+ sequences below)
        n_seqs = torch.zeros(1, dtype=torch.float64, device=self.device)
        done = 0
        while max_batches is None or done < max_batches:
            batch = next(iterator, None)
            have = batch is not None
            if self.sharded:  # every rank runs the same number of forward passes
                have = all_ranks(have, self.device)
            if not have:
                break
            batch = batch.to(self.device).long()
            inputs, targets = batch[:, :-1], batch[:, 1:]
            if self.levers["cuda_graphs"]:
                torch.compiler.cudagraph_mark_step_begin()
            with self._autocast():
                out, ce_sum, correct = self._lm_loss_terms(
                    inputs, targets, output_deductive=use_dag, output_scores=False
                )
            stats[0] += ce_sum.double()
            stats[1] += correct.double()
            stats[2] += (targets != self.pad_id).sum().double()
            if use_dag:
                for k, value in enumerate(dag_regularizer(out.deductive)):
                    stats[3 + k] += value.double() * batch.shape[0]
            n_seqs += batch.shape[0]
            done += 1
        if self.sharded:
            all_reduce_sum(stats)
            all_reduce_sum(n_seqs)
        values = stats.tolist()
        tokens = max(values[2], 1.0)
        result: dict[str, Any] = {
            "val_loss": values[0] / tokens if values[2] else float("nan"),
            "val_accuracy": values[1] / tokens if values[2] else float("nan"),
            "val_tokens": int(values[2]),
            "val_batches": done,
        }
        if use_dag:
            seqs = max(float(n_seqs.item()), 1.0)
            dag = [v / seqs for v in values[3:6]]
            result.update(
                val_dag_A=dag[0],
                val_dag_A_P=dag[1],
                val_dag_G=dag[2],
                val_lm_loss=result["val_loss"],
            )
            result["val_loss"] = result["val_lm_loss"] + weighted_dag(
                dag, self.config.dag_reg_coeffs
            )
        return result

    # ------------------------------------------------------------------ state
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
        # The schedule's position comes from the checkpoint; its shape and peak learning rate
        # from this run's config (a resumed run may lower train.learning_rate): this scheduler's
        # own state, moved to the saved step, through the scheduler's load_state_dict.
        saved, own = dict(state["scheduler"]), self.scheduler.state_dict()
        own["base_lrs"] = [self.config.learning_rate] * len(self.optimizer.param_groups)
        own["last_epoch"] = saved["last_epoch"]
        own["_step_count"] = saved.get("_step_count", own.get("_step_count"))
        own["_last_lr"] = [b * self.scheduler.lr_lambdas[0](self.step) for b in own["base_lrs"]]
        self.scheduler.load_state_dict(own)
        for group, base, lr in zip(self.optimizer.param_groups, own["base_lrs"], own["_last_lr"]):
            group["initial_lr"] = base
            group["lr"] = lr

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
        first. SIGTERM/SIGINT stop after the current step with a checkpoint. At the end the model
        is exported to ``export_dir`` (default ``run_dir``) as ``config.json`` +
        ``model.safetensors`` (+ ``tokenizer.model``) and, with ``export_pth``, the original's
        ``.pth`` as ``original/<run_name>-model-checkpoint.pth``.
        """
        cfg, env = self.config, self.env
        run_dir = Path(run_dir)
        export_dir = Path(export_dir) if export_dir is not None else run_dir
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = CheckpointManager(
            run_dir, env, keep_last=cfg.keep_last, protected_steps=cfg.save_steps
        )
        ckpt.remove_incomplete()
        meters = TrainMeters(dag=cfg.use_dag_loss)
        epoch = int(getattr(train_data, "epoch", 0) or 0)
        step_in_epoch = 0
        last_saved: int | None = None
        last_checkpoint: Path | None = None

        if resume:
            latest = ckpt.latest()
            if latest is not None:
                loaded = ckpt.load(latest, self.model, self.optimizer)
                self.load_state_dict(loaded.trainer_state["trainer"])
                meters.load_state_dict(loaded.trainer_state.get("meters", {}))
                epoch = int(loaded.trainer_state.get("epoch", 0))
                step_in_epoch = int(loaded.trainer_state.get("step_in_epoch", 0))
                rank_state = loaded.rank_state or {}
                if "rng" in rank_state:
                    restore_rng_state(rank_state["rng"])
                if "data" in rank_state and hasattr(train_data, "load_state_dict"):
                    train_data.load_state_dict(rank_state["data"])
                last_saved, last_checkpoint = self.step, latest
                if env.is_main:
                    logger.info("resumed from %s (step %d)", latest, self.step)

        total = cfg.total_steps()
        writer = MetricsWriter(run_dir, enabled=env.is_main, tensorboard=cfg.tensorboard)
        writer.truncate_after(self.step)
        progress = ProgressBar(
            total, self.step, cfg.progress if env.is_main else False, cfg.log_every
        )
        restore_signals = self._install_signal_handlers()
        rates = RateMeter(peak_flops=cfg.peak_tflops * 1e12 * env.world_size, device=self.device)
        # Figures are read back from the GPU once per log interval (every step on the CPU,
        # where reading costs nothing), so the host never waits for the device inside a step.
        read_every = 1 if self.device.type == "cpu" else cfg.log_every
        pending: list[PendingStep] = []
        data_state: Any = None
        have_state = hasattr(train_data, "state_dict")
        if have_state:
            data_state = train_data.state_dict()
        record: dict[str, Any] | None = None
        stopping = {"status": None}
        # Per pending step: its epoch, and the epochs that ended just before it (step -> (epoch,
        # its last step)), so that epoch records come out in order when the steps are read.
        step_epochs: dict[int, int] = {}
        epoch_ends: dict[int, tuple[int, int]] = {}

        def flush(final: bool = False) -> None:
            """Read the pending steps; write their records; note a stop or a divergence."""
            nonlocal record
            if not pending:
                return
            if rates.flops_per_token is None and self._context:
                rates.flops_per_token = self.flops_per_token(self._context)
            results = self.read_steps(pending)
            pending.clear()
            now = time.perf_counter()
            for result in results:
                step = result["step"]
                if step in epoch_ends:
                    ended, last_step = epoch_ends.pop(step)
                    self._end_epoch(writer, meters, ended, last_step)
                meters.update(result if not result["skipped"] else {})
                record = {
                    "step": step,
                    "epoch": step_epochs.pop(step, epoch),
                    "loss": result["loss"],
                    "accuracy": result["accuracy"],
                    "lr": result["lr"],
                    "tokens": result["tokens"],
                }
                for key in ("lm_loss", "dag_A", "dag_A_P", "dag_G"):
                    if key in result:
                        record[key] = result[key]
                record.update(meters.summary())
                if result is results[-1] and (final or step % cfg.log_every == 0):
                    record["tokens_seen"] = self.tokens_seen
                    record.update(rates.interval(self.tokens_seen, step, now))
                if result["skipped"]:
                    record["skipped"] = True
                writer.write(record)
                progress.update(step, record)
                if step % cfg.log_every == 0:
                    meters.reset("running")
                if result.get("diverged") and stopping["status"] is None:
                    stopping["status"] = "diverged"
                if result["stop"] and stopping["status"] is None:
                    stopping["status"] = "interrupted"

        def save() -> Path:
            nonlocal last_saved, last_checkpoint
            flush()
            trainer_state = {
                "trainer": self.state_dict(),
                "meters": meters.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
            }
            rank_state: dict[str, Any] = {"rng": capture_rng_state()}
            if have_state:
                rank_state["data"] = data_state
            path = ckpt.save(self.step, self.model, self.optimizer, trainer_state, rank_state)
            last_saved, last_checkpoint = self.step, path
            if env.is_main:
                progress.write(f"saved checkpoint {path}")
            rates.pause(self.tokens_seen, self.step, time.perf_counter())
            return path

        def next_epoch() -> None:
            """The epoch ended: its record, then the next one (and its checkpoint when due)."""
            nonlocal epoch, step_in_epoch
            self._end_epoch(writer, meters, epoch)
            epoch += 1
            step_in_epoch = 0
            if epoch in cfg.save_epochs:
                save()

        def tell_data_the_epoch() -> bool:
            """``train_data.set_epoch(epoch)`` where it has one (reshuffles); whether it had."""
            setter = getattr(train_data, "set_epoch", None)
            if callable(setter):
                setter(epoch)
            return callable(setter)

        def restart_feed() -> None:
            """A new batch feed from the start of the (next epoch of the) training data."""
            nonlocal feed
            feed.close()
            feed = BatchFeed(train_data, self.prepare_batch, cfg.prefetch_batches)

        status = "completed"
        # An endless iterator (BatchIterator with repeat) never ends: no per-step agreement on
        # "is there a batch" between ranks is needed (it was a host read every step).
        endless = bool(getattr(train_data, "repeat", False))
        feed = BatchFeed(train_data, self.prepare_batch, cfg.prefetch_batches)
        epoch_save_due = False
        # The run's long-lived objects (modules, compiled code, the data) go to the permanent
        # generation: a full garbage collection then no longer walks them, which stalled one
        # step in a few (gen-2 collections are triggered by the autograd graph's allocations).
        gc.collect()
        gc.freeze()
        rates.start(self.tokens_seen, self.step, time.perf_counter())
        first_step = self.step
        try:
            while total is None or self.step < total:
                fed = feed.next()
                if self.sharded and not endless and not all_ranks(fed is not None, self.device):
                    fed = None
                if fed is None:
                    # A finite iterable ended: that was an epoch.
                    if step_in_epoch == 0:
                        raise PLDRError("the training data yielded no batch")
                    flush()
                    next_epoch()
                    if epoch >= cfg.epochs or stopping["status"]:
                        break
                    tell_data_the_epoch()
                    restart_feed()
                    continue

                data_epoch = fed.epoch
                if (
                    isinstance(data_epoch, int)
                    and cfg.steps_per_epoch is None
                    and data_epoch > epoch
                ):
                    # An endless iterator moved on to its next epoch. Its first batch is
                    # already taken, so an epoch checkpoint is written after this step (a
                    # checkpoint must never hold a data position ahead of its step). Its record
                    # is written when the steps are read (no host read here: with a small
                    # corpus an epoch can be a few steps long).
                    epoch_ends[self.step + 1] = (epoch, self.step)
                    epoch_save_due = epoch + 1 in cfg.save_epochs
                    epoch, step_in_epoch = data_epoch, 0
                    if total is None and epoch >= cfg.epochs:
                        break

                step_epochs[self.step + 1] = epoch
                pending.append(self.step_async(fed.batch))
                data_state = fed.state
                step_in_epoch += 1
                progress.advance(self.step)  # the bar's step count only: nothing read back
                if self.step == first_step + 3:
                    # Compilation and CUDA-graph recording made many long-lived objects in the
                    # first steps: freeze them too.
                    gc.collect()
                    gc.freeze()

                val_due = val_data is not None and cfg.val_every and self.step % cfg.val_every == 0
                epoch_due = cfg.steps_per_epoch is not None and step_in_epoch >= cfg.steps_per_epoch
                save_due = last_saved != self.step and (
                    epoch_save_due
                    or self.step in cfg.save_steps
                    or (cfg.save_every is not None and self.step % cfg.save_every == 0)
                )
                local_stop = self.stop_requested and env.world_size == 1
                if self.step == total or local_stop:
                    flush(final=True)
                elif self.step % read_every == 0 or val_due or epoch_due:
                    flush()
                if stopping["status"] == "diverged":
                    break

                if val_due:
                    val = self.evaluate(val_data, cfg.val_batches)
                    writer.write({"event": "val", "step": self.step, **val})
                    progress.write(
                        f"step {self.step}: val_loss {val['val_loss']:.4f} "
                        f"val_accuracy {val['val_accuracy']:.4f}"
                    )
                    rates.pause(self.tokens_seen, self.step, time.perf_counter())

                if epoch_due:
                    next_epoch()
                    if epoch >= cfg.epochs and cfg.max_steps is None:
                        break
                    if tell_data_the_epoch():
                        restart_feed()

                if save_due:
                    save()
                epoch_save_due = False

                if stopping["status"] == "interrupted":
                    break
            flush(final=True)
            for ended, last_step in epoch_ends.values():  # an epoch ended with the run
                self._end_epoch(writer, meters, ended, last_step)
            if stopping["status"]:
                status = stopping["status"]
            if status == "completed" and val_data is not None and cfg.val_every:
                if record is not None and self.step % cfg.val_every != 0:
                    val = self.evaluate(val_data, cfg.val_batches)
                    writer.write({"event": "val", "step": self.step, **val})
            if status == "interrupted" or status == "diverged" or cfg.save_at_end:
                if last_saved != self.step:
                    save()
            if status == "completed":
                reference = None
                if cfg.export_pth:
                    _, reference = original_export(export_dir, cfg.run_name)
                export_model(
                    self.model,
                    export_dir,
                    tokenizer_file=tokenizer_file,
                    reference_pth=reference,
                    loss=record["loss"] if record else None,
                    accuracy=record["accuracy"] if record else None,
                )
                if env.is_main:
                    progress.write(f"exported the model to {export_dir}")
        finally:
            feed.close()
            gc.unfreeze()
            restore_signals()
            progress.close()
            writer.close()
        return FitResult(
            status=status,
            step=self.step,
            signal=self._stop_signal,
            last_checkpoint=last_checkpoint,
            export_dir=export_dir if status == "completed" else None,
            last_metrics=record,
        )

    def _end_epoch(
        self, writer: MetricsWriter, meters: TrainMeters, epoch: int, step: int | None = None
    ) -> None:
        writer.write(
            {
                "event": "epoch_end",
                "step": self.step if step is None else step,
                "epoch": epoch,
                "loss_epoch": meters.result("epoch", "loss"),
                "accuracy_epoch": meters.result("epoch", "accuracy"),
            }
        )
        meters.reset("epoch")

    def _install_signal_handlers(self):
        """SIGTERM/SIGINT -> finish the step, save, stop. A second SIGINT aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):  # noqa: ARG001 - signal handler signature
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if not self.stop_requested:
                logger.warning(
                    "received %s: stopping after this step and saving a checkpoint",
                    signal.Signals(signum).name,
                )
            self.stop_requested = True
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

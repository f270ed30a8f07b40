"""The components of :meth:`Trainer.fit <pldr_llm.train.trainer.Trainer.fit>`'s run loop.

Each owns one policy and its state, so that ``fit`` reads as the loop it is:

* :class:`MetricsLogger` -- when finished steps are read back from the device
  (:meth:`~MetricsLogger.should_read`), their records, the progress bar, the rates, the epoch
  records, and whether a step asked the run to stop or diverged (:attr:`~MetricsLogger.status`).
* :class:`EpochTracker` -- the epoch and the position in it, the batch feed over the training
  data (restarted at each epoch of a finite iterable), and the data position a checkpoint keeps.
* :class:`Checkpointer` -- resume, when a checkpoint is due (:meth:`~Checkpointer.save_if_due`)
  and what goes in one.

Validation is :class:`pldr_llm.train.validation.Validator`; the export at the end is
:func:`pldr_llm.train.export.export_run` (both called from ``trainer.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.train.checkpointing import CheckpointManager, capture_rng_state, restore_rng_state
from pldr_llm.train.distributed import all_ranks
from pldr_llm.train.metrics import MetricsWriter, ProgressBar, RateMeter, TrainMeters
from pldr_llm.train.prefetch import BatchFeed, FedBatch

#: The :class:`~pldr_llm.train.trainer.Trainer` the components serve (trainer.py imports this
#: module, so it is not imported here, not even for type checking: no import cycle).
TrainerT = Any

__all__ = [
    "Checkpointer",
    "EpochTracker",
    "MetricsLogger",
    "end_epoch",
    "stop_on_signals",
]

logger = logging.getLogger("pldr_llm.train")


class MetricsLogger:
    """The figures of a run: pending steps read back in batches, then written as records.

    Figures are read back from a GPU once per log interval (every step on the CPU, where reading
    costs nothing), so the host never waits for the device inside a step. ``status`` becomes
    ``"diverged"`` or ``"interrupted"`` when a read step says so.
    """

    def __init__(self, trainer: TrainerT, run_dir: Path) -> None:
        cfg, env = trainer.config, trainer.env
        self.trainer = trainer
        self.log_every = cfg.log_every
        self.read_every = 1 if trainer.device.type == "cpu" else cfg.log_every
        self.meters = TrainMeters(dag=cfg.use_dag_loss)
        self.writer = MetricsWriter(run_dir, enabled=env.is_main, tensorboard=cfg.tensorboard)
        self._bar_settings = (
            cfg.total_steps(),
            cfg.progress if env.is_main else False,
            cfg.log_every,
        )
        self.progress = ProgressBar(None, 0, False, cfg.log_every)  # a silent one until start()
        self.rates = RateMeter(
            peak_flops=cfg.peak_tflops * 1e12 * env.world_size, device=trainer.device
        )
        self.pending: list[Any] = []
        #: the epoch of each pending step, and the epochs that ended just before one (step ->
        #: (epoch, its last step)): epoch records come out in order when the steps are read
        self._step_epochs: dict[int, int] = {}
        self._epoch_ends: dict[int, tuple[int, int]] = {}
        self.record: dict[str, Any] | None = None  #: the last step's record
        self.status: str | None = None

    def start(self) -> None:
        """From the step the run starts at (after a resume): records after it are dropped (the
        resumed run writes them again), the progress bar and the rates begin there."""
        self.writer.truncate_after(self.trainer.step)
        total, enabled, log_every = self._bar_settings
        self.progress = ProgressBar(total, self.trainer.step, enabled, log_every)
        self.rates.start(self.trainer.tokens_seen, self.trainer.step, time.perf_counter())

    def add(self, pending: Any, epoch: int) -> None:
        """A step just run, of ``epoch``; nothing is read back yet."""
        self._step_epochs[pending.step] = epoch
        self.pending.append(pending)
        self.progress.advance(self.trainer.step)  # the bar's step count only

    def read_if_due(self, final: bool = False, needed: bool = False) -> None:
        """Read the pending steps at the end of a read interval, at the ``final`` step, or when
        ``needed`` (validation or an epoch's end comes next, and must follow the records)."""
        if final:
            self.flush(final=True)
        elif needed or self.trainer.step % self.read_every == 0:
            self.flush()

    def epoch_ended_before(self, step: int, epoch: int, last_step: int) -> None:
        """``epoch`` ended at ``last_step``; its record comes out before ``step``'s."""
        self._epoch_ends[step] = (epoch, last_step)

    def flush(self, final: bool = False) -> None:
        """Read the pending steps; write their records; note a stop or a divergence."""
        if not self.pending:
            return
        trainer = self.trainer
        if self.rates.flops_per_token is None and trainer._context:
            self.rates.flops_per_token = trainer.flops_per_token(trainer._context)
        results = trainer.read_steps(self.pending)
        self.pending.clear()
        now = time.perf_counter()
        for result in results:
            step = result["step"]
            if step in self._epoch_ends:
                self.end_epoch(*self._epoch_ends.pop(step))
            self.meters.update(result if not result["skipped"] else {})
            record = {"step": step, "epoch": self._step_epochs.pop(step)}
            for key in ("loss", "accuracy", "lr", "tokens", "lm_loss", "dag_A", "dag_A_P", "dag_G"):
                if key in result:
                    record[key] = result[key]
            record.update(self.meters.summary())
            if result is results[-1] and (final or step % self.log_every == 0):
                record["tokens_seen"] = trainer.tokens_seen
                record.update(self.rates.interval(trainer.tokens_seen, step, now))
            if result["skipped"]:
                record["skipped"] = True
            self.writer.write(record)
            self.progress.update(step, record)
            self.record = record
            if step % self.log_every == 0:
                self.meters.reset("running")
            if result.get("diverged") and self.status is None:
                self.status = "diverged"
            if result["stop"] and self.status is None:
                self.status = "interrupted"

    def end_epoch(self, epoch: int, step: int | None = None) -> None:
        """The record of ``epoch``, which ended at ``step`` (default: the trainer's step)."""
        self.writer.write(
            {
                "event": "epoch_end",
                "step": self.trainer.step if step is None else step,
                "epoch": epoch,
                "loss_epoch": self.meters.result("epoch", "loss"),
                "accuracy_epoch": self.meters.result("epoch", "accuracy"),
            }
        )
        self.meters.reset("epoch")

    def finish(self) -> None:
        """Read what is pending; the records of epochs that ended with the run."""
        self.flush(final=True)
        for ended, last_step in self._epoch_ends.values():
            self.end_epoch(ended, last_step)
        self._epoch_ends.clear()

    def note(self, message: str) -> None:
        """A line for the user (above the progress bar), main rank only."""
        if self.trainer.env.is_main:
            self.progress.write(message)

    def pause(self) -> None:
        """Time since the last step (validation, a checkpoint) is not training time."""
        self.rates.pause(self.trainer.tokens_seen, self.trainer.step, time.perf_counter())

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


class EpochTracker:
    """The epoch, the position in it and the batch feed over the training data.

    An epoch ends when a finite iterable runs out, when ``steps_per_epoch`` steps were taken, or
    when an endless iterator (``repeat``) reports its next ``epoch``. ``data_state`` is the data
    position after the last step taken (what a checkpoint keeps; ``None`` without
    ``state_dict``).
    """

    def __init__(self, trainer: TrainerT, train_data: Any) -> None:
        cfg = trainer.config
        self.trainer = trainer
        self.train_data = train_data
        self.epochs = cfg.epochs
        self.steps_per_epoch = cfg.steps_per_epoch
        self.epoch = int(getattr(train_data, "epoch", 0) or 0)
        self.step_in_epoch = 0
        #: an endless iterator moved on to its next epoch at this step: its checkpoint is due
        self.save_due = False
        self.data_state: Any = None
        # An endless iterator never ends: no per-step agreement between ranks on "is there a
        # batch" is needed (it was a host read every step).
        self._agree = trainer.sharded and not bool(getattr(train_data, "repeat", False))
        self._depth = cfg.prefetch_batches
        self.feed: BatchFeed | None = None

    def start(self) -> None:
        """Start reading batches ahead, from the data's position (after a resume)."""
        state_dict = getattr(self.train_data, "state_dict", None)
        self.data_state = state_dict() if callable(state_dict) else None
        self.restart_feed()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The epoch counters of a checkpoint's trainer state (before :meth:`start`)."""
        self.epoch = int(state.get("epoch", 0))
        self.step_in_epoch = int(state.get("step_in_epoch", 0))

    def load_data_state(self, rank_state: dict[str, Any]) -> None:
        """This rank's data position from a checkpoint (before :meth:`start`)."""
        if "data" in rank_state and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(rank_state["data"])

    def next_batch(self) -> FedBatch | None:
        """The next prepared batch; ``None`` when the data ran out (on every rank alike)."""
        assert self.feed is not None, "EpochTracker.start() was not called"
        fed = self.feed.next()
        if self._agree and not all_ranks(fed is not None, self.trainer.device):
            fed = None
        if fed is None and self.step_in_epoch == 0:
            raise PLDRError("the training data yielded no batch")
        return fed

    def data_moved_on(self, fed: FedBatch) -> int | None:
        """The epoch that ended if an endless iterator began its next one with ``fed`` (else
        None). The epoch moves on now: its record is written when the steps are read, and its
        checkpoint after this step (a checkpoint never holds a data position ahead of its step)."""
        data_epoch = fed.epoch
        if not isinstance(data_epoch, int) or self.steps_per_epoch is not None:
            return None
        if data_epoch <= self.epoch:
            return None
        ended = self.epoch
        self.save_due = ended + 1 in self.trainer.config.save_epochs
        self.epoch, self.step_in_epoch = data_epoch, 0
        return ended

    def took(self, fed: FedBatch) -> None:
        """A step ran on ``fed``."""
        self.data_state = fed.state
        self.step_in_epoch += 1

    def is_over(self) -> bool:
        """Whether ``steps_per_epoch`` steps of this epoch were taken."""
        return self.steps_per_epoch is not None and self.step_in_epoch >= self.steps_per_epoch

    def advance(self) -> None:
        """The next epoch begins: counters, then the data told (``set_epoch`` reshuffles)."""
        self.epoch += 1
        self.step_in_epoch = 0

    def rewind(self, restart: bool = False) -> None:
        """Tell the data the new epoch (``set_epoch``, which reshuffles) and restart the feed,
        where the data has ``set_epoch`` or with ``restart`` (a finite iterable that ran out)."""
        setter = getattr(self.train_data, "set_epoch", None)
        if callable(setter):
            setter(self.epoch)
        if callable(setter) or restart:
            self.restart_feed()

    def restart_feed(self) -> None:
        """A new batch feed from the data's current position."""
        self.close()
        self.feed = BatchFeed(self.train_data, self.trainer.prepare_batch, self._depth)

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()


class Checkpointer:
    """Checkpoints of a run in ``run_dir/checkpoints``: resume, when one is due, what it holds.

    A checkpoint is due at ``save_every`` multiples, at ``save_steps``, after an epoch listed in
    ``save_epochs``, and never twice for one step. It holds the trainer (step, scheduler,
    counters), the meters, the epoch counters, and per rank the RNG states and data position.
    """

    def __init__(self, trainer: TrainerT, run_dir: Path, metrics: MetricsLogger) -> None:
        cfg = trainer.config
        self.trainer = trainer
        self.metrics = metrics
        self.save_every = cfg.save_every
        self.save_steps = cfg.save_steps
        self.save_epochs = cfg.save_epochs
        self.manager = CheckpointManager(
            run_dir, trainer.env, keep_last=cfg.keep_last, protected_steps=cfg.save_steps
        )
        self.manager.remove_incomplete()
        self.last_saved: int | None = None
        self.last_checkpoint: Path | None = None

    def resume(self, epochs: EpochTracker) -> None:
        """Load the newest complete checkpoint, if any, into the trainer, meters and data."""
        latest = self.manager.latest()
        if latest is None:
            return
        trainer = self.trainer
        loaded = self.manager.load(latest, trainer.model, trainer.optimizer)
        trainer.load_state_dict(loaded.trainer_state["trainer"])
        self.metrics.meters.load_state_dict(loaded.trainer_state.get("meters", {}))
        epochs.load_state_dict(loaded.trainer_state)
        rank_state = loaded.rank_state or {}
        if "rng" in rank_state:
            restore_rng_state(rank_state["rng"])
        epochs.load_data_state(rank_state)
        self.last_saved, self.last_checkpoint = trainer.step, latest
        if trainer.env.is_main:
            logger.info("resumed from %s (step %d)", latest, trainer.step)

    def is_due(self, step: int, epoch_save_due: bool = False) -> bool:
        return self.last_saved != step and (
            epoch_save_due
            or step in self.save_steps
            or (self.save_every is not None and step % self.save_every == 0)
        )

    def save_if_due(self, epochs: EpochTracker) -> None:
        if self.is_due(self.trainer.step, epochs.save_due):
            self.save(epochs)
        epochs.save_due = False

    def save_unless_saved(self, epochs: EpochTracker) -> None:
        """A checkpoint of this step (the run stops here), unless one exists."""
        if self.last_saved != self.trainer.step:
            self.save(epochs)

    def save(self, epochs: EpochTracker) -> Path:
        """A checkpoint of the trainer's current step (pending figures are read first)."""
        trainer = self.trainer
        self.metrics.flush()
        trainer_state = {
            "trainer": trainer.state_dict(),
            "meters": self.metrics.meters.state_dict(),
            **epochs.state_dict(),
        }
        rank_state: dict[str, Any] = {"rng": capture_rng_state()}
        if hasattr(epochs.train_data, "state_dict"):
            rank_state["data"] = epochs.data_state
        path = self.manager.save(
            trainer.step, trainer.model, trainer.optimizer, trainer_state, rank_state
        )
        self.last_saved, self.last_checkpoint = trainer.step, path
        self.metrics.note(f"saved checkpoint {path}")
        self.metrics.pause()
        return path


def end_epoch(epochs: EpochTracker, metrics: MetricsLogger, checkpointer: Checkpointer) -> bool:
    """The epoch ended: its record, the next epoch, its checkpoint when listed in
    ``save_epochs``; whether that was the last epoch."""
    metrics.end_epoch(epochs.epoch)
    epochs.advance()
    if epochs.epoch in checkpointer.save_epochs:
        checkpointer.save(epochs)
    return epochs.epoch >= epochs.epochs


def stop_on_signals(trainer: TrainerT) -> Callable[[], None]:
    """SIGTERM/SIGINT -> ``trainer`` finishes the step, saves, stops; a second SIGINT aborts at
    once. Returns the function that restores the previous handlers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not trainer.stop_requested:
            logger.warning(
                "received %s: stopping after this step and saving a checkpoint",
                signal.Signals(signum).name,
            )
        trainer.stop_requested = True
        trainer._stop_signal = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore

"""Training metrics: running means like the original, ``metrics.jsonl``, TensorBoard, progress bar.

The original trainer keeps three means of the per-step loss and accuracy: *global* (since the
start of training, ``Loss(G)``), *running* (since the last report, reset every ``log_every``
steps, ``Loss(R)``) and *per-epoch* (``Loss(E)``). :class:`TrainMeters` keeps the same three (and
the three DAG losses), and they are part of a checkpoint, so a resumed run reports the same
numbers as an uninterrupted one.

``metrics.jsonl`` (rank 0 only) gets one JSON object per line:

* every optimizer step: ``{"step", "epoch", "loss", "accuracy", "lr", "tokens",
  "loss_running", "accuracy_running", "loss_global", "accuracy_global", "loss_epoch",
  "accuracy_epoch"}`` plus ``"lm_loss"``, ``"dag_A"``, ``"dag_A_P"``, ``"dag_G"`` when the DAG
  loss is on, and ``"skipped": true`` for a step whose loss was not finite;
* the last step of every log interval (``log_every`` steps) also has the speed figures of
  :meth:`RateMeter.interval`: ``"tokens_seen"``, ``"tokens_per_s"`` (this interval only, all
  ranks), ``"tokens_per_s_cumulative"`` (since the run started, start-up and compilation
  included), ``"step_time_s"`` (mean over the interval), ``"elapsed_s"``, ``"mfu"`` (model FLOPs
  utilization, :mod:`pldr_llm.train.flops`; GPU only) and ``"peak_memory_gib"`` (largest
  allocation of this process, GPU only). The step records of an interval are written together
  at its end: on a GPU the trainer reads its figures back once per interval;
* every validation: ``{"event": "val", "step", "val_loss", "val_accuracy", ...}``;
* every epoch end: ``{"event": "epoch_end", "step", "epoch", "loss_epoch", "accuracy_epoch"}``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import atomic_write_text

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "Mean",
    "RateMeter",
    "TrainMeters",
    "MetricsWriter",
    "ProgressBar",
    "read_metrics",
    "METRICS_FILE",
]

logger = logging.getLogger("pldr_llm.train")

METRICS_FILE = "metrics.jsonl"
DAG_KEYS = ("dag_A", "dag_A_P", "dag_G")


class Mean:
    """Unweighted mean of the values passed to :meth:`update` (Keras' ``Mean``)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        if math.isfinite(value):
            self.total += float(value)
            self.count += 1

    def result(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


class TrainMeters:
    """Global, running and per-epoch means of loss and accuracy (and the DAG losses)."""

    SCOPES = ("global", "running", "epoch")

    def __init__(self, dag: bool = False) -> None:
        self.names = ["loss", "accuracy"] + (["lm_loss", *DAG_KEYS] if dag else [])
        self.means = {(s, n): Mean() for s in self.SCOPES for n in self.names}

    def update(self, values: dict[str, Any]) -> None:
        for name in self.names:
            if name in values and values[name] is not None:
                for scope in self.SCOPES:
                    self.means[(scope, name)].update(float(values[name]))

    def result(self, scope: str, name: str) -> float:
        return self.means[(scope, name)].result()

    def reset(self, scope: str) -> None:
        for name in self.names:
            self.means[(scope, name)].reset()

    def summary(self) -> dict[str, float | None]:
        """``loss_running``, ``accuracy_global``, ... for every kept quantity (None: no value)."""
        return {
            f"{name}_{scope}": _clean(self.result(scope, name))
            for scope in self.SCOPES
            for name in self.names
        }

    def state_dict(self) -> dict[str, Any]:
        return {f"{s}/{n}": m.state_dict() for (s, n), m in self.means.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for (scope, name), mean in self.means.items():
            key = f"{scope}/{name}"
            if key in state:
                mean.load_state_dict(state[key])


def _clean(value: float) -> float | None:
    """JSON has no NaN: an undefined mean is written as null."""
    return value if math.isfinite(value) else None


class RateMeter:
    """Tokens/s over the last interval and since the start, MFU and peak GPU memory."""

    def __init__(self, peak_flops: float, device: Any) -> None:
        self.peak_flops = peak_flops
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.device = device
        self.flops_per_token: float | None = None
        self.start(0, 0, time.perf_counter())

    def start(self, tokens: int, step: int, now: float) -> None:
        """Begin counting at ``tokens`` seen and ``step`` (start of the run or of a resume)."""
        self._t0, self._tokens0 = now, tokens
        self._mark_t, self._mark_tokens, self._mark_step = now, tokens, step

    def pause(self, tokens: int, step: int, now: float) -> None:
        """Restart the interval now: time spent outside training steps (validation, a
        checkpoint) then counts in no interval's rate (it still counts in the cumulative one)."""
        self._mark_t, self._mark_tokens, self._mark_step = now, tokens, step

    def interval(self, tokens: int, step: int, now: float) -> dict[str, float | None]:
        """The figures since the last call (or :meth:`pause`), then a new interval begins."""
        span = max(now - self._mark_t, 1e-9)
        rate = (tokens - self._mark_tokens) / span
        steps = max(step - self._mark_step, 1)
        out: dict[str, float | None] = {
            "tokens_per_s": rate,
            "tokens_per_s_cumulative": (tokens - self._tokens0) / max(now - self._t0, 1e-9),
            "step_time_s": span / steps,
            "elapsed_s": now - self._t0,
        }
        if self.cuda:
            import torch

            if self.flops_per_token:
                out["mfu"] = self.flops_per_token * rate / self.peak_flops
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._mark_t, self._mark_tokens, self._mark_step = now, tokens, step
        return out


class MetricsWriter:
    """Appends metric records to ``run_dir/metrics.jsonl`` and, optionally, TensorBoard.

    Only the main rank should create one with ``enabled=True``; other ranks get a silent writer.
    """

    def __init__(
        self, run_dir: str | Path, enabled: bool = True, tensorboard: bool | None = None
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard or tensorboard is None:
            self._tb = _tensorboard_writer(
                Path(run_dir) / "tensorboard", required=bool(tensorboard)
            )

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.exists():
            return
        if self._file is not None:
            self._file.close()
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        clean = {k: (_clean(v) if isinstance(v, float) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            prefix = "val" if record.get("event") == "val" else "train"
            for key, value in record.items():
                if key in ("step", "event") or not isinstance(value, (int, float)):
                    continue
                if isinstance(value, bool) or not math.isfinite(value):
                    continue
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(log_dir: Path, required: bool) -> SummaryWriter | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if required:
            raise PLDRError(
                "'tensorboard' is on but the tensorboard package is missing: "
                "pip install 'pldr-llm[tensorboard]'"
            ) from None
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file (a torn last line is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise PLDRError(f"no metrics file at {path}")
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return records


class ProgressBar:
    """A tqdm bar on stderr (steps, tokens/s, loss, lr, ETA); plain log lines when not a terminal."""

    def __init__(
        self, total: int | None, initial: int, enabled: bool | None, log_every: int
    ) -> None:
        self.log_every = log_every
        self.total = total
        self._bar = None
        self._start = time.perf_counter()
        self._start_step = initial
        self._tok_s = 0.0
        self._mfu: float | None = None  # of the last finished interval (GPU only)
        interactive = sys.stderr.isatty() if enabled is None else enabled
        if interactive:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - a declared dependency
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total,
                    initial=initial,
                    file=sys.stderr,
                    dynamic_ncols=True,
                    unit="step",
                    desc="train",
                )

    def update(self, step: int, record: dict[str, Any]) -> None:
        # The rate of the last finished interval (records between interval ends carry none).
        if record.get("tokens_per_s") is not None:
            self._tok_s = record["tokens_per_s"]
            self._mfu = record.get("mfu")
        tok_s = self._tok_s
        loss, lr = record.get("loss"), record.get("lr")
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(
                loss=f"{loss:.4f}" if loss is not None else "nan",
                lr=f"{lr:.2e}",
                tok_s=f"{tok_s:,.0f}",
                **({"mfu": f"{self._mfu:.3f}"} if self._mfu is not None else {}),
                refresh=False,
            )
            return
        if step % self.log_every == 0 or step == self.total:
            elapsed = time.perf_counter() - self._start
            done = step - self._start_step
            eta = ""
            if not getattr(self, "_legend_shown", False):
                self._legend_shown = True
                logger.info(
                    "columns: this step's loss, (R: mean since the last line, G: mean since "
                    "the start), this step's accuracy and learning rate"
                )
            if self.total and done > 0:
                eta = f" eta {_fmt_time(elapsed / done * (self.total - step))}"
            logger.info(
                "step %s%s loss %s (R %s G %s) acc %s lr %.3e %.0f tok/s%s%s",
                step,
                f"/{self.total}" if self.total else "",
                _fmt(loss),
                _fmt(record.get("loss_running")),
                _fmt(record.get("loss_global")),
                _fmt(record.get("accuracy")),
                lr or 0.0,
                tok_s,
                f" MFU {self._mfu:.3f}" if self._mfu is not None else "",
                eta,
            )

    def advance(self, step: int) -> None:
        """Move the bar to ``step`` without new figures (between two reads of the device)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            logger.info(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "nan"


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

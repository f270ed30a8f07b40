"""Resumable checkpoints (``torch.distributed.checkpoint``) and single-file model exports.

A run folder holds its checkpoints under ``checkpoints/``::

    checkpoints/step_00000200/
        dcp/            model + optimizer, sharded (one file per rank, resharded on load)
        trainer.pt      step, scheduler, meters, epoch (the same on every rank; rank 0 writes it)
        rank00000.pt    this rank's RNG states and data-iterator position (one per rank)
        COMPLETE        written last: the checkpoint is whole

Saving is atomic: everything is written to ``checkpoints/.tmp-step_N`` and renamed to ``step_N``
only after every rank has finished, so a run killed while saving leaves a ``.tmp-*`` folder that
is ignored (and cleaned up) and resumes from the last complete checkpoint.

Loading reshards: a checkpoint written by N ranks loads on M ranks (or into a plain model) because
DCP stores global tensor metadata. Per-rank states are matched by rank when the world size is
unchanged; otherwise the data positions are resharded with :func:`pldr_llm.data.reshard_states`
and the RNG states restart from the seed (the run then continues correctly, but no longer
bit-for-bit like an uninterrupted one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import CHECKPOINT_SUFFIX, io_error_message, safe_torch_load
from pldr_llm.train.distributed import DistEnv, barrier, broadcast_object

__all__ = [
    "CheckpointManager",
    "LoadedCheckpoint",
    "capture_rng_state",
    "restore_rng_state",
    "full_model_state",
    "export_model",
    "original_export",
    "assert_finite_parameters",
]

logger = logging.getLogger("pldr_llm.train")

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


@dataclass
class LoadedCheckpoint:
    """What :meth:`CheckpointManager.load` restores besides the model and optimizer."""

    path: Path
    step: int
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any] | None
    saved_world_size: int


class CheckpointManager:
    """Writes, finds, loads and prunes the checkpoints of one run folder.

    Every method that touches model or optimizer state is collective: all ranks must call it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        env: DistEnv,
        keep_last: int | None = 3,
        protected_steps: tuple[int, ...] = (),
    ) -> None:
        self.root = Path(run_dir) / CHECKPOINT_DIR
        self.env = env
        self.keep_last = keep_last
        self.protected_steps = set(protected_steps)

    # ------------------------------------------------------------------ discovery
    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_RE.match(child.name)
            if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the same answer on every rank)."""
        found = self.complete_checkpoints() if self.env.is_main else None
        found = broadcast_object(found)
        return found[-1][1] if found else None

    def remove_incomplete(self) -> None:
        """Delete ``.tmp-*`` folders left by a save that was killed (main rank)."""
        if self.env.is_main and self.root.is_dir():
            for child in self.root.iterdir():
                if child.name.startswith(".tmp-") or child.name.startswith(".old-"):
                    logger.warning("removing incomplete checkpoint %s", child)
                    shutil.rmtree(child, ignore_errors=True)
        barrier()

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
    ) -> Path:
        """Write the checkpoint of ``step`` atomically; returns its final path."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        assert_finite_parameters(model)
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _write_errors(tmp, final):
            with _single_process_quiet():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
            torch.save(rank_state, tmp / _rank_file(self.env.rank))
            if self.env.is_main:
                torch.save(trainer_state, tmp / TRAINER_STATE)
        barrier()
        if self.env.is_main:
            marker = {
                "step": step,
                "world_size": self.env.world_size,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            _write_synced(tmp / COMPLETE_MARKER, json.dumps(marker) + "\n")
            if final.exists():  # re-saving a step (e.g. after a resume): keep the old until swapped
                old = self.root / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        found = self.complete_checkpoints()
        removable = [(s, p) for s, p in found if s not in self.protected_steps]
        for _, path in removable[: max(0, len(removable) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(
        self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> LoadedCheckpoint:
        """Restore model (and optimizer) from ``path``; return the rest of its state."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        path = Path(path)
        marker_file = path / COMPLETE_MARKER
        if not marker_file.is_file():
            raise PLDRError(f"{path} is not a complete checkpoint ({COMPLETE_MARKER} missing)")
        marker = _read_marker(marker_file)
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
            _dcp_load(state, path)
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        else:
            state = {"model": get_model_state_dict(model)}
            _dcp_load(state, path)
            set_model_state_dict(model, state["model"])
        trainer_state = safe_torch_load(path / TRAINER_STATE)
        saved_world = int(marker.get("world_size", 1))
        rank_state = None
        if saved_world == self.env.world_size:
            rank_path = path / _rank_file(self.env.rank)
            if rank_path.is_file():
                rank_state = safe_torch_load(rank_path)
        else:
            rank_state = self._reshard_rank_states(path, saved_world)
        return LoadedCheckpoint(path, int(marker["step"]), trainer_state, rank_state, saved_world)

    def _reshard_rank_states(self, path: Path, saved_world: int) -> dict[str, Any] | None:
        """Rank state for a different world size: data positions resharded, no RNG states."""
        old = []
        for r in range(saved_world):
            rank_path = path / _rank_file(r)
            if not rank_path.is_file():
                return None
            old.append(safe_torch_load(rank_path))
        logger.warning(
            "resuming a %d-rank checkpoint on %d ranks: data positions are resharded and random "
            "states restart from the seed",
            saved_world,
            self.env.world_size,
        )
        data_states = [s.get("data") for s in old]
        if any(d is None for d in data_states):
            return {}
        from pldr_llm.data import reshard_states

        new_states = reshard_states(data_states, self.env.world_size)
        return {"data": new_states[self.env.rank]}


def _read_marker(path: Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker (JSON written by :meth:`CheckpointManager.save`), checked: a
    malformed one from a folder written elsewhere is one line, not a traceback."""
    from pldr_llm.core.fileio import read_json_object

    marker = read_json_object(path, kind="checkpoint marker")
    for key in ("step", "world_size"):
        value = marker.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PLDRError(f"{path}: '{key}' must be a non-negative integer, got {value!r}")
    if "step" not in marker:
        raise PLDRError(f"{path}: the checkpoint marker has no 'step'")
    return marker


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        yield


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """This process's random states (torch CPU/CUDA, Python, NumPy) as plain, safe-to-load data."""
    # (legacy=True is numpy's default, which its stubs get wrong: a tuple for the MT19937)
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------- exports
def assert_finite_parameters(model: nn.Module) -> None:
    """Raise rather than write weights holding NaN or inf (checked on every rank's shard)."""
    bad = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.numel() and not torch.isfinite(local.detach()).all():
            bad += 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces CUDA tensors only (parameters may be offloaded to the CPU).
        device = _param_device(model)
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([float(bad)], device=device)
        dist.all_reduce(flag)
        bad = int(flag.item())
    if bad > 0:
        raise PLDRError("refusing to save: the model holds non-finite (NaN/inf) weights")


def _param_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        return local.device
    return torch.device("cpu")


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on CPU on the main rank, ``None`` elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if distributed and dist.get_rank() != 0:
        return None
    # Full state dicts of a model hold tensors (the stubs also allow nested containers).
    return {k: cast(torch.Tensor, v).detach().cpu() for k, v in state.items()}


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer_file: str | Path | None = None,
    reference_pth: str | Path | None = None,
    loss: float | None = None,
    accuracy: float | None = None,
) -> Path | None:
    """Write a loadable single-file model into ``out_dir``. Collective; rank 0 writes.

    ``out_dir`` gets ``config.json`` + ``model.safetensors`` (the project format that
    ``pldr-llm generate --model out_dir`` loads) and ``tokenizer.model`` when ``tokenizer_file``
    is given. ``reference_pth`` also writes the weights in the original's ``.pth`` format there.
    """
    from pldr_llm.checkpoint import save_reference_checkpoint
    from pldr_llm.core.config import PLDRConfig
    from pldr_llm.core.model import PLDRModel

    assert_finite_parameters(model)
    state = full_model_state(model)
    if state is None:
        barrier()
        return None
    config = model.config
    if not isinstance(config, PLDRConfig):
        raise PLDRError(f"export needs a PLDRModel, got a {type(model).__name__}")
    plain = PLDRModel(config)
    # Exports are float32 like the original's checkpoints, whatever the training precision.
    missing, unexpected = plain.load_state_dict(
        {k: v.float() for k, v in state.items()}, strict=False
    )
    if missing or unexpected:
        raise PLDRError(f"export: state dict mismatch ({(missing or unexpected)[0]!r})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    plain.save(staging)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, staging / "tokenizer.model")
    # Weights first, config last: a reader never sees a new config with old weights.
    names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "config.json")
    for name in names:
        target = out / name
        if (
            name == "tokenizer.model"
            and tokenizer_file is not None
            and target.exists()
            and target.samefile(tokenizer_file)
        ):
            continue
        os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)
    if reference_pth is not None:
        save_reference_checkpoint(plain, reference_pth, loss=loss, accuracy=accuracy)
    barrier()
    return out


def original_export(folder: str | Path, run_name: str | None) -> tuple[str, Path]:
    """The name of a run's model in the original's bundle format (its ``save_model_path``) and
    the ``.pth`` :meth:`Trainer.fit` writes for it in ``folder/original/``, where
    :func:`pldr_llm.train.run.run` then adds ``<name>_hyperparameters.py`` and the tokenizer."""
    name = run_name or "pldr-llm"
    return name, Path(folder) / "original" / f"{name}-model-checkpoint{CHECKPOINT_SUFFIX}"


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """``dcp.load`` (through :func:`~pldr_llm.train.safe_dcp.safe_dcp_load`: no pickle in the
    folder runs code) that turns a damaged checkpoint (a truncated ``.distcp`` file: EOFError inside
    a ``CheckpointException``) into one line naming it and saying how to go on."""
    from torch.distributed.checkpoint.api import CheckpointException

    from pldr_llm.train.safe_dcp import safe_dcp_load

    try:
        with _single_process_quiet():
            safe_dcp_load(state, path / "dcp")
    except (CheckpointException, OSError, EOFError) as exc:
        reason = str(exc).strip().splitlines()
        cause = next((line.strip() for line in reversed(reason) if "Error" in line), "")
        raise PLDRError(
            f"checkpoint {path} cannot be read, it is damaged ({cause or type(exc).__name__}): "
            f"remove that folder and run the same command to resume from the checkpoint before it"
        ) from None


@contextlib.contextmanager
def _write_errors(tmp: Path, final: Path) -> Iterator[None]:
    """A checkpoint write that fails on a full disk or a file-size limit becomes one line.

    torch's zip writer reports a failed write as ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos`` (the errno is lost), and ``dcp`` wraps errors in a
    ``CheckpointException``; other RuntimeErrors are bugs and pass through. The half-written
    folder is removed; the previous checkpoints were never touched (the new one is renamed into
    place only when complete).
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (CheckpointException, OSError, RuntimeError) as exc:
        text = str(exc)
        if isinstance(exc, RuntimeError) and not isinstance(exc, CheckpointException):
            if "inline_container" not in text and "PytorchStreamWriter" not in text:
                raise
        shutil.rmtree(tmp, ignore_errors=True)
        detail = io_error_message(exc) if isinstance(exc, OSError) else "the write failed"
        raise PLDRError(
            f"could not write checkpoint {final} ({detail}); the disk may be full or a file-size "
            "limit (ulimit -f) reached: free space and run the same command to resume from the "
            "last complete checkpoint"
        ) from None

"""Faults: SIGTERM then the same command again ends like an uninterrupted run; a run killed while
saving resumes from the last complete checkpoint; non-finite losses are skipped, never saved."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pldr_llm.core.errors import PLDRError
from support import MINI_TRAIN_ARGS

REPO = Path(__file__).resolve().parents[1]

MINI = [*MINI_TRAIN_ARGS, "--warmup_steps", "5", "--save_every", "10", "--log_every", "5"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _command(out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pldr_llm",
        "train",
        *MINI,
        "--max-steps",
        str(steps),
        "--out",
        str(out),
    ]


def _steps(run: Path) -> list[dict]:
    from pldr_llm.train.metrics import read_metrics

    return [r for r in read_metrics(run) if r.get("event") is None]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_sigterm_then_same_command_matches_uninterrupted_run(tmp_path: Path) -> None:
    steps = 30
    reference = tmp_path / "straight"
    done = subprocess.run(
        _command(reference, steps), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]

    run = tmp_path / "stopped"
    proc = subprocess.Popen(
        _command(run, steps), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    stop_after = 13  # not a save_every multiple: the signal itself must produce the checkpoint
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(_steps(run)) >= stop_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    stopped_at = _steps(run)[-1]["step"]
    assert stop_after <= stopped_at < steps
    assert (run / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()
    assert not (run / "model.safetensors").exists()  # no export for an unfinished run

    again = subprocess.run(
        _command(run, steps), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resum" in again.stderr

    a, b = _steps(reference), _steps(run)
    assert [r["step"] for r in b] == list(range(1, steps + 1))  # no step twice, none missing
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert [r["loss_global"] for r in b] == pytest.approx([r["loss_global"] for r in a], abs=1e-12)
    wa, wb = _weights(reference), _weights(run)
    assert set(wa) == set(wb)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ---------------------------------------------------------------------- in-process runs
def _tiny_model():
    from pldr_llm import PLDRConfig, PLDRModel

    torch.manual_seed(0)
    return PLDRModel(
        PLDRConfig(
            num_layers=1, d_model=32, num_heads=2, dff=48, A_dff=16, num_reslayerA=1,
            num_denseA=1, input_vocab_size=260, max_seq_len=24,
        )
    )  # fmt: skip


def _data():
    from pldr_llm.data import BatchIterator, ByteTokenizer, ListSource

    docs = [f"document {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 4) for i in range(60)]
    return BatchIterator(
        ListSource(docs), ByteTokenizer(), batch_size=4, sample_length=17, batch_agg_count=2,
        shuffle=True, seed=3, buffer_size=16,
    )  # fmt: skip


def _config(**extra):
    from pldr_llm.train import TrainConfig

    base = dict(
        learning_rate=3e-3, warmup_steps=3, lr_total_steps=50, batch_size=4, max_steps=24,
        save_every=8, keep_last=5, device="cpu", progress=False, export_pth=False,
    )  # fmt: skip
    base.update(extra)
    return TrainConfig(**base)


def _fit(run_dir: Path, **extra):
    from pldr_llm.train import Trainer

    trainer = Trainer(_tiny_model(), _config(**extra), shard=False)
    return trainer, trainer.fit(_data(), run_dir)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no except/finally of the trainer catches it)."""


@pytest.mark.slow
def test_killed_while_saving_resumes_from_last_complete_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    from pldr_llm.train import checkpointing

    ref_trainer, ref = _fit(tmp_path / "straight")
    assert ref.status == "completed" and ref.step == 24

    run = tmp_path / "killed"
    real_write = checkpointing._write_synced

    def dying_write(path: Path, text: str) -> None:
        if path.parent.name == ".tmp-step_00000016":
            raise _Killed  # the model, optimizer and rank files are written; the marker is not
        real_write(path, text)

    monkeypatch.setattr(checkpointing, "_write_synced", dying_write)
    with pytest.raises(_Killed):
        _fit(run)
    monkeypatch.setattr(checkpointing, "_write_synced", real_write)
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp-step_00000016" / "dcp").is_dir()  # the torn save is there ...
    assert not (ckpts / "step_00000016").exists()  # ... but never became a checkpoint
    assert (ckpts / "step_00000008" / "COMPLETE").is_file()

    trainer, result = _fit(run)
    assert result.status == "completed" and result.step == 24
    assert not (ckpts / ".tmp-step_00000016").exists()  # cleaned up
    steps = _steps(run)
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert [r["loss"] for r in steps] == [r["loss"] for r in _steps(tmp_path / "straight")]
    for key, value in ref_trainer.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_extends_a_finished_run(tmp_path: Path) -> None:
    _, first = _fit(tmp_path / "run", max_steps=10)
    assert first.step == 10
    trainer, second = _fit(tmp_path / "run", max_steps=14)
    assert second.status == "completed" and second.step == 14
    lrs = [r["lr"] for r in _steps(tmp_path / "run")]
    assert len(lrs) == 14
    # the schedule is lr_total_steps long whatever max_steps says
    from pldr_llm.train import lr_multiplier

    assert lrs == pytest.approx([3e-3 * lr_multiplier(s, 50, 3, 0.1) for s in range(14)])


def test_nonfinite_loss_is_skipped_and_stops_the_run(tmp_path: Path) -> None:
    from pldr_llm.train import Trainer
    from pldr_llm.train.checkpointing import CheckpointManager, assert_finite_parameters
    from pldr_llm.train.distributed import DistEnv

    model = _tiny_model()
    poison = {"on": False}

    def hook(module, inputs, output):
        return output * float("nan") if poison["on"] else output

    model.final_layer.register_forward_hook(hook)
    trainer = Trainer(model, _config(max_nonfinite_steps=2), shard=False)
    batches = iter(_data())
    trainer.train_step(next(batches))
    trainer.train_step(next(batches))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    poison["on"] = True
    for count in (1, 2):
        result = trainer.train_step(next(batches))
        assert result["skipped"] and not result.get("diverged")
        assert trainer.nonfinite_steps == count
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(value, before[key]), key  # no update, no NaN written
    result = trainer.train_step(next(batches))
    assert result["diverged"]
    assert trainer.step == 5  # skipped steps still consumed their batches
    # the weights stayed finite and can be saved; NaN weights cannot
    manager = CheckpointManager(tmp_path, DistEnv())
    manager.save(
        trainer.step, trainer.model, trainer.optimizer, {"trainer": trainer.state_dict()}, {}
    )
    with torch.no_grad():
        trainer.model.final_layer.weight[0, 0] = float("nan")
    with pytest.raises(PLDRError, match="non-finite"):
        assert_finite_parameters(trainer.model)
    with pytest.raises(PLDRError, match="non-finite"):
        manager.save(6, trainer.model, trainer.optimizer, {"trainer": trainer.state_dict()}, {})
    assert [s for s, _ in manager.complete_checkpoints()] == [5]


@pytest.mark.slow
def test_fit_stops_when_losses_stay_nonfinite(tmp_path: Path) -> None:
    from pldr_llm.train import Trainer

    model = _tiny_model()
    model.final_layer.register_forward_hook(lambda m, i, o: o * float("inf") if m.training else o)
    trainer = Trainer(model, _config(max_nonfinite_steps=3), shard=False)
    result = trainer.fit(_data(), tmp_path)
    assert result.status == "diverged" and result.step == 4
    records = _steps(tmp_path)
    assert all(r.get("skipped") for r in records)
    assert all(r["loss"] is None for r in records)  # NaN is written as null, never as NaN
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert (tmp_path / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.slow
def test_fit_epochs_validation_and_epoch_checkpoints(tmp_path: Path) -> None:
    from pldr_llm.train import Trainer
    from pldr_llm.train.metrics import read_metrics

    batches = list(itertools.islice(iter(_data()), 7))
    train, val = batches[:5], batches[5:]
    config = _config(
        max_steps=None, epochs=2, val_every=3, val_batches=2, save_every=None, save_epochs=(1,)
    )
    trainer = Trainer(_tiny_model(), config, shard=False)
    result = trainer.fit(train, tmp_path, val_data=val)
    assert result.status == "completed" and result.step == 10  # 2 epochs of 5 batches
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records if r.get("event") is None] == [0] * 5 + [1] * 5
    ends = [r for r in records if r.get("event") == "epoch_end"]
    assert [(r["epoch"], r["step"]) for r in ends] == [(0, 5), (1, 10)]
    steps = [r for r in records if r.get("event") is None]
    assert ends[0]["loss_epoch"] == pytest.approx(sum(r["loss"] for r in steps[:5]) / 5)
    vals = [r for r in records if r.get("event") == "val"]
    assert [r["step"] for r in vals] == [3, 6, 9, 10]
    assert all(r["val_batches"] == 2 and r["val_tokens"] > 0 for r in vals)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step_00000005", "step_00000010"]

"""FSDP2 on two CPU processes (gloo) gives the numbers of one process on the same global batch,
and its sharded checkpoint loads into one process (resharding)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from support import FSDP_HP as HP

pytestmark = pytest.mark.multiprocess

STEPS = 4


def _batches() -> list[torch.Tensor]:
    """Global batches of 4 sequences; padding is uneven across the two halves on purpose, so a
    mean of per-rank means would differ from the global token mean."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for step in range(STEPS):
        batch = torch.randint(4, HP["input_vocab_size"], (4, 13), generator=gen)
        batch[0, 9 + step % 3 :] = 0  # rank 0's half gets padding, rank 1's does not
        out.append(batch)
    return out


def _config(**extra):
    from pldr_llm.train import TrainConfig

    return TrainConfig(
        learning_rate=3e-3,
        warmup_steps=1,
        lr_total_steps=10,
        global_batch_size=4,
        device="cpu",
        **extra,
    )


def _model():
    from pldr_llm import PLDRConfig, PLDRModel

    torch.manual_seed(0)
    return PLDRModel(PLDRConfig.from_hpdict(HP))


def _worker(rank: int, world: int, init_file: str, out_dir: str, accum: int, eps: float) -> None:
    import torch.distributed as dist

    from pldr_llm.train import Trainer
    from pldr_llm.train.checkpointing import CheckpointManager, full_model_state
    from pldr_llm.train.distributed import current_env

    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        env = current_env(torch.device("cpu"))
        trainer = Trainer(_model(), _config(grad_accum_steps=accum, eps=eps), env=env)
        assert trainer.sharded and trainer.batch_size == 2
        losses = []
        for batch in _batches():
            half = batch[rank * 2 : rank * 2 + 2]
            result = trainer.train_step(half)
            losses.append([result["loss"], result["accuracy"], result["lr"], result["tokens"]])
        state = full_model_state(trainer.model)
        manager = CheckpointManager(out_dir, env)
        manager.save(
            trainer.step, trainer.model, trainer.optimizer, {"trainer": trainer.state_dict()}, {}
        )
        if rank == 0:
            torch.save(state, Path(out_dir) / "weights.pt")
            (Path(out_dir) / "losses.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def _run_two(tmp_path: Path, accum: int, eps: float) -> tuple[list, dict]:
    import torch.multiprocessing as mp

    out = tmp_path / f"two-{accum}"
    out.mkdir()
    args = (2, str(tmp_path / f"pg-{accum}"), str(out), accum, eps)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    losses = json.loads((out / "losses.json").read_text())
    weights = torch.load(out / "weights.pt", weights_only=True)
    return losses, weights


def _run_one(accum: int = 1, eps: float = 1e-5):
    from pldr_llm.train import Trainer

    trainer = Trainer(_model(), _config(grad_accum_steps=accum, eps=eps), shard=False)
    losses = []
    for batch in _batches():
        result = trainer.train_step(batch)
        losses.append([result["loss"], result["accuracy"], result["lr"], result["tokens"]])
    return trainer, losses


# AdamW divides each gradient element by its running RMS + eps: for elements whose gradient is
# near eps, float32 noise in the gradient (a different summation order, which two ranks or two
# micro-batches always give, even in one process) moves the weight by a good part of an update.
# With a large eps the update is linear in the gradient, so comparing weights compares gradients.
LINEAR_EPS = 1.0


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tmp_path: Path) -> None:
    trainer, ref_losses = _run_one(eps=LINEAR_EPS)
    losses, weights = _run_two(tmp_path, accum=1, eps=LINEAR_EPS)
    for (loss, acc, lr, tokens), (ref_loss, ref_acc, ref_lr, ref_tokens) in zip(losses, ref_losses):
        assert tokens == ref_tokens
        assert lr == ref_lr
        assert loss == pytest.approx(ref_loss, abs=1e-5)
        assert acc == pytest.approx(ref_acc, abs=1e-6)
    assert ref_losses[-1][0] < ref_losses[0][0]  # it did train
    ref_state = trainer.model.state_dict()
    assert set(weights) == set(ref_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=0, msg=key)

    # The 2-rank sharded checkpoint loads into a plain single-process model (resharding).
    from pldr_llm.train import Trainer
    from pldr_llm.train.checkpointing import CheckpointManager
    from pldr_llm.train.distributed import DistEnv

    fresh = Trainer(_model(), _config(eps=LINEAR_EPS), shard=False)
    manager = CheckpointManager(tmp_path / "two-1", DistEnv())
    latest = manager.latest()
    assert latest is not None and latest.name == f"step_{STEPS:08d}"
    loaded = manager.load(latest, fresh.model, fresh.optimizer)
    assert loaded.saved_world_size == 2
    fresh.load_state_dict(loaded.trainer_state["trainer"])
    assert fresh.step == STEPS
    for key, value in fresh.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=0, rtol=0, msg=key)
    # ... with its optimizer state: one more step from the loaded state matches one more step of
    # the uninterrupted single-process trainer.
    extra = _batches()[0]
    a = trainer.train_step(extra)
    b = fresh.train_step(extra)
    assert b["lr"] == a["lr"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


@pytest.mark.slow
def test_fsdp_two_processes_with_gradient_accumulation(tmp_path: Path) -> None:
    """Default AdamW settings, two micro-batches per rank: the same per-step losses (to the
    float32 noise that AdamW amplifies, see LINEAR_EPS)."""
    _, ref_losses = _run_one()
    losses, _ = _run_two(tmp_path, accum=2, eps=1e-5)
    for (loss, _, lr, _), (ref_loss, _, ref_lr, _) in zip(losses, ref_losses):
        assert lr == ref_lr
        assert loss == pytest.approx(ref_loss, abs=1e-4)
    # The first update runs at rate 0: the first two losses are those of the initial weights.
    assert losses[0][0] == pytest.approx(ref_losses[0][0], abs=1e-6)
    assert losses[1][0] == pytest.approx(ref_losses[1][0], abs=1e-6)


def _strategies_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from pldr_llm.train import Trainer
    from pldr_llm.train.checkpointing import full_model_state
    from pldr_llm.train.distributed import current_env

    torch.set_num_threads(1)
    # One "node" of two processes for the hybrid strategies (mesh 1 x 2).
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        env = current_env(torch.device("cpu"))
        results = {}
        for strategy in ("SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
            config = _config(eps=LINEAR_EPS, fsdp_sharding_strategy=strategy)
            trainer = Trainer(_model(), config, env=env)
            losses = [trainer.train_step(b[rank * 2 : rank * 2 + 2])["loss"] for b in _batches()]
            state = full_model_state(trainer.model)
            if rank == 0:
                results[strategy] = {"losses": losses, "state": state}
        if rank == 0:
            torch.save(results, Path(out_dir) / "strategies.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_sharding_strategies_agree(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    trainer, ref_losses = _run_one(eps=LINEAR_EPS)
    mp.spawn(_strategies_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "strategies.pt", weights_only=True)
    assert set(results) == {"SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"}
    ref_state = trainer.model.state_dict()
    for strategy, result in results.items():
        assert result["losses"] == pytest.approx([x[0] for x in ref_losses], abs=1e-5), strategy
        for key, value in ref_state.items():
            torch.testing.assert_close(result["state"][key], value, atol=1e-5, rtol=0, msg=key)


def _evaluate_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from pldr_llm.train import Trainer
    from pldr_llm.train.distributed import current_env

    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(_model(), _config(), env=current_env(torch.device("cpu")))
        halves = [batch[rank * 2 : rank * 2 + 2] for batch in _batches()]
        # rank 1 runs out of validation batches one batch before rank 0
        result = trainer.evaluate(halves[:3] if rank == 0 else halves[:2])
        (Path(out_dir) / f"val{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_evaluate_stops_when_any_rank_runs_out(tmp_path: Path) -> None:
    """Ranks with unequal validation data all stop at the shortest (the same number of FSDP
    forward passes, else the collectives would hang), and the figures are those of one process
    on the global batches they saw."""
    import torch.multiprocessing as mp

    from pldr_llm.train import Trainer

    mp.spawn(_evaluate_worker, args=(2, str(tmp_path / "pg-val"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"val{r}.json").read_text()) for r in range(2)]
    reference = Trainer(_model(), _config(), shard=False).evaluate(_batches()[:2])
    for result in results:
        assert result["val_batches"] == 2
        assert result["val_tokens"] == reference["val_tokens"]
        assert result["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-5)
        assert result["val_accuracy"] == pytest.approx(reference["val_accuracy"], abs=1e-6)

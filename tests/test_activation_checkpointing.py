"""Activation checkpointing (``PLDRModel.set_activation_checkpointing``): each mode gives the
gradients of no checkpointing -- in the core model, compiled per layer, through the Trainer and
through transformers' ``gradient_checkpointing_enable()`` -- and keeps fewer activations.

Tolerance: a checkpointed layer recomputes its forward from the same inputs with the same
kernels, so on the CPU in float32 the gradients are bit-identical to the plain ones (the tests
see a difference of exactly 0). The bound of 1e-6 leaves room for a kernel that is not
deterministic from run to run, and is far below what a real change of arithmetic moves: the
power law ``A_LM ** pw`` turns a float32 reordering into gradient differences of 1e-3 and more
(docs/training.md, "Why the fast path is not bit-faithful").
"""

from __future__ import annotations

import pytest
import torch

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.core.errors import PLDRError

HP = {
    "num_layers": 2,
    "d_model": 32,
    "num_heads": 2,
    "dff": 48,
    "A_dff": 16,
    "num_reslayerA": 2,
    "num_denseA": 2,
    "input_vocab_size": 97,
    "max_seq_len": 32,
}
MODES = ("layer", "selective")
TOLERANCE = 1e-6


def _model(mode: str = "off") -> PLDRModel:
    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig.from_hpdict(HP)).train()
    model.set_activation_checkpointing(mode)
    return model


def _config(mode: str = "off", **extra):
    """The training settings of every trainer here, with checkpointing ``mode``."""
    from pldr_llm.train import TrainConfig

    return TrainConfig(
        learning_rate=3e-3,
        warmup_steps=1,
        lr_total_steps=10,
        activation_checkpointing=mode,
        **extra,
    )


def _batch() -> torch.Tensor:
    ids = torch.randint(
        1, HP["input_vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1)
    )
    ids[0, 12:] = 0  # padding in one row: the masked path is checkpointed too
    return ids


def _gradients(model: PLDRModel, dag: bool = False) -> dict[str, torch.Tensor]:
    from pldr_llm.core.losses import dag_loss

    ids = _batch()
    out = model(ids[:, :-1], labels=ids[:, 1:], output_deductive=dag, output_scores=False)
    loss = out.loss
    if dag:  # the DAG terms read A_LM, A_P and G_LM, outputs of the checkpointed region
        loss = loss + dag_loss(out.deductive, (0.05, 0.05, 0.05))[0]
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == ref.keys()
    for name, value in ref.items():
        assert value.abs().max() > 0 or "predefined" in name, name  # the gradient exists
        torch.testing.assert_close(grads[name], value, atol=TOLERANCE, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("dag", [False, True], ids=["lm", "dag"])
@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_gradients_equal_plain_gradients(mode: str, dag: bool) -> None:
    _assert_same(_gradients(_model(mode), dag), _gradients(_model("off"), dag))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_causal_metric_nests_its_own_checkpoints(mode: str) -> None:
    """With ``causal_metric`` the metric learner checkpoints each 64-position block itself: that
    checkpoint then runs inside the layer's (nested, both non-reentrant), same gradients."""

    def grads(checkpointing: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        config = PLDRConfig.from_hpdict({**HP, "max_seq_len": 160, "causal_metric": True})
        model = PLDRModel(config).train()
        model.set_activation_checkpointing(checkpointing)
        ids = torch.randint(1, 97, (2, 131), generator=torch.Generator().manual_seed(1))
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()  # 130 positions: 3 blocks
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    _assert_same(grads(mode), grads("off"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_checkpointing_keeps_fewer_activations(mode: str) -> None:
    """Bytes the forward keeps for backward (saved-tensor hooks see what autograd keeps; a
    checkpointed region keeps only its inputs)."""

    def kept(model: PLDRModel) -> int:
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        ids = _batch()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        # no KV-cache from a checkpointed pass (returned, it would stay alive through backward)
        assert (out.cache.kv is None) == (model.activation_checkpointing != "off")
        return total

    plain, checkpointed = kept(_model("off")), kept(_model(mode))
    assert checkpointed < (0.5 if mode == "layer" else 0.9) * plain


def test_eval_and_no_grad_passes_are_not_checkpointed() -> None:
    model = _model("layer").eval()
    ids = _batch()
    out = model(ids[:, :-1])
    assert out.cache.kv is not None and len(out.cache.kv) == HP["num_layers"]
    with torch.no_grad():
        assert model.train()(ids[:, :-1]).cache.kv is not None


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(PLDRError, match="activation checkpointing must be one of"):
        _model().set_activation_checkpointing("full")
    from pldr_llm.train import TrainConfig

    with pytest.raises(PLDRError, match="'activation_checkpointing' must be one of"):
        TrainConfig(activation_checkpointing="every")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_checkpointing_inside_compiled_layers(mode: str) -> None:
    """Per-layer torch.compile traces the checkpoint (no graph break). The ``aot_eager`` backend
    runs the traced graph with eager kernels, so the gradients are still bit-comparable; the
    inductor backend (the GPU's) is checked against eager by the GPU test below."""
    import torch._dynamo

    from pldr_llm.core.compile import compile_decoder_layers

    torch._dynamo.reset()
    model = compile_decoder_layers(_model(mode), backend="aot_eager", fullgraph=True)
    _assert_same(_gradients(model), _gradients(_model("off")))


def _train(mode: str, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    from pldr_llm.train import Trainer

    trainer = Trainer(_model(), _config(mode, batch_size=3, device="cpu"), shard=False)
    assert trainer.model.activation_checkpointing == mode
    batch = _batch()  # the same batch every step: its loss must fall
    losses = [trainer.train_step(batch)["loss"] for _ in range(steps)]
    return losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_trainer_with_checkpointing_trains_like_without(mode: str) -> None:
    losses, weights = _train(mode)
    ref_losses, ref_weights = _train("off")
    assert losses == pytest.approx(ref_losses, abs=TOLERANCE, rel=0)
    assert ref_losses[-1] < ref_losses[0]  # it trained
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, atol=TOLERANCE, rtol=0, msg=name)


@pytest.mark.slow
def test_transformers_gradient_checkpointing_uses_the_core_switch() -> None:
    pytest.importorskip("transformers")
    import warnings

    from pldr_llm.hf import PldrllmForCausalLM

    ids = _batch()

    def grads(enable: bool) -> tuple[PldrllmForCausalLM, dict[str, torch.Tensor]]:
        model = PldrllmForCausalLM.from_core(_model()).train()
        if enable:
            with warnings.catch_warnings():  # transformers 5 deprecates the name
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        return model, {n: p.grad.clone() for n, p in model.named_parameters()}

    model, checkpointed = grads(True)
    assert model.core.activation_checkpointing == "layer"
    assert model.is_activation_checkpointing
    _assert_same(checkpointed, grads(False)[1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()
        assert model.core.activation_checkpointing == "off"
        with pytest.raises(PLDRError, match="use_reentrant=True"):
            model.gradient_checkpointing_enable({"use_reentrant": True})
        with pytest.raises(PLDRError, match="no options"):
            model.gradient_checkpointing_enable(
                {"use_reentrant": False, "preserve_rng_state": False}
            )
    assert model.core.activation_checkpointing == "off"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_gpu_compiled_graphs_with_checkpointing_follow_eager(mode: str) -> None:
    """The GPU default levers (compiled layers with CUDA graphs, bf16) with checkpointing: the
    same first losses as without, to the fast path's tolerance (inductor may fuse the recomputed
    forward differently; bf16)."""
    from pldr_llm.train import Trainer

    def losses(ckpt: str) -> list[float]:
        trainer = Trainer(_model(), _config(ckpt, batch_size=4, device="cuda"), shard=False)
        assert trainer.levers["cuda_graphs"]
        gen = torch.Generator().manual_seed(3)
        batches = [torch.randint(1, 97, (4, 33), generator=gen) for _ in range(3)]
        return [trainer.train_step(b)["loss"] for b in batches]

    HP["max_seq_len"] = 64
    try:
        assert losses(mode) == pytest.approx(losses("off"), abs=1e-2, rel=0)
    finally:
        HP["max_seq_len"] = 32


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist

    from pldr_llm.train import Trainer
    from pldr_llm.train.distributed import current_env

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        env = current_env(torch.device("cpu"))
        losses = {}
        for mode in MODES:
            # eps 1: linear updates, see tests/test_train_multiprocess.py, LINEAR_EPS
            config = _config(mode, global_batch_size=4, eps=1.0, device="cpu")
            trainer = Trainer(_model(), config, env=env)
            assert trainer.sharded
            losses[mode] = [
                trainer.train_step(b[2 * rank : 2 * rank + 2])["loss"] for b in _fsdp_batches()
            ]
        if rank == 0:
            Path(out_dir, "losses.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def _fsdp_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(1, HP["input_vocab_size"], (4, 13), generator=gen) for _ in range(3)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_checkpointing_under_fsdp_two_processes(tmp_path) -> None:
    """FSDP2 on two gloo processes with each checkpointing mode: the losses of one process
    without checkpointing on the same global batches (the checkpoint runs inside each layer's
    FSDP unit, whose parameters are gathered again for the recomputation)."""
    import json

    import torch.multiprocessing as mp

    from pldr_llm.train import Trainer

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    losses = json.loads((tmp_path / "losses.json").read_text())
    trainer = Trainer(_model(), _config(batch_size=4, eps=1.0, device="cpu"), shard=False)
    reference = [trainer.train_step(b)["loss"] for b in _fsdp_batches()]
    for mode in MODES:
        # two ranks reduce in another order than one process sums: float32 noise, as in
        # tests/test_train_multiprocess.py (1e-5 over a few steps)
        assert losses[mode] == pytest.approx(reference, abs=1e-5, rel=0), mode

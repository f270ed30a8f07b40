"""The causal-leak audit (pldr_llm.deductive.leak_audit) and model.causal_metric.

Tolerances: float64 runs agree to ~1e-15 in loss; we allow 1e-9 (the prefix batches use a padded
mask and another summation order than a lone prefix pass, and the power law A_LM ** pw amplifies
relative rounding by |pw| per layer). float32 runs are checked at 2e-3 nats: rounding of
~1e-7 relative in A moves G_LM by |pw| times that, and the logits by ||q|| ||k|| times G's error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.variants import predefined_G_model
from pldr_llm.deductive import leak_audit

CONFIG = PLDRConfig(
    num_layers=2,
    d_model=32,
    num_heads=2,
    dff=48,
    A_dff=16,
    num_reslayerA=2,
    num_denseA=2,
    input_vocab_size=60,
    max_seq_len=32,
)
LENGTH = 24  # > 16, where the CPU SDPA kernel switches path


def _model(causal: bool = False, dtype: torch.dtype = torch.float64, seed: int = 0) -> PLDRModel:
    torch.manual_seed(seed)
    config = dataclasses.replace(CONFIG, causal_metric=causal)
    return PLDRModel(config).to(dtype).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, CONFIG.input_vocab_size, (LENGTH,), generator=g)


@torch.no_grad()
def _brute_force(model: PLDRModel, ids: torch.Tensor) -> torch.Tensor:
    """Loss of token t+1 from a pass over ids[:t+1] alone, for every t."""
    out = []
    for t in range(len(ids) - 1):
        logits = model(ids[None, : t + 1]).logits[0, -1].to(torch.float64)
        out.append(F.cross_entropy(logits, ids[t + 1]))
    return torch.stack(out)


def _trained(causal: bool = False) -> PLDRModel:
    """A model trained for 25 AdamW steps on one repeated pattern (its loss drops by more than
    a nat): the power-law weights are no longer at init."""
    model = _model(causal, torch.float32, seed=3).train()
    pattern = torch.arange(4, 16).repeat(3)[:LENGTH][None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        logits = model(pattern).logits
        loss = F.cross_entropy(logits[0, :-1], pattern[0, 1:])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0
    return model.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_causal_loss_is_every_prefix_alone_random_model(dtype: torch.dtype, tol: float) -> None:
    model, ids = _model(dtype=dtype), _ids()
    audit = leak_audit(model, ids, prompt_len=10, block=7)  # blocks do not divide 39
    brute = _brute_force(model, ids)
    assert torch.allclose(torch.tensor(audit.loss_causal, dtype=torch.float64), brute, atol=tol)
    # ... and differs from the full-sequence loss, which sees the future through A.
    full = torch.tensor(audit.loss_full, dtype=torch.float64)
    assert (full - brute).abs().max() > 100 * tol
    assert abs(audit.overall["causal_minus_full"] - float((brute - full).mean())) < 1e-6
    assert audit.layers[0].g_rmse_causal > 0 and audit.layers[1].g_rmse_prompt > 0


def test_as_trained_loss_is_the_trainers_loss_on_the_same_batch() -> None:
    """The as-trained pass is the trainer's: inputs ids[:-1]. Trainer.evaluate computes the same
    figure in float32 (its cross-entropy, summed over 23 positions), hence 1e-5; a pass over the
    whole text (A seeing the last target too) is 100x further away than that."""
    from pldr_llm.train import TrainConfig, Trainer

    model, ids = _model(dtype=torch.float32), _ids()
    audit = leak_audit(model, ids, prompt_len=10)
    trainer = Trainer(model, TrainConfig(device="cpu", progress=False, batch_size=1), shard=False)
    trained = trainer.evaluate([ids[None]])["val_loss"]
    assert abs(audit.overall["full"] - trained) < 1e-5
    with torch.no_grad():
        whole_text = F.cross_entropy(model(ids[None]).logits[0, :-1].double(), ids[1:]).item()
    assert abs(whole_text - trained) > 1e-3


def test_last_position_as_trained_and_causal_are_one_pass() -> None:
    """Position L-2 sees ids[:L-1] in both passes (its causal prefix is the trainer's input)."""
    model, ids = _model(), _ids()
    audit = leak_audit(model, ids, prompt_len=10, block=5)
    assert abs(audit.loss_full[-1] - audit.loss_causal[-1]) < 1e-9
    earlier = [abs(f - c) for f, c in zip(audit.loss_full[:-1], audit.loss_causal[:-1])]
    assert max(earlier) > 1e-4  # earlier positions see later inputs through A


@pytest.mark.slow
def test_causal_loss_is_every_prefix_alone_trained_model() -> None:
    model = _trained()
    ids = torch.arange(4, 16).repeat(3)[:LENGTH]
    audit = leak_audit(model, ids, prompt_len=12, block=16)
    brute = _brute_force(model, ids)
    assert torch.allclose(torch.tensor(audit.loss_causal, dtype=torch.float64), brute, atol=2e-3)
    model64 = model.double()
    audit64 = leak_audit(model64, ids, prompt_len=12, block=16)
    brute64 = _brute_force(model64, ids)
    assert torch.allclose(
        torch.tensor(audit64.loss_causal, dtype=torch.float64), brute64, atol=1e-9
    )


def test_generation_loss_is_greedy_decoding_with_caches() -> None:
    """loss_generation[k] is the loss of the logits that step-by-step KV+G-cache decoding sees."""
    model, ids = _model(), _ids()
    audit = leak_audit(model, ids, prompt_len=12)
    with torch.no_grad():
        out = model(ids[None, :12])
        cache, losses = out.cache, [F.cross_entropy(out.logits[0, -1], ids[12])]
        for t in range(12, LENGTH - 1):
            out = model(ids[None, t : t + 1], cache=cache)
            cache = out.cache
            losses.append(F.cross_entropy(out.logits[0, -1], ids[t + 1]))
    assert torch.allclose(
        torch.tensor(audit.loss_generation, dtype=torch.float64), torch.stack(losses), atol=1e-9
    )
    assert len(audit.loss_generation) == LENGTH - 12


def test_causal_metric_model_full_loss_is_causal_loss() -> None:
    model, ids = _model(causal=True), _ids()
    for layer in model.decoder.dec_layers:
        layer.mha1.metric_block = 6  # several blocks of the cumulative sum
    audit = leak_audit(model, ids, prompt_len=10, block=7)
    full = torch.tensor(audit.loss_full, dtype=torch.float64)
    assert torch.allclose(full, torch.tensor(audit.loss_causal, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(full, _brute_force(model, ids), atol=1e-9)
    assert audit.layers[0].g_rmse_causal > 0  # G_LM does move: it is per position now


def test_causal_metric_kv_cache_holds_the_running_sum() -> None:
    """With causal_metric, decoding with the KV-cache alone reproduces the full pass."""
    model, ids = _model(causal=True), _ids()
    with torch.no_grad():
        full = model(ids[None]).logits[0]
        out = model(ids[None, :9])
        cache, steps = out.cache.drop_g(), [out.logits[0, -1]]
        for t in range(9, LENGTH):
            out = model(ids[None, t : t + 1], cache=cache)
            cache = out.cache.drop_g()
            steps.append(out.logits[0, -1])
    assert torch.allclose(torch.stack(steps), full[8:], atol=1e-9)


def test_causal_metric_one_layer_equals_prefix_runs_of_the_original() -> None:
    """With one layer, G_LM(t) from positions <= t is exactly what a pass over the prefix of
    the original model uses at its last position."""
    torch.manual_seed(0)
    config = dataclasses.replace(CONFIG, num_layers=1)
    plain = PLDRModel(config).double().eval()
    causal = PLDRModel(dataclasses.replace(config, causal_metric=True)).double().eval()
    causal.load_state_dict(plain.state_dict())
    ids = _ids()
    with torch.no_grad():
        logits = causal(ids[None]).logits[0, :-1]
    losses = F.cross_entropy(logits, ids[1:], reduction="none")
    assert torch.allclose(losses, _brute_force(plain, ids), atol=1e-9)


def test_causal_metric_gradients_do_not_depend_on_the_block() -> None:
    """Checkpointed blocks recompute exactly what one block computes."""
    ids = _ids()[None]
    grads = []
    for block in (5, LENGTH):
        model = _model(causal=True).train()
        for layer in model.decoder.dec_layers:
            layer.mha1.metric_block = block
        logits = model(ids).logits
        F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-10, rtol=1e-8)


def test_predefined_G_all_three_losses_agree() -> None:
    model = predefined_G_model(_model(), [torch.eye(16).expand(2, 16, 16)] * 2).eval()
    audit = leak_audit(model, _ids(), prompt_len=15, block=5)
    full = torch.tensor(audit.loss_full, dtype=torch.float64)
    causal = torch.tensor(audit.loss_causal, dtype=torch.float64)
    assert torch.allclose(full, causal, atol=1e-9)
    assert torch.allclose(
        full[14:], torch.tensor(audit.loss_generation, dtype=torch.float64), atol=1e-9
    )
    assert all(x.g_rmse_causal == 0 and x.g_rmse_prompt == 0 for x in audit.layers)


def test_causal_metric_config_round_trip() -> None:
    assert "causal_metric" not in CONFIG.to_dict()  # config files of the original unchanged
    on = dataclasses.replace(CONFIG, causal_metric=True)
    assert PLDRConfig.from_dict(on.to_dict()).causal_metric is True
    with pytest.raises(PLDRError, match="causal_metric"):
        dataclasses.replace(CONFIG, causal_metric="yes")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt_len": 0}, "prompt length"),
        ({"prompt_len": LENGTH}, "prompt length"),
        ({"block": 0}, "block"),
    ],
)
def test_leak_audit_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(PLDRError, match=message):
        leak_audit(_model(), _ids(), **kwargs)


def test_leak_audit_rejects_padding_and_long_text() -> None:
    ids = _ids().clone()
    ids[5] = CONFIG.pad_id
    with pytest.raises(PLDRError, match="padding id"):
        leak_audit(_model(), ids)
    with pytest.raises(PLDRError, match="max_seq_len"):
        leak_audit(_model(), torch.randint(4, 60, (CONFIG.max_seq_len + 1,)))


def test_leak_audit_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from pldr_llm.deductive import plot_leak

    audit = leak_audit(_model(dtype=torch.float32), _ids(), prompt_len=10)
    data = audit.to_dict()
    assert data["format"] == "pldr-llm-leak-audit" and len(data["loss_full"]) == LENGTH - 1
    assert "causal - as trained" in audit.summary()
    summary = plot_leak(tmp_path / "leak.png", audit)
    assert summary.grids == {"loss": (2, 1)}
    assert (tmp_path / "leak.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_plot_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plots and reports go through fileio: a disk that fills up while the image is written
    leaves the previous image whole (and no temporary beside it); a missing folder is created."""
    pytest.importorskip("matplotlib")
    import errno

    from matplotlib.figure import Figure

    from pldr_llm.deductive import plot_leak

    audit = leak_audit(_model(dtype=torch.float32), _ids(), prompt_len=10)
    png = tmp_path / "plots" / "leak.png"
    plot_leak(png, audit)
    before = png.read_bytes()

    def full_disk(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError):
        plot_leak(png, audit)
    assert png.read_bytes() == before
    assert [p.name for p in png.parent.iterdir()] == ["leak.png"]
    monkeypatch.undo()
    report = tmp_path / "reports" / "leak.json"
    assert json.loads(audit.to_json(report)) == json.loads(report.read_text())


@pytest.mark.gpu
def test_leak_audit_on_gpu_matches_cpu() -> None:
    """The audit and the causal metric give the CPU's figures on CUDA (float32: TF32 off by
    default for matmuls, so rounding stays near float32's)."""
    ids = _ids()
    for causal in (False, True):
        cpu = leak_audit(_model(causal, torch.float32), ids, prompt_len=10, block=7)
        gpu = leak_audit(_model(causal, torch.float32).cuda(), ids.cuda(), prompt_len=10, block=7)
        for name in ("loss_full", "loss_causal", "loss_generation"):
            a = torch.tensor(getattr(cpu, name), dtype=torch.float64)
            b = torch.tensor(getattr(gpu, name), dtype=torch.float64)
            assert torch.allclose(a, b, atol=2e-3), name

"""Long context: a small model with ``max_seq_len`` 8192 builds and trains at 8192 tokens on the
CPU -- its rotary table reaches the last position, the chunked loss equals the loss of the full
logits, a packed batch and a padded one (the explicit mask) both step. The GPU figures at 4096 and
8192 (the 110M shape) come from ``benchmarks/train_speed.py --context`` (docs/training.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pldr_llm import PLDRConfig, PLDRModel

CONTEXT = 8192
HP = {
    "num_layers": 1,
    "d_model": 32,
    "num_heads": 2,
    "dff": 48,
    "A_dff": 16,
    "num_reslayerA": 1,
    "num_denseA": 2,
    "input_vocab_size": 50,
    "max_seq_len": CONTEXT,
}


def _model() -> PLDRModel:
    torch.manual_seed(0)
    return PLDRModel(PLDRConfig.from_hpdict(HP))


def test_rotary_table_reaches_the_last_position() -> None:
    rotary = _model().decoder.dec_layers[0].mha1.rotary
    assert rotary.cos.shape == (CONTEXT, 16)
    theta = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    expected = torch.cos((CONTEXT - 1) * theta).repeat_interleave(2)
    # The angles are float32 products, as in the original: 8191 rad is rounded to within
    # 8191 * 2^-24 = 4.9e-4 rad, so the cosines agree to that.
    torch.testing.assert_close(rotary.cos[-1].double(), expected, atol=5e-4, rtol=0)
    with pytest.raises(Exception, match="exceeds max_seq_len=8192"):
        _model()(torch.ones(1, CONTEXT + 1, dtype=torch.long))


@pytest.mark.slow
def test_trains_at_8192_tokens() -> None:
    from pldr_llm.train import TrainConfig, Trainer

    model = _model()
    config = TrainConfig(
        learning_rate=1e-2,
        warmup_steps=1,
        lr_total_steps=10,
        batch_size=1,
        device="cpu",
        chunked_loss=True,  # the GPU default: the loss a chunk of rows at a time
    )
    trainer = Trainer(model, config, shard=False)
    batch = torch.randint(1, 50, (1, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits  # plain causal kernel, full logits
    full = F.cross_entropy(logits.reshape(-1, 50).float(), batch[:, 1:].reshape(-1)).item()

    first = trainer.train_step(batch)  # step 0 of the schedule: rate 0, weights unchanged
    assert first["tokens"] == CONTEXT
    assert first["loss"] == pytest.approx(full, abs=1e-5)  # chunked == full, float32
    second = trainer.train_step(batch)
    third = trainer.train_step(batch)
    assert math.isfinite(third["loss"]) and third["loss"] < second["loss"]

    padded = batch.clone()
    padded[0, 6001:] = 0  # padding: the [1, 1, 8192, 8192] mask instead of the causal kernel
    result = trainer.train_step(padded)
    assert result["tokens"] == 6000 and math.isfinite(result["loss"])
    assert not result["skipped"]

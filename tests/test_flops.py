"""The MFU's FLOP count (pldr_llm.train.flops): a hand count of a small config, PyTorch's own
count of the eager model's forward and backward, and the figure in the progress line."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.train.flops import forward_flops, training_flops_per_token

# d 8, 2 heads of dk 4, d_ff 12, 1 residual unit of 2 GLUs of width 5, vocabulary 10
HP = {
    "num_layers": 2,
    "d_model": 8,
    "num_heads": 2,
    "dff": 12,
    "A_dff": 5,
    "num_reslayerA": 1,
    "num_denseA": 2,
    "input_vocab_size": 10,
    "max_seq_len": 8,
}
CONTEXT = 3


def test_forward_flops_equal_a_hand_count() -> None:
    # Per layer, L = 3: wq wk wv dense 4*2*3*8*8; SwiGLU 3*2*3*8*12; QK^T + AV 2*2*3*3*8;
    # Q G_LM 2*3*8*4; metric learner: Q^T Q 2*3*8*4, 2 heads * 1 unit * 2 GLUs * 3 matrices
    # * 2*4*4*5, W A and a A_P 2 heads * 2 * 2*4*4*4. LM head 2*3*8*10.
    per_layer = {
        "projections": 1536,
        "feed_forward": 1728,
        "attention": 288,
        "g_lm": 192,
        "metric_learner": 192 + 1920 + 512,
    }
    expected = {k: 2 * v for k, v in per_layer.items()} | {"lm_head": 480}
    config = PLDRConfig.from_hpdict(HP)
    assert forward_flops(config, CONTEXT) == expected
    assert training_flops_per_token(config, CONTEXT) == 3 * sum(expected.values()) / CONTEXT


def test_flops_equal_pytorchs_count_of_the_eager_model() -> None:
    """torch's FlopCounterMode counts every matrix product the eager model runs, forward and
    backward: the same total as the formula (which is why backward is counted as 2x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    for context, hp in ((CONTEXT, HP), (7, {**HP, "num_heads": 4, "num_reslayerA": 2})):
        config = PLDRConfig.from_hpdict(hp)
        model = PLDRModel(config)
        model.attn_implementation = "eager"  # every product explicit
        ids = torch.randint(1, hp["input_vocab_size"], (2, context))
        with FlopCounterMode(display=False) as counter:
            logits = model(ids).logits
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).backward()
        counted_per_token = counter.get_total_flops() / ids.numel()
        assert counted_per_token == pytest.approx(
            training_flops_per_token(config, context), rel=1e-12
        )


def test_variants_count_their_metric_learner() -> None:
    config = PLDRConfig.from_hpdict(HP)
    plain = forward_flops(config, CONTEXT)["metric_learner"]
    causal = forward_flops(PLDRConfig.from_hpdict({**HP, "causal_metric": True}), CONTEXT)
    # once per position instead of once per sequence (Q^T Q stays 2 L d dk)
    assert causal["metric_learner"] == 2 * (192 + CONTEXT * (1920 + 512))
    assert plain == 2 * (192 + 1920 + 512)
    predefined = forward_flops(PLDRConfig.from_hpdict({**HP, "version": "v510G"}), CONTEXT)
    assert predefined["metric_learner"] == 0 and predefined["g_lm"] == 2 * 192


def test_trainer_and_progress_line_use_the_count(caplog: pytest.LogCaptureFixture) -> None:
    from pldr_llm.train import TrainConfig, Trainer
    from pldr_llm.train.metrics import ProgressBar

    model = PLDRModel(PLDRConfig.from_hpdict(HP))
    trainer = Trainer(model, TrainConfig(device="cpu"), shard=False)
    assert trainer.flops_per_token(CONTEXT) == training_flops_per_token(model.config, CONTEXT)

    bar = ProgressBar(total=10, initial=0, enabled=False, log_every=5)
    record = {"loss": 2.0, "lr": 1e-3, "tokens_per_s": 1000.0, "mfu": 0.2712}
    with caplog.at_level(logging.INFO, logger="pldr_llm.train"):
        bar.update(5, record)
    assert "1000 tok/s MFU 0.271" in caplog.text


def test_documented_per_token_figures() -> None:
    """docs/speed.md's table of F and its shares is what the formula gives."""
    import re
    from pathlib import Path

    from pldr_llm.presets import load_preset

    doc = Path(__file__).resolve().parents[1] / "docs" / "speed.md"
    rows = re.findall(r"^\| ([\w-]+), (\d+) \| ([\d.]+) \|(.*)\|$", doc.read_text(), re.M)
    assert len(rows) == 5
    for name, context, flops, shares in rows:
        model = load_preset(name)["model"]
        config = PLDRConfig(**{**model, "max_seq_len": max(int(context), model["max_seq_len"])})
        parts = forward_flops(config, int(context))
        assert float(flops) == pytest.approx(
            training_flops_per_token(config, int(context)) / 1e9, abs=5e-4
        )
        documented = [float(s.strip().rstrip("%")) for s in shares.split("|")]
        computed = [100 * v / sum(parts.values()) for v in parts.values()]
        assert documented == pytest.approx(computed, abs=0.051), name

"""The trainer's chunked loss (issue-7 lever) computes the same step as the full-logits path."""

from __future__ import annotations

import pytest
import torch

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.core.errors import PLDRError
from pldr_llm.train import TrainConfig, Trainer
from support import TINY_TRAIN_HP

HP = TINY_TRAIN_HP


def _run(chunked: bool, steps: int = 3):
    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig.from_hpdict(HP))
    model.attn_implementation = "eager"
    config = TrainConfig(
        learning_rate=1e-2, warmup_steps=1, lr_total_steps=10, chunked_loss=chunked, device="cpu"
    )
    trainer = Trainer(model, config)
    gradients: list[dict[str, torch.Tensor]] = []
    step = trainer.optimizer.step

    def capture_then_step(*args, **kwargs):
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture_then_step
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(4, 97, (3, 13), generator=generator)
    batch[2, -4:] = 0  # padding: masked in the loss and the accuracy
    return [trainer.train_step(batch) for _ in range(steps)], gradients


def test_chunked_loss_step_equals_full_logits_step():
    plain, plain_grads = _run(False)
    chunked, chunked_grads = _run(True)
    for a, b in zip(plain, chunked):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert a["accuracy"] == b["accuracy"] and a["lr"] == b["lr"]
    # same weights at the first step (it runs at rate 0): gradients equal to float32 rounding
    for name, grad in plain_grads[0].items():
        torch.testing.assert_close(chunked_grads[0][name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in plain_grads[0].values())
    assert plain[-1]["loss"] < plain[0]["loss"]  # it does train


def test_validation_with_the_chunked_loss_never_builds_full_logits(monkeypatch):
    """Validation takes the loss the way training does: with ``chunked_loss``, inside the
    forward from the hidden states, and to the same figures as from full logits."""
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(4, 97, (3, 13), generator=generator) for _ in range(2)]
    batches[1][0, -5:] = 0  # padding: not counted
    results = {}
    for chunked in (False, True):
        torch.manual_seed(0)
        model = PLDRModel(PLDRConfig.from_hpdict(HP))
        config = TrainConfig(chunked_loss=chunked, dag_reg_coeffs=(0.1, 0.1, 0.1), device="cpu")
        trainer = Trainer(model, config)
        if chunked:

            def full_logits(*args, **kwargs):
                raise AssertionError("validation built the full logits")

            monkeypatch.setattr("pldr_llm.train.trainer.masked_ce_sum_and_hits", full_logits)
        results[chunked] = trainer.evaluate(batches)
    plain, chunked = results[False], results[True]
    assert plain["val_tokens"] == chunked["val_tokens"] == 2 * 3 * 12 - 5
    # float32 sums of the same per-token terms in another order
    assert abs(plain["val_loss"] - chunked["val_loss"]) < 1e-5
    assert plain["val_accuracy"] == chunked["val_accuracy"]
    assert plain["val_dag_G"] == chunked["val_dag_G"]


@pytest.mark.slow
def test_attn_implementation_reaches_the_model_and_is_refused_for_another_module():
    config = TrainConfig(device="cpu", progress=False, attn_implementation="eager")
    model = PLDRModel(PLDRConfig.from_hpdict(HP))
    assert model.attn_implementation == "sdpa"
    Trainer(model, config, shard=False)
    assert model.attn_implementation == "eager"
    # A module that is not a PLDRModel would take the attribute and ignore it: refused.
    with pytest.raises(PLDRError, match="'attn_implementation' needs a PLDRModel"):
        Trainer(torch.nn.Linear(4, 4), config, shard=False)

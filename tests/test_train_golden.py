"""The trainer reproduces the original's first three training steps (golden data, float32, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pldr_llm.train import Trainer, lr_multiplier
from support import golden_trainer


def _three_steps(golden_dir, golden_case, golden_expected, **extra):
    trainer = golden_trainer(golden_dir, golden_case, **extra)
    ids = golden_expected["input_ids"]
    return trainer, [trainer.train_step(ids) for _ in golden_case["train"]["steps"]]


def test_schedule_matches_golden_pairs(golden_case: dict) -> None:
    for step, expected in golden_case["lr_lambda_total1000_warmup100_alpha0.1"]:
        assert lr_multiplier(step, 1000, 100, 0.1) == expected  # exact, not approximate


def test_three_steps_loss_accuracy_lr(golden_dir, golden_case, golden_expected) -> None:
    _, results = _three_steps(golden_dir, golden_case, golden_expected)
    for result, expected in zip(results, golden_case["train"]["steps"]):
        assert result["lr"] == pytest.approx(expected["lr"], abs=1e-12)
        assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert result["loss"] == pytest.approx(expected["loss"], abs=1e-4)
        assert not result["skipped"]
    # step 0 runs at rate 0: the second loss is the first one
    assert results[0]["loss"] == results[1]["loss"]
    # the golden batch has three padding targets: 2 x 11 targets - 3
    assert results[0]["tokens"] == 19


def _weight_differences(trainer: Trainer, golden_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    trained = load_file(str(golden_dir / "trained_state.safetensors"))
    state = trainer.model.state_dict()
    diffs = {}
    for key, value in trained.items():
        assert key.startswith("trained.")
        name = key[len("trained.") :]
        assert name in state, name
        diffs[name] = (state[name] - value).abs()
    assert len(diffs) == len([k for k in state if not k.endswith("predefined_G_LM")])
    return diffs


def test_three_steps_weights_close(golden_dir, golden_case, golden_expected) -> None:
    """Every weight within AdamW's float32 noise of the original's, nearly all within 1e-4.

    AdamW divides each gradient element by its RMS + eps: where a gradient is near eps=1e-5, the
    rounding of the backward pass (summation order) moves the weight by a visible part of an
    update. float64 arithmetic moves some weights by 2.6e-3 from the golden float32 result.
    """
    trainer, _ = _three_steps(golden_dir, golden_case, golden_expected)
    diffs = _weight_differences(trainer, golden_dir)
    flat = torch.cat([d.flatten() for d in diffs.values()])
    assert flat.max().item() < 1e-3
    assert (flat > 1e-4).sum().item() <= 20  # of 158,868 weights
    assert flat.mean().item() < 2e-6
    moved = sum(
        (trainer.model.state_dict()[k] - v).abs().sum().item()
        for k, v in _initial_state(golden_dir, golden_case).items()
        if k in diffs
    )
    assert moved / flat.numel() > 1e-4  # the weights really moved (by ~1e-3 each)


def _initial_state(golden_dir: Path, golden_case: dict) -> dict[str, torch.Tensor]:
    from pldr_llm import load_reference_checkpoint

    model = load_reference_checkpoint(
        golden_dir / "reference_checkpoint.pth", golden_case["hpdict"]
    )
    return model.state_dict()


def test_three_steps_weights_atol_1e4(golden_dir, golden_case, golden_expected) -> None:
    """Strict: with eager attention (the original's arithmetic) every weight tensor after three
    steps is within 1e-4 of the original's, but for a few elements per tensor within 5e-4.

    Those few elements are summation-order noise, not arithmetic: which vector kernels the CPU
    runs (AVX-512 here, ``ATEN_CPU_CAPABILITY=avx2`` or ``default`` elsewhere) moves them, the
    power law amplifies the rounding, and AdamW divides gradients of 1e-6 to 3e-4 (near its eps of
    1e-5) by their own RMS, so their rounding becomes a visible part of an update. On one AVX-512
    machine 8 of 158,868 weights land between 1e-4 and 3.8e-4; a wrong formula moves whole tensors.
    The default SDPA path is not held to this (see test_train_fast_path.py and
    docs/training.md)."""
    trainer, _ = _three_steps(golden_dir, golden_case, golden_expected)
    for name, diff in _weight_differences(trainer, golden_dir).items():
        assert diff.max().item() <= 5e-4, name
        assert (diff > 1e-4).sum().item() <= max(2, diff.numel() // 1000), name


def _record_gradients(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """The gradients each optimizer step of ``trainer`` sees, in order."""
    seen: list[dict[str, torch.Tensor]] = []
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    return seen


def test_gradient_accumulation_is_the_same_step(golden_dir, golden_case, golden_expected) -> None:
    """Two micro-batches give the loss, accuracy and gradient of the whole batch (token-weighted).

    The first loss agrees to float32 rounding. The gradients do not: the micro-batches compute
    in another order, and the metric learner's power law (A_LM near its 1e-9 floor raised to
    learned powers) amplifies rounding into gradient differences of up to 1.5e-2 on this small
    padded batch; after updates the losses agree to 1e-3 (2e-5 on one CPU thread, 8e-4 on two).
    """
    whole_trainer = golden_trainer(golden_dir, golden_case)
    split_trainer = golden_trainer(golden_dir, golden_case, grad_accum_steps=2)
    whole_grads, split_grads = _record_gradients(whole_trainer), _record_gradients(split_trainer)
    ids = golden_expected["input_ids"]
    whole = [whole_trainer.train_step(ids) for _ in range(3)]
    split = [split_trainer.train_step(ids) for _ in range(3)]
    first_whole, first_split = whole_grads[0], split_grads[0]
    diffs = torch.cat([(first_split[n] - g).abs().flatten() for n, g in first_whole.items()])
    # Gradients are clipped to +-1: the largest difference is 1.5e-2 and the mean 8e-5 here
    # (power-law amplification of the summation order, see the docstring); a wrong token
    # weighting of the micro-batches would move every gradient by tens of percent.
    assert diffs.max().item() < 0.05
    assert diffs.mean().item() < 5e-4
    for a, b in zip(whole, split):
        assert b["tokens"] == a["tokens"]
        assert b["lr"] == a["lr"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-9)
    assert split[0]["loss"] == pytest.approx(whole[0]["loss"], abs=1e-5)


def test_dag_loss_values_match_golden(golden_dir, golden_case, golden_expected) -> None:
    """With DAG coefficients the step reports the original's three regularizer values and adds
    the weighted sum to the cross-entropy."""
    dag = golden_case["dag"]
    coeffs = dag.get("coefficients") or dag.get("coeffs") or dag.get("reg_coeffs")
    assert coeffs is not None, sorted(dag)
    trainer = golden_trainer(golden_dir, golden_case, dag_reg_coeffs=tuple(coeffs))
    result = trainer.train_step(golden_expected["input_ids"])
    plain = golden_case["train"]["steps"][0]["loss"]
    for key in ("dag_A", "dag_A_P", "dag_G"):
        assert result[key] == pytest.approx(dag[key], rel=1e-4, abs=1e-6)
    weighted = sum(c * dag[k] for c, k in zip(coeffs, ("dag_A", "dag_A_P", "dag_G")) if c > 0)
    assert result["lm_loss"] == pytest.approx(plain, abs=1e-5)
    assert result["loss"] == pytest.approx(plain + weighted, abs=1e-4)
    assert result["loss"] == pytest.approx(dag["loss_total"], abs=1e-4)
    assert math.isfinite(result["loss"])

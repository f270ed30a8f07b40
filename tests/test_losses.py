"""The losses of core/losses.py: the masked cross-entropy in its three forms (per target, mean,
sum with hits) agree with one another and with a direct log-softmax; the DAG regularizer is
finite where the value is finite and equal to the direct formula where it fits."""

from __future__ import annotations

import pytest
import torch

from pldr_llm.core.losses import (
    dag_term,
    log_trace_expm,
    masked_accuracy,
    masked_ce_sum_and_hits,
    masked_cross_entropy,
    token_cross_entropy,
)


def _batch(pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=generator)
    targets = torch.randint(1, 11, (3, 7), generator=generator)
    targets[0, 4:] = pad  # a padded row
    targets[2, 0] = pad
    return logits, targets


def test_the_three_cross_entropies_agree_with_a_direct_log_softmax():
    logits, targets = _batch()
    direct = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    valid = targets != 0
    per_target = token_cross_entropy(logits.double(), targets, ignore_index=0)
    assert per_target.shape == targets.shape
    torch.testing.assert_close(per_target[valid], direct[valid])
    assert (per_target[~valid] == 0).all()  # padding costs nothing
    # A flat [N, V] batch gives the same per-target figures as the [B, L, V] layout.
    flat = token_cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=0)
    torch.testing.assert_close(flat.reshape(targets.shape), per_target.float())
    mean = masked_cross_entropy(logits, targets)
    ce_sum, hits = masked_ce_sum_and_hits(logits, targets)
    count = int(valid.sum())
    # float32 sums of 18 terms around 3: a few ulps apart at most
    torch.testing.assert_close(mean.double(), direct[valid].mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ce_sum.double() / count, direct[valid].mean(), rtol=1e-6, atol=0)
    assert hits.dtype == torch.int64 and not hits.requires_grad
    assert int(hits) == int(((logits.argmax(-1) == targets) & valid).sum())
    assert float(masked_accuracy(logits, targets)) == pytest.approx(int(hits) / count, rel=1e-6)


def test_transformers_labels_ignore_minus_100_and_nothing_else():
    logits, targets = _batch(pad=-100)
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(masked_cross_entropy(logits, targets, pad_id=-100), want)
    # Every target ignored: no token to average over (NaN, as transformers' own loss gives).
    assert masked_cross_entropy(logits, torch.full_like(targets, -100), pad_id=-100).isnan()


def test_the_mean_loss_has_the_gradient_of_the_summed_loss_over_the_count():
    logits, targets = _batch()
    leaf = logits.clone().requires_grad_(True)
    (grad_mean,) = torch.autograd.grad(masked_cross_entropy(leaf, targets), leaf)
    (grad_sum,) = torch.autograd.grad(masked_ce_sum_and_hits(leaf, targets)[0], leaf)
    count = int((targets != 0).sum())
    torch.testing.assert_close(grad_mean, grad_sum / count)
    assert (grad_mean[targets == 0] == 0).all()  # padded targets pass no gradient


def test_log_trace_expm_matches_direct_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64) ** 2  # DAG inputs are M∘M >= 0
    direct = torch.log(torch.linalg.matrix_exp(x).diagonal(dim1=-2, dim2=-1).sum(-1))
    torch.testing.assert_close(log_trace_expm(x), direct)


def test_dag_never_overflows_where_finite():
    # entries of M∘M around 400: expm overflows float32 (and float64 for the larger ones)
    torch.manual_seed(0)
    big = 20.0 + torch.rand(2, 3, 16, 16)
    naive = torch.log(torch.linalg.matrix_exp(big * big).diagonal(dim1=-2, dim2=-1).sum(-1))
    assert not torch.isfinite(naive).all()
    value = dag_term(big)
    assert torch.isfinite(value)
    # the Perron root of a positive matrix lies between its smallest and largest row sums
    sq = (big * big).double()
    low = sq.sum(-1).min(-1).values.mean() - torch.log(torch.tensor(16.0, dtype=torch.float64))
    high = sq.sum(-1).max(-1).values.mean() + 1.0
    assert low - 1e-3 <= value.double() <= high


def test_dag_gradient_is_finite_for_large_inputs():
    big = (20.0 + torch.rand(1, 2, 8, 8)).requires_grad_()
    dag_term(big).backward()
    assert torch.isfinite(big.grad).all() and big.grad.abs().sum() > 0


def test_dag_is_zero_for_zero_matrix():
    # trace(expm(0)) = dk, so log(dk/dk) = 0
    assert dag_term(torch.zeros(2, 4, 4)).item() == 0.0


def test_log_trace_expm_with_entries_from_1e_minus_17_to_1e17():
    """A_P = A_LM ** pw with A_LM near its 1e-9 floor spans many decades: the device-side shift
    (no eigen-decomposition) gives the eigenvalue-shifted value, where a row-sum shift alone
    underflows (the largest row sum is far above the spectral radius)."""
    torch.manual_seed(1)
    x = torch.exp(torch.empty(4, 6, 6, dtype=torch.float64).uniform_(-40, 40))
    eye = torch.eye(6, dtype=torch.float64)
    rho = torch.linalg.eigvals(x).real.max(-1).values
    shifted = torch.linalg.matrix_exp(x - rho[:, None, None] * eye)
    reference = rho + torch.log(shifted.diagonal(dim1=-2, dim2=-1).sum(-1))
    row = x.sum(-1).amax(-1)
    by_rows = torch.linalg.matrix_exp(x - row[:, None, None] * eye).diagonal(dim1=-2, dim2=-1)
    assert (by_rows.sum(-1) == 0).any()  # the row-sum shift alone underflows here
    torch.testing.assert_close(log_trace_expm(x), reference, rtol=1e-12, atol=0.0)

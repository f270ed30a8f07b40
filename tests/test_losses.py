"""DAG regularizer: finite where the value is finite, equal to the direct formula where it fits."""

from __future__ import annotations

import torch

from pldr_llm.core.losses import dag_term, log_trace_expm


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

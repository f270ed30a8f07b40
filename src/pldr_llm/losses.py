"""Losses and metrics of PLDR-LLM training: masked cross-entropy, accuracy, DAG regularizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pldr_llm.errors import PLDRError
from pldr_llm.model.plga import Deductive


def masked_cross_entropy(logits: Tensor, targets: Tensor, pad_id: int = 0) -> Tensor:
    """Mean token cross-entropy over targets that are not ``pad_id`` (the original's loss).

    Computed in the original's layout (classes moved to dim 1, per-token losses masked, summed,
    divided by the token count): its gradients are then bit-identical to the original's.
    """
    if logits.dim() == 3:
        losses = F.cross_entropy(logits.permute(0, 2, 1), targets, reduction="none")
    else:  # [N, V] logits for [N] targets
        losses = F.cross_entropy(logits, targets, reduction="none")
    mask = (targets != pad_id).to(losses.dtype)
    return (losses * mask).sum() / mask.sum()


@torch.no_grad()
def masked_accuracy(logits: Tensor, targets: Tensor, pad_id: int = 0) -> Tensor:
    """Share of non-padding targets predicted by the arg-max of ``logits``."""
    mask = targets != pad_id
    hits = (logits.argmax(-1) == targets) & mask
    return hits.sum().float() / mask.sum().float()


def log_trace_expm(matrices: Tensor) -> Tensor:
    """``log(trace(expm(X)))`` for a batch of square, element-wise non-negative matrices (the
    DAG terms use ``M ∘ M``), without overflow.

    ``trace(expm(X)) = exp(c) * trace(expm(X - c I))`` for any scalar c: c cancels out exactly
    (it is not differentiated). With c >= the spectral radius ρ of X (for a non-negative matrix
    ρ is its largest real eigenvalue), ``trace(expm(X - c I)) <= dk``, so the result is finite
    wherever the true value is, where the original's direct ``log(trace(matrix_exp(X)))``
    overflows to inf in float32. c is the smaller of two upper bounds of ρ computed on the
    device: the largest row sum, and the Collatz-Wielandt bound ``max_i (X v)_i / v_i`` with v
    from power iteration (close to ρ). No eigen-decomposition, which on a GPU runs on the host.
    """
    work = matrices.double()
    eye = torch.eye(work.shape[-1], dtype=work.dtype, device=work.device)
    with torch.no_grad():
        shift = _spectral_radius_bound(work.detach())
    shifted = work - shift[..., None, None] * eye
    trace = torch.linalg.matrix_exp(shifted).diagonal(dim1=-2, dim2=-1).sum(-1)
    return shift + torch.log(trace)


def _spectral_radius_bound(matrices: Tensor, squarings: int = 12) -> Tensor:
    """An upper bound of the spectral radius of non-negative matrices [..., n, n], close to it.

    Power iteration by repeated squaring (``X^(2^k) 1`` approaches the Perron vector v at the
    rate ``|λ2/ρ|^(2^k)``), then the Collatz-Wielandt bound ``max_i (X v)_i / v_i >= ρ``, which
    is as close to ρ as v is to the Perron vector. Capped by the largest row sum (also >= ρ).
    """
    row_bound = matrices.sum(-1).amax(-1)
    tiny = torch.finfo(matrices.dtype).tiny
    power = matrices / row_bound.clamp_min(tiny)[..., None, None]
    for _ in range(squarings):
        power = power @ power
        power = power / power.amax((-2, -1), keepdim=True).clamp_min(tiny)
    vector = power.sum(-1).clamp_min(tiny)  # Collatz-Wielandt needs v > 0
    for _ in range(2):  # polish (and recover rows the squarings sent below tiny)
        vector = (matrices @ vector[..., None])[..., 0]
        vector = (vector / vector.amax(-1, keepdim=True).clamp_min(tiny)).clamp_min(tiny)
    ratio = ((matrices @ vector[..., None])[..., 0] / vector).amax(-1)
    bound = torch.minimum(ratio, row_bound)
    # NaN or inf input: keep the row bound (the result is then not finite either way)
    return torch.where(torch.isfinite(bound), bound, row_bound)


def dag_term(matrices: Tensor) -> Tensor:
    """``mean |log(trace(expm(M ∘ M)) / dk)|`` over every leading dimension."""
    dk = matrices.shape[-1]
    value = log_trace_expm(matrices * matrices) - torch.log(
        torch.tensor(float(dk), dtype=torch.float64, device=matrices.device)
    )
    return value.abs().mean().to(matrices.dtype if matrices.is_floating_point() else torch.float32)


def dag_regularizer(deductive: Sequence[Deductive]) -> tuple[Tensor, Tensor, Tensor]:
    """The DAG regularizer of the v510_dag model: ``(dag_A, dag_A_P, dag_G)``.

    Each is ``mean |log(trace(expm(M ∘ M)) / dk)|`` over layers, batch and heads, with M = A_LM
    for ``dag_A`` (as in the original), A_P for ``dag_A_P`` and G_LM for ``dag_G``. Computed in
    float64 with a spectral shift, so it never overflows where the value is finite.
    """
    if not deductive:
        raise PLDRError("dag_regularizer needs the deductive outputs (output_deductive=True)")
    if any(d.A_LM is None or d.A_P is None for d in deductive):
        raise PLDRError(
            "dag_regularizer needs A_LM and A_P: run the model without a G-cache and not as v510G"
        )
    a_lm = torch.stack([d.A_LM.float() for d in deductive])
    a_p = torch.stack([d.A_P.float() for d in deductive])
    g_lm = torch.stack([d.G_LM.float() for d in deductive])
    return dag_term(a_lm).float(), dag_term(a_p).float(), dag_term(g_lm).float()


def dag_loss(
    deductive: Sequence[Deductive], coefficients: Sequence[float]
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``c_A dag_A + c_AP dag_A_P + c_G dag_G`` and the three values (terms with c = 0 skipped)."""
    values = dag_regularizer(deductive)
    total = values[0].new_zeros(())
    for coefficient, value in zip(coefficients, values):
        if coefficient > 0:
            total = total + coefficient * value
    return total, values

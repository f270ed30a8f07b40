"""Losses and metrics of PLDR-LLM training: masked cross-entropy, accuracy, DAG regularizer.

Every cross-entropy of the package is here: per target (:func:`token_cross_entropy`, used by
perplexity and the causal-leak audit), its mean over non-padding targets
(:func:`masked_cross_entropy`, the original's loss and the transformers forward's), its sum with
the arg-max hits (:func:`masked_ce_sum_and_hits`, the trainer's step and validation), and
:func:`linear_cross_entropy`, the same loss computed chunk by chunk from the hidden states.

Chunked linear + cross-entropy (the LM loss without the [B, L, V] float32 logits):

The plain loss computes ``logits = hidden @ W^T + b`` for every position ([B, L, 32000]: 2 GiB in
bf16 at batch 16 x 1024, twice that once upcast to float32, and as much again for the gradient),
then the cross-entropy. Here the rows are processed in chunks: each chunk's logits are computed,
reduced to a loss sum, and immediately turned into the gradients of ``hidden``, ``W`` and ``b``
(softmax minus one-hot, the closed form of the cross-entropy gradient). Only one chunk of logits
exists at a time; backward just scales the stored gradients by the incoming gradient.

The arithmetic is that of :func:`pldr_llm.core.losses.masked_cross_entropy` applied to
``F.linear(hidden, W, b)``: the matmul runs in the autocast dtype when autocast is on (as
``final_layer`` would), the softmax in float32, and the mean is over non-padding targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import PLDRError
from .plga import Deductive


def token_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy of each target, in the logits' dtype (0 where ``targets == ignore_index``).

    ``logits`` [..., V], ``targets`` [...] -> [...]. Upcast the logits first for a float32 or
    float64 softmax. A [B, L, V] batch is computed in the original's layout (classes moved to
    dim 1), which keeps the gradients of :func:`masked_cross_entropy` bit-identical to the
    original's; other shapes are flattened to [N, V].
    """
    if logits.dim() == 3:
        return F.cross_entropy(
            logits.permute(0, 2, 1), targets, reduction="none", ignore_index=ignore_index
        )
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
        ignore_index=ignore_index,
    )
    return flat.reshape(targets.shape)


def masked_cross_entropy(logits: Tensor, targets: Tensor, pad_id: int = 0) -> Tensor:
    """Mean token cross-entropy over targets that are not ``pad_id`` (the original's loss).

    Computed in the original's layout (per-token losses masked, summed, divided by the token
    count): its gradients are then bit-identical to the original's. NaN when every target is
    ``pad_id``. The transformers forward takes its ``labels`` loss here with ``pad_id=-100``.
    """
    losses = token_cross_entropy(logits, targets, ignore_index=pad_id)
    mask = (targets != pad_id).to(losses.dtype)
    return (losses * mask).sum() / mask.sum()


def masked_ce_sum_and_hits(
    logits: Tensor, targets: Tensor, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over targets that are not ``pad_id`` (softmax in float32) and the
    arg-max hits on them (an integer count, no gradient): the trainer's figures of a step or a
    validation batch from full logits [B, L, V]. Divide both by the non-padding target count
    for the mean loss and the accuracy (a sum, so that micro-batches and ranks add up exactly).
    """
    ce_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=pad_id,
        reduction="sum",
    )
    with torch.no_grad():
        hits = ((logits.argmax(-1) == targets) & (targets != pad_id)).sum()
    return ce_sum, hits


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
    # Every layer's A_LM and A_P (checked above); the filters narrow the types.
    a_lm = torch.stack([d.A_LM.float() for d in deductive if d.A_LM is not None])
    a_p = torch.stack([d.A_P.float() for d in deductive if d.A_P is not None])
    g_lm = torch.stack([d.G_LM.float() for d in deductive])
    return dag_term(a_lm).float(), dag_term(a_p).float(), dag_term(g_lm).float()


def dag_loss(
    deductive: Sequence[Deductive], coefficients: Sequence[float]
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``c_A dag_A + c_AP dag_A_P + c_G dag_G`` and the three values (terms with c = 0 skipped)."""
    values = dag_regularizer(deductive)
    return weighted_dag(values, coefficients, values[0].new_zeros(())), values


def weighted_dag(values: Sequence[Any], coefficients: Sequence[float], start: Any = 0.0) -> Any:
    """``start + c_A dag_A + c_AP dag_A_P + c_G dag_G`` for tensors or floats.

    Terms with c = 0 are skipped, not multiplied: a term that is off adds nothing even when its
    value is not finite.
    """
    return sum((c * v for c, v in zip(coefficients, values) if c > 0), start)


# ---------------------------------------------------------------------- chunked
#: Rows per chunk: 2048 x 32000 logits are 128 MiB in bf16, big enough for efficient matmuls.
DEFAULT_CHUNK_ROWS = 2048

ChunkFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def chunk_loss_and_grad(
    logits: Tensor, targets: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed cross-entropy of a chunk, d(sum)/d(logits) and arg-max hits, masked by ``valid``.

    ``logits`` [n, V] in the matmul dtype; the softmax is computed in float32 and the gradient is
    returned in the logits' dtype (what autograd would hand the matmul under autocast). The hits
    (float32 count) come from the same logits, so accuracy costs no second pass over the head.
    """
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)
    target_logit = logits32.gather(-1, targets[:, None]).squeeze(-1)
    weight = valid.to(logits32.dtype)
    loss_sum = ((lse - target_logit) * weight).sum()
    grad = torch.exp(logits32 - lse[:, None])
    grad = grad.scatter_add(-1, targets[:, None], -torch.ones_like(target_logit)[:, None])
    hits = ((logits32.argmax(-1) == targets).to(torch.float32) * weight).sum()
    return loss_sum, (grad * weight[:, None]).to(logits.dtype), hits


_COMPILED_CHUNK_FN: ChunkFn | None = None


def compiled_chunk_fn() -> ChunkFn:
    """:func:`chunk_loss_and_grad` through torch.compile: one fused pass over each chunk's logits
    instead of ~6 eager passes over a float32 copy (compiled once per process)."""
    global _COMPILED_CHUNK_FN
    if _COMPILED_CHUNK_FN is None:
        _COMPILED_CHUNK_FN = torch.compile(chunk_loss_and_grad, dynamic=False)
    return _COMPILED_CHUNK_FN


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        pad_id: int,
        chunk_rows: int,
        compute_dtype: torch.dtype,
        need_grad: bool,
        chunk_fn: ChunkFn,
    ) -> tuple[Tensor, Tensor]:
        rows = hidden.shape[0]
        valid = targets != pad_id
        count = valid.sum()
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        total = hidden.new_zeros((), dtype=torch.float32)
        correct = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if need_grad and bias is not None
            else None
        )
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            h = hidden[start:stop].to(compute_dtype)
            logits = F.linear(h, w, b)
            loss_sum, grad, hits = chunk_fn(logits, targets[start:stop], valid[start:stop])
            total = total + loss_sum
            correct = correct + hits
            if grad_hidden is not None:
                assert grad_weight is not None  # made with grad_hidden (need_grad)
                grad_hidden[start:stop] = grad @ w
                grad_weight.add_(grad.t() @ h)
                if grad_bias is not None:
                    grad_bias.add_(grad.sum(0, dtype=torch.float32))
        # The original's mean: sum over non-padding targets / their count (NaN when there is none).
        loss = total / count
        if grad_hidden is not None:
            assert grad_weight is not None  # made with grad_hidden (need_grad)
            scale = 1.0 / count.to(torch.float32)
            grad_hidden.mul_(scale.to(grad_hidden.dtype))
            grad_weight.mul_(scale)
            if grad_bias is not None:
                grad_bias.mul_(scale)
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight, grad_bias) if t is not None))
        ctx.has_grads = grad_hidden is not None
        ctx.has_bias = grad_bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(
        ctx: Any, grad_loss: Tensor, grad_correct: Tensor | None = None
    ) -> tuple[Tensor | None, ...]:
        if not ctx.has_grads:
            raise PLDRError(
                "linear_cross_entropy was computed without gradients (grad mode was off)"
            )
        saved = ctx.saved_tensors
        grad_hidden, grad_weight = saved[0], saved[1]
        grad_bias = saved[2] if ctx.has_bias else None
        g = grad_loss.to(torch.float32)
        return (
            grad_hidden * g.to(grad_hidden.dtype),
            (grad_weight * g).to(ctx.weight_dtype),
            (grad_bias * g).to(ctx.weight_dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    pad_id: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compile_chunks: bool = False,
    return_correct: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``masked_cross_entropy(F.linear(hidden, weight, bias), targets, pad_id)``, chunked.

    ``hidden`` [..., d], ``targets`` [...] (same leading shape), ``weight`` [V, d], ``bias`` [V].
    Never holds more than ``chunk_rows`` rows of logits. Differentiable in hidden, weight and
    bias (gradients are computed during the forward pass when grad mode is on).
    ``compile_chunks`` fuses each chunk's softmax/gradient with torch.compile (for the GPU).
    ``return_correct`` also returns the arg-max hits on non-padding targets (float32 count).
    """
    if hidden.shape[:-1] != targets.shape:
        raise PLDRError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match"
        )
    if chunk_rows < 1:
        raise PLDRError(f"chunk_rows must be >= 1, got {chunk_rows}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    chunk_fn = compiled_chunk_fn() if compile_chunks else chunk_loss_and_grad
    # Autocast is off inside: the dtypes are chosen above, explicitly.
    with torch.autocast(device_type, enabled=False):
        loss, correct = _LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            bias,
            targets.reshape(-1),
            pad_id,
            chunk_rows,
            compute_dtype,
            need_grad,
            chunk_fn,
        )
    return (loss, correct) if return_correct else loss

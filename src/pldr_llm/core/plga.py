"""Power Law Graph Attention (PLGA): metric learner, power law and attention.

Per layer and head (dk = d_model / num_heads):

* metric tensor ``A = LayerNorm_dk(Q^T Q)`` over all query positions, refined by residual units
  ``A <- LN(A + GLU_k(...GLU_1(A)))``;
* ``A_LM = iSwiGLU(W A + b) + 1e-9`` with ``iSwiGLU(x) = x * silu(x)``;
* potential tensor ``A_P = A_LM ** pw`` (element-wise);
* energy-curvature tensor ``G_LM = a A_P + ba``;
* attention ``softmax((Q G_LM) K^T / sqrt(dk) + mask) V``.

With ``causal_metric`` (not in the original) the query at position t attends with its own
``G_LM(t)``, built from ``A(t) = LN(sum_{s<=t} q_s^T q_s)``: see
:meth:`PowerLawGraphAttention.causal_queries`.

Because G_LM only transforms the query, the attention is ``SDPA(Q G_LM, K, V)``: the ``sdpa``
implementation uses PyTorch's fused kernels, the ``eager`` one materializes the scores (and
returns them as a deductive output). Both compute the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .cache import GCacheEntry, LayerKV, StaticLayerKV, register_pytree_dataclass
from .config import PLDRConfig
from .errors import PLDRError
from .layers import GLU, PackedLinear, xavier_linear
from .rope import RotaryEmbedding

# Keeps A_LM strictly positive so that A_LM ** pw is defined for any learned power.
A_LM_EPSILON = 1e-9
# Positions per block of the causal metric: [B, H, block, dk, dk] per tensor at a time.
CAUSAL_METRIC_BLOCK = 64
# The original masks with an additive -1e9 (not -inf): a row with every key masked then stays
# finite instead of turning into NaN, which matters because A sums over all query rows.
MASK_VALUE = -1e9
# float16 cannot hold -1e9 (it would be -inf, and a row with every key masked NaN); there the
# mask is half its most negative value, so that a score plus the mask stays finite too.
_FLOAT16_MASK_VALUE = torch.finfo(torch.float16).min / 2


def mask_value(dtype: torch.dtype) -> float:
    """The additive mask value in ``dtype``: the original's -1e9 wherever it fits (float32,
    bfloat16, float64: their numerics are the original's), a finite stand-in for float16."""
    return _FLOAT16_MASK_VALUE if dtype == torch.float16 else MASK_VALUE


def bias_in(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive mask built with :data:`MASK_VALUE` (float32) converted to ``dtype``, its
    masked entries finite in every dtype."""
    if dtype == torch.float16:
        bias = bias.clamp(min=_FLOAT16_MASK_VALUE)
    return bias.to(dtype)


#: A layer's raw metric ``Q^T Q`` -> (A, A_LM, A_P, G_LM), as :meth:`PowerLawGraphAttention.metric_to_G`
MetricRunner = Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass
class Deductive:
    """A layer's deductive outputs, each [B, H, dk, dk] (``scores`` is [B, H, L, S])."""

    A: Tensor | None
    A_LM: Tensor | None
    A_P: Tensor | None
    G_LM: Tensor
    scores: Tensor | None = None


register_pytree_dataclass(Deductive)


def i_swiglu(x: Tensor) -> Tensor:
    """SwiGLU with identity weights and no bias: ``x * silu(x)``."""
    return x * F.silu(x)


def metric_tensor_from_queries(queries: Tensor, query_valid: Tensor | None = None) -> Tensor:
    """``Q^T Q`` over the sequence: [B, H, L, dk] -> [B, H, dk, dk]; padded queries left out."""
    if query_valid is not None:
        queries = queries.masked_fill(~query_valid[:, None, :, None], 0.0)
    return queries.transpose(-1, -2) @ queries


def power_law(
    metric: Tensor, W: Tensor, b: Tensor, pw: Tensor, a: Tensor, ba: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """A -> (A_LM, A_P, G_LM); the learned tensors are [H, dk, dk] and broadcast over the batch.

    In float16 it runs in float32 (as CUDA autocast runs ``pow``) and the results are rounded
    back: float16 cannot hold ``A_LM_EPSILON``, so an A_LM that underflows to 0 would make
    ``0 ** pw`` infinite. Other dtypes compute in their own precision, as the original.
    """
    if metric.dtype == torch.float16:
        wide = power_law(*(t.float() for t in (metric, W, b, pw, a, ba)))
        return wide[0].half(), wide[1].half(), wide[2].half()
    a_lm = i_swiglu(W @ metric + b) + A_LM_EPSILON
    a_p = torch.pow(a_lm, pw)
    g_lm = a @ a_p + ba
    return a_lm, a_p, g_lm


def attend(
    transformed: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: Tensor | None,
    is_causal: bool = False,
    implementation: str = "sdpa",
) -> tuple[Tensor, Tensor | None]:
    """``softmax(transformed K^T / sqrt(dk) + bias) V`` for the transformed queries
    ``Q G_LM`` [B, H, L, dk]; returns (output, scores or None).

    ``bias`` is an additive float mask broadcastable to [B, H, L, S]; ``is_causal`` (only with
    ``bias=None``) asks for the plain causal mask. ``scores`` (before mask and softmax) are only
    materialized by the eager implementation.
    """
    dk = transformed.shape[-1]
    if implementation == "sdpa":
        if bias is not None:
            # A float mask of another dtype than the queries is silently misread by the CPU
            # kernel for float64 at 16+ positions (torch 2.13); the eager path is unaffected.
            bias = bias_in(bias, transformed.dtype)
        out = F.scaled_dot_product_attention(
            transformed, keys, values, attn_mask=bias, is_causal=is_causal and bias is None
        )
        return out, None
    scores = (transformed @ keys.transpose(-1, -2)) / math.sqrt(dk)
    weights = scores
    if bias is not None:
        # float16 only: other dtypes keep the original's arithmetic (and its promotions)
        weights = weights + (
            bias_in(bias, weights.dtype) if weights.dtype == torch.float16 else bias
        )
    elif is_causal:
        length, span = scores.shape[-2:]
        causal = torch.ones(length, span, dtype=torch.bool, device=scores.device).tril(
            span - length
        )
        weights = weights.masked_fill(~causal, mask_value(weights.dtype))
    weights = torch.softmax(weights, dim=-1)
    return weights @ values, scores


class ResidualMetricUnit(nn.Module):
    """One residual unit of the metric learner: ``LN(A + GLU_k(...GLU_1(A)))``."""

    def __init__(
        self,
        depth: int,
        A_dff: int,
        num_denseA: int,
        activation: str,
        glu_bias: bool = True,
        layer_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.denseAs = nn.ModuleList(
            GLU(depth, A_dff, depth, activation, glu_bias) for _ in range(num_denseA)
        )
        self.layernormA = nn.LayerNorm(depth, eps=layer_norm_eps)

    def forward(self, metric: Tensor) -> Tensor:
        residual = metric
        for glu in self.denseAs:
            metric = glu(metric)
        return self.layernormA(metric + residual)


class PowerLawParameters(nn.Module):
    """The learned power-law tensors W, b, pw, a, ba ([H, dk, dk] each; original names)."""

    def __init__(self, depth: int, num_heads: int) -> None:
        super().__init__()
        shape = (num_heads, depth, depth)
        # Parameters first, initialized in place (in the original's order): frameworks that
        # patch or skip init (transformers' from_pretrained, meta-device construction) see
        # ordinary parameters.
        self.Wlst = nn.Parameter(torch.empty(shape))
        self.blst = nn.Parameter(torch.empty(shape))
        self.pwlst = nn.Parameter(torch.empty(shape))
        self.alst = nn.Parameter(torch.empty(shape))
        self.balst = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.Wlst)
        nn.init.zeros_(self.blst)
        nn.init.xavier_normal_(self.pwlst)
        nn.init.xavier_normal_(self.alst)
        nn.init.zeros_(self.balst)

    def forward(self, metric: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return power_law(metric, self.Wlst, self.blst, self.pwlst, self.alst, self.balst)


class PowerLawGraphAttention(nn.Module):
    """Multi-head PLGA (the original's ``mha1``): projections, metric learner, power law, attention.

    Built from the model's :class:`PLDRConfig` (as transformers' attention modules are). With
    version v510G there is no metric learner and no power-law weights: G_LM is a fixed buffer
    [1, H, dk, dk] per layer.
    """

    predefined_G_LM: Tensor  # a buffer, registered only with version v510G

    def __init__(self, config: PLDRConfig) -> None:
        super().__init__()
        d_model, num_heads = config.d_model, config.num_heads
        predefined_G = config.version == "v510G"
        self.num_heads = num_heads
        #: Build A causally (``PLDRConfig.causal_metric``), ``metric_block`` positions at a
        #: time; plain attributes, not state (the block size changes speed, not results).
        self.causal_metric = config.causal_metric
        self.metric_block = CAUSAL_METRIC_BLOCK
        self.depth = config.depth
        self.cache_first_G = config.cache_first_G
        self.wq = xavier_linear(d_model, d_model, config.attention_bias)
        self.wk = xavier_linear(d_model, d_model, config.attention_bias)
        # The original never re-initializes wv (it initializes wk twice), so wv keeps PyTorch's
        # default Linear init; a fresh model here starts from the same distribution.
        self.wv = nn.Linear(d_model, d_model, bias=config.attention_bias)
        # Registration order mirrors the original (state-dict key order and init RNG order).
        self.predefined_G = predefined_G
        if not predefined_G:
            self.plgatt_layer = PowerLawParameters(self.depth, num_heads)
        self.dense = xavier_linear(d_model, d_model, config.attention_bias)
        if predefined_G:
            eye = torch.eye(self.depth).expand(1, num_heads, -1, -1).clone()
            self.register_buffer("predefined_G_LM", eye)
        else:
            self.reslayerAs = nn.ModuleList(
                ResidualMetricUnit(
                    self.depth,
                    config.A_dff,
                    config.num_denseA,
                    config.activation,
                    config.glu_bias,
                    config.layer_norm_eps,
                )
                for _ in range(config.num_reslayerA)
            )
            self.layernorm1 = nn.LayerNorm(self.depth, eps=config.layer_norm_eps)
        self.rotary = RotaryEmbedding.from_config(config)

    def _heads(self, x: Tensor) -> Tensor:
        """[B, L, d_model] -> [B, L, H, dk] (a view)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.depth)

    def metric_to_G(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``raw`` = ``Q^T Q`` [B, H, dk, dk] -> (A, A_LM, A_P, G_LM): the metric learner and the
        power law, what :class:`pldr_llm.core.metric_graphs.MetricGraphs` captures."""
        metric = self.refine_metric(raw)
        a_lm, a_p, g_lm = self.plgatt_layer(metric)
        return metric, a_lm, a_p, g_lm

    def metric_parameters(self) -> list[Tensor]:
        """The parameters :meth:`metric_to_G` reads."""
        modules = (self.layernorm1, self.reslayerAs, self.plgatt_layer)
        return [p for module in modules for p in module.parameters()]

    def refine_metric(self, raw: Tensor) -> Tensor:
        """``LN(raw)`` refined by the residual units; ``raw`` is [..., dk, dk] (any batch dims)."""
        metric = self.layernorm1(raw)
        for unit in self.reslayerAs:
            metric = unit(metric)
        return metric

    def causal_queries(
        self,
        queries: Tensor,
        query_valid: Tensor | None,
        running: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Queries transformed by their own causal G_LM: ``q_t G_LM(t)``, [B, H, L, dk].

        ``A(t)`` is the metric learner applied to ``running + sum_{s<=t} q_s^T q_s`` (``running``:
        the raw sum of earlier positions, from the KV-cache; zero for a fresh sequence), followed
        by the power law. Positions are processed ``metric_block`` at a time (cumulative sums of
        outer products on top of the previous block's total), so at most [B, H, block, dk, dk]
        per tensor exists at once; with gradients each block is recomputed in the backward pass
        (activation checkpointing) instead of keeping every position's tensors.

        Returns (transformed queries, the new raw running sum [B, H, dk, dk], and (A, A_LM, A_P,
        G_LM) of the last position, which equal the non-causal ones of the whole sequence).
        """
        batch, heads, length, dk = queries.shape
        masked = queries
        if query_valid is not None:
            masked = queries.masked_fill(~query_valid[:, None, :, None], 0.0)
        if running is None:
            running = queries.new_zeros(batch, heads, dk, dk)
        use_checkpoint = torch.is_grad_enabled() and queries.requires_grad
        pieces, last = [], None
        for start in range(0, length, self.metric_block):
            q = queries[:, :, start : start + self.metric_block]
            qm = masked[:, :, start : start + self.metric_block]
            if use_checkpoint:
                out = checkpoint(self._causal_block, q, qm, running, use_reentrant=False)
            else:
                out = self._causal_block(q, qm, running)
            transformed, blocks = out[0], out[1:]
            pieces.append(transformed)
            last = tuple(t[:, :, -1] for t in blocks)
            # The next block continues from this block's total (the same sum, without the LN).
            running = running + qm.transpose(-1, -2) @ qm
        assert last is not None  # length >= 1
        return torch.cat(pieces, dim=2), running, last

    def _causal_block(
        self, q: Tensor, q_masked: Tensor, running: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One block of :meth:`causal_queries`: (q_t G_LM(t), A, A_LM, A_P, G_LM per position)."""
        outer = q_masked.unsqueeze(-1) * q_masked.unsqueeze(-2)  # [B, H, n, dk, dk]
        metric = self.refine_metric(running.unsqueeze(2) + outer.cumsum(dim=2))
        p = self.plgatt_layer  # [H, dk, dk] tensors, broadcast over the positions
        a_lm, a_p, g_lm = power_law(
            metric, p.Wlst[:, None], p.blst[:, None], p.pwlst[:, None], p.alst[:, None],
            p.balst[:, None],
        )  # fmt: skip
        transformed = (q.unsqueeze(-2) @ g_lm.to(q.dtype)).squeeze(-2)
        return transformed, metric, a_lm, a_p, g_lm

    def forward(
        self,
        x: Tensor,
        rotation: tuple[Tensor, Tensor],
        bias: Tensor | None,
        is_causal: bool,
        past: LayerKV | StaticLayerKV | None = None,
        g_entry: GCacheEntry | None = None,
        query_valid: Tensor | None = None,
        implementation: str = "sdpa",
        need_deductive: bool = False,
        need_scores: bool = True,
        packed_qkv: PackedLinear | None = None,
        metric_runner: MetricRunner | None = None,
    ) -> tuple[Tensor, LayerKV, GCacheEntry, Deductive | None]:
        # ``metric_runner`` computes :meth:`metric_to_G` of a fresh prompt (the prefill's
        # captured graphs, :mod:`pldr_llm.core.metric_graphs`); None runs it here.
        # Rotate in the [B, L, H, dk] layout and only then move heads forward: the metric tensor
        # sums over positions, and this keeps the original's memory layout (hence its rounding).
        # ``rotation``: the (cos, sin) rows of this pass's positions (RotaryEmbedding.rotation),
        # computed once per forward for every layer.
        if packed_qkv is None:
            queries = self.rotary.rotate(self._heads(self.wq(x)), rotation).transpose(1, 2)
            keys = self.rotary.rotate(self._heads(self.wk(x)), rotation).transpose(1, 2)
            values = self._heads(self.wv(x)).transpose(1, 2)
        else:
            # Decoding: wq | wk | wv as one matrix product, and queries and keys rotated
            # together (the same element-wise arithmetic, in half the kernels).
            batch, length, _ = x.shape
            heads = packed_qkv(x).view(batch, length, 3 * self.num_heads, self.depth)
            rotated = self.rotary.rotate(heads[:, :, : 2 * self.num_heads], rotation)
            queries, keys = rotated.transpose(1, 2).chunk(2, dim=1)
            values = heads[:, :, 2 * self.num_heads :].transpose(1, 2)

        metric = None
        if past is not None:
            # LayerKV concatenates; StaticLayerKV (CUDA-graph decoding) writes in place.
            keys, values = past.append(keys, values)
            metric = past.metric_tensor

        a_lm = a_p = transformed = None
        cached_metric = metric
        if g_entry is not None:  # G-cache: the metric learner is skipped entirely
            a_lm, a_p, g_lm = g_entry.A_LM, g_entry.A_P, g_entry.G_LM
        elif self.predefined_G:
            g_lm = self.predefined_G_LM
        else:
            if metric is None and past is not None:
                raise PLDRError(
                    "the KV-cache holds no metric tensor A (it was built with a G-cache); "
                    "keep passing the G-cache"
                )
            if self.causal_metric:
                # The KV-cache then holds the raw running sum of q^T q, so each new token's A
                # sums every earlier position too: decoding computes what training did.
                transformed, cached_metric, (metric, a_lm, a_p, g_lm) = self.causal_queries(
                    queries, query_valid, metric
                )
            elif metric is None:
                raw = metric_tensor_from_queries(queries, query_valid)
                metric, a_lm, a_p, g_lm = (metric_runner or self.metric_to_G)(raw)
                cached_metric = metric
            else:
                a_lm, a_p, g_lm = self.plgatt_layer(metric)

        # A, A_LM, A_P and G_LM are computed before attention whatever its kernel; only the
        # attention scores need the eager implementation (the DAG loss does not read them).
        impl = "eager" if need_deductive and need_scores else implementation
        if transformed is None:  # one G_LM for every query (the causal metric made its own)
            transformed = queries @ g_lm.to(queries.dtype)
        attended, scores = attend(transformed, keys, values, bias, is_causal, impl)
        batch, _, length, _ = attended.shape
        out = self.dense(attended.transpose(1, 2).reshape(batch, length, -1))

        deductive = Deductive(metric, a_lm, a_p, g_lm, scores) if need_deductive else None
        g_cached = GCacheEntry(a_lm, g_lm, a_p)
        if self.cache_first_G and g_entry is None and not self.predefined_G:
            # The authors' cache_first_G: this pass used each row's own G; later passes reuse
            # the first row's for the whole batch.
            assert a_lm is not None and a_p is not None  # the metric learner ran
            g_cached = GCacheEntry(a_lm[:1], g_lm[:1], a_p[:1])
        return out, LayerKV(keys, values, cached_metric), g_cached, deductive

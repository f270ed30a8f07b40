"""Fused kernels for the one-token decoding step (Triton; CUDA, or Triton's CPU interpreter).

Decoding one token at batch 1 is a chain of small kernels: op by op, a decoder layer is ~17 of
them (projections, rotation, cache writes, ``Q G_LM``, attention, residual adds, LayerNorms,
the SwiGLU product) and the step ~125, whose fixed costs and launch gaps, not arithmetic, set
the speed. :func:`decode_hidden` runs the same layer in nine kernels: the four matrix-vector
products (cuBLAS, as in the model) and five kernels here:

- ``rope_kv``: rotate the new query and key (the model's rotation), write the key and value into
  the static KV-cache at each row's write index (and, in the first layer, unmask that slot);
- ``attend``: ``q G_LM``, then attention over each row's written keys only;
- ``add_norm`` (twice): the residual add and the LayerNorm of the post-norm layer;
- ``silu_mul``: ``silu(gate) * up`` from the packed FFN input projection.

:func:`argmax_partial` and :func:`advance` do the decoding loop's bookkeeping after the logits
(greedy pick, counters, history, stop test) in two kernels instead of ~20.

Arithmetic: every intermediate the model rounds to its dtype is rounded here too (the residual
sum, ``q G_LM``, the SiLU output) and the rotation is the model's to the bit (fp contraction
off, the same three roundings). Reductions (LayerNorm statistics, dot products, the softmax)
sum in another order than cuBLAS/SDPA, so hidden states agree with the op-by-op step to float
rounding, not bit for bit: ``tests/test_fused_decode.py`` checks each kernel and the generated
ids against the op-by-op step, on the CPU through Triton's interpreter and on a GPU.

Triton comes with torch's CUDA wheels; without it (the CPU wheel) :func:`available` is False
and the decoding loop runs the op-by-op step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pldr_llm.model.plga import MASK_VALUE

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch comes without Triton
    triton = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from pldr_llm.model.cache import GCacheEntry, StaticLayerKV
    from pldr_llm.model.model import PackedLayer, PLDRModel

#: Keys per block of the attention kernel's loop.
KEY_BLOCK = 64
#: Logits per program of the partial arg-max.
ARGMAX_BLOCK = 2048


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device``: Triton is installed and the device is
    CUDA (or the CPU under Triton's interpreter)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def supports(model: PLDRModel) -> str | None:
    """Why :func:`decode_hidden` cannot run ``model`` (None: it can)."""
    config = model.config
    if config.activation != "silu":
        return f"activation {config.activation!r} (the fused FFN kernel is SwiGLU's)"
    depth = config.depth
    if depth & (depth - 1) or depth < 16:
        return f"head depth {depth} (the kernels need a power of two >= 16)"
    if config.causal_metric:
        return "a causal metric (its G_LM changes with every token)"
    if model.attn_implementation != "sdpa":
        return f"attn_implementation={model.attn_implementation!r} (kept op by op)"
    return None


def _block(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _norm_store(s, w_ptr, b_ptr, out_ptr, offs, mask, n, eps):
        """LayerNorm of the float32 row ``s`` (zero past ``n``), stored in out's dtype."""
        mean = tl.sum(s, axis=0) / n
        centered = tl.where(mask, s - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / n
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (centered * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _embed_norm_kernel(
        ids_ptr, table_ptr, w_ptr, b_ptr, out_ptr, scale, eps, n, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        token = tl.load(ids_ptr + row)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(table_ptr + token * n + offs, mask=mask, other=0.0).to(tl.float32)
        # embedding * sqrt(d_model) is rounded to the model's dtype before the LayerNorm
        x = (x * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
        _norm_store(x, w_ptr, b_ptr, out_ptr + row * n, offs, mask, n, eps)

    @triton.jit
    def _add_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, eps, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + y).to(out_ptr.dtype.element_ty).to(tl.float32)  # the residual, in the dtype
        _norm_store(s, w_ptr, b_ptr, out_ptr + row * n, offs, mask, n, eps)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < width
        gate = tl.load(gate_up_ptr + row * 2 * width + offs, mask=mask, other=0.0)
        up = tl.load(gate_up_ptr + row * 2 * width + width + offs, mask=mask, other=0.0)
        dtype = out_ptr.dtype.element_ty
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)  # SiLU, rounded like F.silu
        tl.store(out_ptr + row * width + offs, (act * up.to(tl.float32)).to(dtype), mask=mask)

    @triton.jit
    def _rotate(x, partner, cos, sin, ROTATE_F32: tl.constexpr, dtype: tl.constexpr):
        """``x * cos + partner * sin`` rounded as RotaryEmbedding.rotate rounds it."""
        if ROTATE_F32:  # the original's rotation: float32, cast back at the end
            out = x.to(tl.float32) * cos + partner.to(tl.float32) * sin
        else:  # transformers': every product and the sum in the input's dtype
            c = cos.to(dtype).to(tl.float32)
            s = sin.to(dtype).to(tl.float32)
            a = (x.to(tl.float32) * c).to(dtype).to(tl.float32)
            b = (partner.to(tl.float32) * s).to(dtype).to(tl.float32)
            out = a + b
        return out.to(dtype)

    @triton.jit
    def _rope_kv_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, widx_ptr, q_ptr, key_ptr, value_ptr,
        ids_ptr, bias_ptr, heads, slots, pad_id, mask_value,
        DK: tl.constexpr, INTERLEAVED: tl.constexpr, WRITE_BIAS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        head = tl.program_id(1)
        offs = tl.arange(0, DK)
        if INTERLEAVED:  # pairs (2i, 2i + 1)
            partner = offs ^ 1
        else:  # pairs (i, i + dk/2)
            partner = (offs + DK // 2) % DK
        pos = tl.load(pos_ptr + row)
        cos = tl.load(cos_ptr + pos * DK + offs).to(tl.float32)
        sin = tl.load(sin_ptr + pos * DK + offs).to(tl.float32)
        dtype = q_ptr.dtype.element_ty
        q_base = qkv_ptr + row * 3 * heads * DK + head * DK
        k_base = q_base + heads * DK
        v_base = k_base + heads * DK
        q = _rotate(tl.load(q_base + offs), tl.load(q_base + partner), cos, sin, INTERLEAVED, dtype)
        k = _rotate(tl.load(k_base + offs), tl.load(k_base + partner), cos, sin, INTERLEAVED, dtype)
        tl.store(q_ptr + (row * heads + head) * DK + offs, q)
        slot = tl.load(widx_ptr + row)
        cache = ((row * heads + head) * slots + slot) * DK + offs
        tl.store(key_ptr + cache, k.to(key_ptr.dtype.element_ty))
        tl.store(value_ptr + cache, tl.load(v_base + offs).to(value_ptr.dtype.element_ty))
        if WRITE_BIAS:
            if head == 0:  # a key that is the pad id stays masked, like the original's
                token = tl.load(ids_ptr + row)
                bias = tl.where(token != pad_id, 0.0, mask_value)
                tl.store(bias_ptr + row * slots + slot, bias.to(bias_ptr.dtype.element_ty))

    @triton.jit
    def _attend_kernel(
        q_ptr, g_ptr, key_ptr, value_ptr, bias_ptr, widx_ptr, out_ptr,
        heads, slots, g_row_stride, scale,
        DK: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        head = tl.program_id(1)
        dtype = out_ptr.dtype.element_ty
        d = tl.arange(0, DK)
        q = tl.load(q_ptr + (row * heads + head) * DK + d).to(tl.float32)
        g_base = g_ptr + row * g_row_stride + head * DK * DK
        g = tl.load(g_base + d[:, None] * DK + d[None, :]).to(tl.float32)
        # q G_LM, rounded to the dtype as the model's matmul rounds it
        t = tl.sum(q[:, None] * g, axis=0).to(dtype).to(tl.float32)
        # Only the keys written so far (slots up to this step's write index) can be unmasked.
        written = tl.load(widx_ptr + row) + 1
        cache = (row * heads + head) * slots * DK
        m = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([DK], tl.float32)
        for start in range(0, written, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < written
            k = tl.load(key_ptr + cache + n[:, None] * DK + d[None, :], mask=valid[:, None])
            s = tl.sum(k.to(tl.float32) * t[None, :], axis=1) * scale
            bias = tl.load(bias_ptr + row * slots + n, mask=valid, other=0.0).to(tl.float32)
            s = tl.where(valid, s + bias, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(value_ptr + cache + n[:, None] * DK + d[None, :], mask=valid[:, None])
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            m = m_new
        tl.store(out_ptr + (row * heads + head) * DK + d, (acc / total).to(dtype))

    @triton.jit
    def _argmax_partial_kernel(logits_ptr, best_ptr, where_ptr, vocab, parts, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        part = tl.program_id(1)
        offs = part * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * vocab + offs, mask=offs < vocab, other=float("-inf"))
        x = x.to(tl.float32)
        best = tl.max(x, axis=0)
        # the first index of the maximum, as torch.argmax picks it
        first = tl.min(tl.where(x == best, offs, vocab), axis=0)
        tl.store(best_ptr + row * parts + part, best)
        tl.store(where_ptr + row * parts + part, first)

    @triton.jit
    def _advance_kernel(
        new_ptr, best_ptr, where_ptr, ids_ptr, active_ptr, done_ptr, counters_ptr,
        history_ptr, report_ptr, stop_ptr, max_new_ptr, forced_ptr, forced_len_ptr,
        batch, slots, parts, vocab,
        N_STOP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
        GREEDY: tl.constexpr, FORCING: tl.constexpr,
    ):  # fmt: skip
        rows = tl.arange(0, BLOCK_B)
        in_batch = rows < batch
        if GREEDY:  # finish the arg-max: the first part holding the maximum
            p = tl.arange(0, BLOCK_P)
            at = rows[:, None] * parts + p[None, :]
            ok = in_batch[:, None] & (p[None, :] < parts)
            best = tl.load(best_ptr + at, mask=ok, other=float("-inf"))
            top = tl.max(best, axis=1)
            index = tl.load(where_ptr + at, mask=ok, other=vocab)
            new = tl.min(tl.where(best == top[:, None], index, vocab), axis=1).to(tl.int64)
        else:
            new = tl.load(new_ptr + rows, mask=in_batch, other=0)
        active = tl.load(active_ptr + rows, mask=in_batch, other=0) != 0
        done = tl.load(done_ptr + rows, mask=in_batch, other=0) != 0
        run = active & (done == 0)
        generated = tl.load(counters_ptr + 2 * batch + rows, mask=in_batch, other=0)
        column = tl.minimum(generated, slots - 1)
        if FORCING:
            forced = tl.load(forced_ptr + rows * slots + column, mask=in_batch, other=0)
            forced_len = tl.load(forced_len_ptr + rows, mask=in_batch, other=0)
            new = tl.where(generated < forced_len, forced, new)
        ids = tl.load(ids_ptr + rows, mask=in_batch, other=0)
        # the pending tokens, and whether each was its row's last, before they are replaced
        tl.store(report_ptr + rows, ids.to(tl.float32), mask=in_batch)
        tl.store(report_ptr + batch + rows, done.to(tl.float32), mask=in_batch)
        tl.store(history_ptr + rows * slots + column, new, mask=in_batch)
        ids = tl.where(run, new, ids)
        tl.store(ids_ptr + rows, ids, mask=in_batch)
        step = run.to(tl.int64)
        for c in range(3):  # position, write index, tokens generated
            at_c = counters_ptr + c * batch + rows
            tl.store(at_c, tl.load(at_c, mask=in_batch, other=0) + step, mask=in_batch)
        stop = (generated + step) >= tl.load(max_new_ptr + rows, mask=in_batch, other=0)
        for j in range(N_STOP):
            stop = stop | (tl.load(stop_ptr + rows * N_STOP + j, mask=in_batch, other=-1) == ids)
        tl.store(done_ptr + rows, active & stop, mask=in_batch)


def _launch_options(num_warps: int) -> dict:
    # The interpreter takes no compile options.
    return {} if interpreting() else {"num_warps": num_warps}


def embed_norm(model: PLDRModel, ids: Tensor) -> Tensor:
    """``LN(embedding(ids) * sqrt(d_model))`` for [B] ids: the decoder's input, [B, d_model]."""
    decoder = model.decoder
    table, norm = decoder.embedding.weight, decoder.layernorm1
    width = table.shape[1]
    out = torch.empty(ids.shape[0], width, dtype=table.dtype, device=table.device)
    _embed_norm_kernel[(ids.shape[0],)](
        ids, table, norm.weight, norm.bias, out, decoder.embedding_scale, norm.eps, width,
        BLOCK=_block(width), **_launch_options(4),
    )  # fmt: skip
    return out


def add_norm(x: Tensor, y: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    """``norm(x + y)`` for [B, d] rows (the sum rounded to the dtype first, as the model does)."""
    out = torch.empty_like(x)
    width = x.shape[-1]
    _add_norm_kernel[(x.shape[0],)](
        x, y, norm.weight, norm.bias, out, norm.eps, width, BLOCK=_block(width),
        **_launch_options(4),
    )  # fmt: skip
    return out


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of the packed [B, 2F] FFN input projection -> [B, F]."""
    batch, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(batch, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(batch, triton.cdiv(width, block))](
        gate_up, out, width, BLOCK=block, **_launch_options(4)
    )
    return out


def rope_kv(
    model: PLDRModel,
    qkv: Tensor,
    positions: Tensor,
    kv: StaticLayerKV,
    ids: Tensor,
    key_bias: Tensor,
    write_bias: bool,
) -> Tensor:
    """Rotate the new queries and keys of the packed [B, 3 d_model] projection at
    ``positions`` [B]; write keys and values into ``kv`` at its write index; with
    ``write_bias``, unmask each row's written slot in ``key_bias`` [B, slots] unless its token
    (``ids`` [B]) is the pad id. Returns the rotated queries [B, H, dk]."""
    config = model.config
    heads, depth = config.num_heads, config.depth
    rotary = model.decoder.dec_layers[0].mha1.rotary
    batch = qkv.shape[0]
    queries = torch.empty(batch, heads, depth, dtype=qkv.dtype, device=qkv.device)
    options = {} if interpreting() else {"num_warps": 1, "enable_fp_fusion": False}
    _rope_kv_kernel[(batch, heads)](
        qkv, rotary.cos, rotary.sin, positions, kv.write_index, queries, kv.key, kv.value,
        ids, key_bias, heads, kv.key.shape[2], config.pad_id, MASK_VALUE,
        DK=depth, INTERLEAVED=rotary.interleaved, WRITE_BIAS=write_bias, **options,
    )  # fmt: skip
    return queries


def attend(queries: Tensor, g_lm: Tensor, kv: StaticLayerKV, key_bias: Tensor) -> Tensor:
    """``softmax((q G_LM) K^T / sqrt(dk) + bias) V`` of one new query per row ([B, H, dk]
    queries, G_LM [B or 1, H, dk, dk]) over the keys written so far -> [B, H * dk]."""
    batch, heads, depth = queries.shape
    out = torch.empty(batch, heads * depth, dtype=queries.dtype, device=queries.device)
    g_row_stride = g_lm.stride(0) if g_lm.shape[0] > 1 else 0
    _attend_kernel[(batch, heads)](
        queries, g_lm, kv.key, kv.value, key_bias, kv.write_index, out,
        heads, kv.key.shape[2], g_row_stride, depth**-0.5,
        DK=depth, BLOCK_N=KEY_BLOCK, **_launch_options(4),
    )  # fmt: skip
    return out


def decode_hidden(
    model: PLDRModel,
    packed: Sequence[PackedLayer],
    ids: Tensor,
    positions: Tensor,
    key_bias: Tensor,
    kv: Sequence[StaticLayerKV],
    g: Sequence[GCacheEntry],
) -> Tensor:
    """The decoder's last hidden state [B, d_model] for one new token per row (``ids`` [B] at
    rotary ``positions`` [B]), with the static KV-cache ``kv`` (written in place at its write
    index, which ``key_bias`` [B, slots] masks) and the G-cache ``g``: what
    ``model.run_layers(ids[:, None], positions[:, None], key_bias[:, None, None], False, kv, g,
    packed=packed)`` computes, in nine kernels a layer (see the module's docstring)."""
    hidden = embed_norm(model, ids)
    for index, (layer, pack, layer_kv, layer_g) in enumerate(
        zip(model.decoder.dec_layers, packed, kv, g)
    ):
        attention = layer.mha1
        queries = rope_kv(
            model, pack.qkv(hidden), positions, layer_kv, ids, key_bias, write_bias=index == 0
        )
        attended = attention.dense(attend(queries, layer_g.G_LM, layer_kv, key_bias))
        hidden = add_norm(hidden, attended, layer.layernorm1)
        ffn = layer.ffn.gluw3(silu_mul(pack.gate_up(hidden)))
        hidden = add_norm(hidden, ffn, layer.layernorm2)
    return hidden


def argmax_partial(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of [B, V] logits and per block of :data:`ARGMAX_BLOCK`: the maximum and the first
    index holding it ([B, parts] each); :func:`advance` finishes the arg-max."""
    batch, vocab = logits.shape
    parts = triton.cdiv(vocab, ARGMAX_BLOCK)
    best = torch.empty(batch, parts, dtype=torch.float32, device=logits.device)
    where = torch.empty(batch, parts, dtype=torch.int64, device=logits.device)
    _argmax_partial_kernel[(batch, parts)](
        logits, best, where, vocab, parts, BLOCK=ARGMAX_BLOCK, **_launch_options(4)
    )
    return best, where


def advance(
    new: Tensor | None,
    logits: Tensor | None,
    ids: Tensor,
    active: Tensor,
    done: Tensor,
    counters: Tensor,
    history: Tensor,
    report: Tensor,
    stop_ids: Tensor,
    max_new: Tensor,
    forced: Tensor | None = None,
    forced_len: Tensor | None = None,
) -> None:
    """The decoding loop's bookkeeping of one step in one kernel (after :func:`argmax_partial`
    for greedy rows): each row's new token (``new`` [B], or the arg-max of ``logits`` [B, V]
    when ``new`` is None; teacher-forced where ``forced`` says), reported pending token and
    finished flag (``report`` rows 0, 1), history, pending id, the three counters and the
    finished flag. DecodeEngine._advance_rows is the op-by-op form."""
    batch, slots = history.shape
    greedy = new is None
    best = where = None
    parts, vocab = 1, 1
    if greedy:
        assert logits is not None
        best, where = argmax_partial(logits)
        parts, vocab = best.shape[1], logits.shape[1]
    forcing = forced is not None
    _advance_kernel[(1,)](
        new if new is not None else ids, best if best is not None else report,
        where if where is not None else ids, ids, active, done, counters, history, report,
        stop_ids, max_new, forced if forcing else ids, forced_len if forcing else ids,
        batch, slots, parts, vocab,
        N_STOP=stop_ids.shape[1], BLOCK_B=_block(batch), BLOCK_P=_block(parts),
        GREEDY=greedy, FORCING=forcing, **_launch_options(4),
    )  # fmt: skip

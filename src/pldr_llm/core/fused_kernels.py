"""The Triton kernels of :mod:`pldr_llm.core.fused` (what each computes is described there).

A module of their own so that Triton (~0.1-0.4 s to import) is imported only when a fused step
runs: the CPU's op-by-op step, and a CLI process before its warm-up thread, never pay for it.
"""

# In a try block because transformers' scan of an exported folder's imports skips those: the
# folder must load where Triton is missing (torch's CPU wheel), and this module is then never
# imported (fused.available is False).
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl
except ImportError as missing:
    raise ImportError("the fused decoding kernels need Triton") from missing


@triton.jit
def norm_store(s, w_ptr, b_ptr, out_ptr, offs, mask, n, eps):
    """LayerNorm of the float32 row ``s`` (zero past ``n``), stored in out's dtype."""
    mean = tl.sum(s, axis=0) / n
    centered = tl.where(mask, s - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / n
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (centered * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def embed_norm_kernel(
    ids_ptr, table_ptr, w_ptr, b_ptr, out_ptr, scale, eps, n, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    token = tl.load(ids_ptr + row)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(table_ptr + token * n + offs, mask=mask, other=0.0).to(tl.float32)
    # embedding * sqrt(d_model) is rounded to the model's dtype before the LayerNorm
    x = (x * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
    norm_store(x, w_ptr, b_ptr, out_ptr + row * n, offs, mask, n, eps)


@triton.jit
def add_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, eps, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + y).to(out_ptr.dtype.element_ty).to(tl.float32)  # the residual, in the dtype
    norm_store(s, w_ptr, b_ptr, out_ptr + row * n, offs, mask, n, eps)


@triton.jit
def silu_mul_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
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
def rotate(x, partner, cos, sin, ROTATE_F32: tl.constexpr, dtype: tl.constexpr):
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
def rope_kv_kernel(
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
    q = rotate(tl.load(q_base + offs), tl.load(q_base + partner), cos, sin, INTERLEAVED, dtype)
    k = rotate(tl.load(k_base + offs), tl.load(k_base + partner), cos, sin, INTERLEAVED, dtype)
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
def attend_kernel(
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
def argmax_partial_kernel(logits_ptr, best_ptr, where_ptr, vocab, parts, BLOCK: tl.constexpr):
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
def advance_kernel(
    new_ptr, best_ptr, where_ptr, ids_ptr, active_ptr, done_ptr, counters_ptr,
    history_ptr, report_ptr, stop_ptr, max_new_ptr, forced_ptr, forced_len_ptr,
    batch, slots, parts, vocab, counters_stride, report_stride,
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
    generated = tl.load(counters_ptr + 2 * counters_stride + rows, mask=in_batch, other=0)
    column = tl.minimum(generated, slots - 1)
    if FORCING:
        forced = tl.load(forced_ptr + rows * slots + column, mask=in_batch, other=0)
        forced_len = tl.load(forced_len_ptr + rows, mask=in_batch, other=0)
        new = tl.where(generated < forced_len, forced, new)
    ids = tl.load(ids_ptr + rows, mask=in_batch, other=0)
    # the pending tokens, and whether each was its row's last, before they are replaced
    tl.store(report_ptr + rows, ids.to(tl.float32), mask=in_batch)
    tl.store(report_ptr + report_stride + rows, done.to(tl.float32), mask=in_batch)
    tl.store(history_ptr + rows * slots + column, new, mask=in_batch)
    ids = tl.where(run, new, ids)
    tl.store(ids_ptr + rows, ids, mask=in_batch)
    step = run.to(tl.int64)
    for c in range(3):  # position, write index, tokens generated
        at_c = counters_ptr + c * counters_stride + rows
        tl.store(at_c, tl.load(at_c, mask=in_batch, other=0) + step, mask=in_batch)
    stop = (generated + step) >= tl.load(max_new_ptr + rows, mask=in_batch, other=0)
    for j in range(N_STOP):
        stop = stop | (tl.load(stop_ptr + rows * N_STOP + j, mask=in_batch, other=-1) == ids)
    tl.store(done_ptr + rows, active & stop, mask=in_batch)


@triton.jit
def penalize_kernel(
    logits_ptr,
    counts_ptr,
    seen_ptr,
    bias_ptr,
    repetition_ptr,
    presence_ptr,
    frequency_ptr,
    rows_ptr,
    out_ptr,
    vocab,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """core.processing's penalties and bias of one block of one row: the same float32
    operations in the same order (the division correctly rounded, no fused multiply-add)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    state = tl.load(rows_ptr + row) if HAS_ROWS else row  # the row's processing state
    x = tl.load(logits_ptr + row * vocab + offs, mask=mask, other=0.0).to(tl.float32)
    counts = tl.load(counts_ptr + state * vocab + offs, mask=mask, other=0.0)
    seen = tl.load(seen_ptr + state * vocab + offs, mask=mask, other=0) != 0
    repetition = tl.load(repetition_ptr + state)
    present = counts > 0
    penalized = tl.where(x < 0, x * repetition, tl.math.div_rn(x, repetition))
    x = tl.where(seen | present, penalized, x)
    x = x - tl.load(frequency_ptr + state) * counts
    x = x - tl.load(presence_ptr + state) * present.to(tl.float32)
    x = x + tl.load(bias_ptr + state * vocab + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * vocab + offs, x, mask=mask)


#: The launchable kernels by name without "_kernel" (``KERNELS.attend`` is ``attend_kernel``).
KERNELS = SimpleNamespace(
    **{
        name.removesuffix("_kernel"): value
        for name, value in list(globals().items())
        if name.endswith("_kernel")
    }
)

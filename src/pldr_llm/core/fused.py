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

A kernel is compiled on its first launch (~0.5 s each on a fresh machine, one after another).
Inside :func:`compile_only`, the calling thread's launches compile instead, in parallel on a
thread pool, and launch nothing: the background warm-up (pldr_llm.generation.warm) runs one step
so, then the real step only loads the compiled kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_for
from contextlib import contextmanager
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .plga import mask_value

if TYPE_CHECKING:
    from .cache import GCacheEntry, StaticLayerKV
    from .model import PackedLayer, PLDRModel

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
    if not _triton_installed():
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


@functools.cache
def _triton_installed() -> bool:
    # Looked up, not imported: importing Triton costs ~0.1-0.4 s (see fused_kernels).
    return importlib.util.find_spec("triton") is not None


_KERNELS: SimpleNamespace | None = None
#: Per thread: the KernelCompiles of the innermost compile_only (absent or None outside one).
#: Thread-local so that another thread's fused step (a server's decoding loop, the main
#: thread's generation) launches its kernels as ever while the warm-up compiles.
_COMPILING = threading.local()


def _real_kernels() -> SimpleNamespace:
    """The Triton kernels (pldr_llm.core.fused_kernels), imported on the first fused call."""
    global _KERNELS
    if _KERNELS is None:
        from .fused_kernels import KERNELS

        _KERNELS = KERNELS
    return _KERNELS


def _kernels() -> Any:
    """What the wrappers below launch ``NAME[grid](...)`` on: the kernels, or in a thread inside
    :func:`compile_only`, its stand-in that compiles them instead."""
    compiles: KernelCompiles | None = getattr(_COMPILING, "compiles", None)
    return _real_kernels() if compiles is None else compiles


def _mark(value: object) -> object:
    """What of a launch argument can change Triton's compiled kernel, or more: a tensor's dtype,
    device and address modulo 16 (Triton specializes pointers on 16-byte alignment), a
    scalar's type and value. Finer than Triton's own key is safe: two launches that differ
    here but not there compile once, the second finding the first in Triton's cache."""
    if isinstance(value, Tensor):
        return ("tensor", value.dtype, value.device, value.data_ptr() % 16)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value), value)
    return object()  # equal to nothing: compiled apart


def _compile_after(
    before: Future[Any] | None, kernel: Any, grid: Any, args: tuple, kwargs: dict[str, Any]
) -> None:
    # One kernel's variants compile one after another: Triton's per-function state (its
    # per-device caches, made on first use) is not guarded against two threads at once.
    # ``before`` was submitted earlier, so a FIFO pool (ThreadPoolExecutor) runs it first or
    # at the same time: waiting for it cannot deadlock.
    if before is not None:
        wait_for([before])
    # JITFunction.warmup: compile for exactly these arguments (the launch's cache key) and
    # put the kernel in Triton's caches (memory and disk), without launching it.
    kernel.warmup(*args, grid=grid, **kwargs)


class KernelCompiles:
    """The stand-in for the kernel namespace inside :func:`compile_only`: ``NAME[grid](*args,
    **kwargs)`` submits ``NAME.warmup(*args, grid=grid, **kwargs)`` to the pool (once per
    distinct set of arguments, see :func:`_mark`) instead of launching. ``submitted``: the
    kernels' names in the order they were sent."""

    def __init__(self, pool: Executor) -> None:
        self.pool = pool
        self.submitted: list[str] = []
        self.futures: list[Future[Any]] = []
        self._seen: set[tuple] = set()
        self._last: dict[str, Future[Any]] = {}  # each kernel's last compile (see _compile_after)

    def __getattr__(self, name: str) -> _CompileLauncher:
        if name.startswith("_"):  # not a kernel (copy, pickle and friends probe these)
            raise AttributeError(name)
        return _CompileLauncher(self, name)

    def submit(self, name: str, grid: Any, args: tuple, kwargs: Mapping[str, Any]) -> None:
        """Send the compile of kernel ``name`` for this launch to the pool (unless sent)."""
        key = (name, tuple(map(_mark, args)), tuple((k, _mark(v)) for k, v in kwargs.items()))
        if key in self._seen:
            return
        self._seen.add(key)
        kernel = getattr(_real_kernels(), name)
        future = self.pool.submit(
            _compile_after, self._last.get(name), kernel, grid, args, dict(kwargs)
        )
        self._last[name] = future
        self.submitted.append(name)
        self.futures.append(future)

    def wait(self) -> BaseException | None:
        """Wait for every compile sent; the first one's error (in the order sent), or None."""
        wait_for(self.futures)
        return next((e for f in self.futures if (e := f.exception()) is not None), None)


class _CompileLauncher:
    """``NAME[grid]`` inside :func:`compile_only`: a callable that compiles, launching nothing."""

    def __init__(self, compiles: KernelCompiles, name: str) -> None:
        self._compiles, self._name = compiles, name

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self._compiles.submit(self._name, grid, args, kwargs)

        return launch


@contextmanager
def compile_only(pool: Executor) -> Iterator[KernelCompiles]:
    """In the calling thread only: every fused kernel launched inside compiles on ``pool`` (a
    thread pool; Triton's compiler runs ptxas as a subprocess and leaves the interpreter lock
    free in parts, so different kernels compile side by side) instead of running, with exactly
    the arguments the launch has, so that a later real launch finds it compiled. On exit,
    waits for every compile and raises the first one's error (unless the body raised).

    Nothing the kernels would write is written, so what the body computes from their outputs
    is garbage (``torch.empty``) and the caches and counters they advance stay as they were:
    run only code whose host side reads nothing from those outputs (pldr_llm.generation.warm
    runs one decoding step). Under Triton's CPU interpreter, ``warmup`` does nothing, so the
    body runs without kernels there too."""
    outer = getattr(_COMPILING, "compiles", None)
    compiles = KernelCompiles(pool)
    _COMPILING.compiles = compiles
    try:
        yield compiles
    finally:
        _COMPILING.compiles = outer
        error = compiles.wait()  # also when the body raised: no compile outlives the block
    if error is not None:
        raise error


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _block(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def _launch_options(num_warps: int) -> dict:
    # The interpreter takes no compile options.
    return {} if interpreting() else {"num_warps": num_warps}


def embed_norm(model: PLDRModel, ids: Tensor) -> Tensor:
    """``LN(embedding(ids) * sqrt(d_model))`` for [B] ids: the decoder's input, [B, d_model]."""
    decoder = model.decoder
    table, norm = decoder.embedding.weight, decoder.layernorm1
    width = table.shape[1]
    out = torch.empty(ids.shape[0], width, dtype=table.dtype, device=table.device)
    _kernels().embed_norm[(ids.shape[0],)](
        ids, table, norm.weight, norm.bias, out, decoder.embedding_scale, norm.eps, width,
        BLOCK=_block(width), **_launch_options(4),
    )  # fmt: skip
    return out


def add_norm(x: Tensor, y: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    """``norm(x + y)`` for [B, d] rows (the sum rounded to the dtype first, as the model does)."""
    out = torch.empty_like(x)
    width = x.shape[-1]
    _kernels().add_norm[(x.shape[0],)](
        x, y, norm.weight, norm.bias, out, norm.eps, width, BLOCK=_block(width),
        **_launch_options(4),
    )  # fmt: skip
    return out


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of the packed [B, 2F] FFN input projection -> [B, F]."""
    batch, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(batch, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _kernels().silu_mul[(batch, _ceil_div(width, block))](
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
    pad_id: int | None = None,
) -> Tensor:
    """Rotate the new queries and keys of the packed [B, 3 d_model] projection at
    ``positions`` [B]; write keys and values into ``kv`` at its write index; with
    ``write_bias``, unmask each row's written slot in ``key_bias`` [B, slots] unless its token
    (``ids`` [B]) is ``pad_id`` (None: the model's pad id; -1: no token stays masked).
    Returns the rotated queries [B, H, dk]."""
    config = model.config
    heads, depth = config.num_heads, config.depth
    rotary = model.decoder.dec_layers[0].mha1.rotary
    batch = qkv.shape[0]
    queries = torch.empty(batch, heads, depth, dtype=qkv.dtype, device=qkv.device)
    options = {} if interpreting() else {"num_warps": 1, "enable_fp_fusion": False}
    _kernels().rope_kv[(batch, heads)](
        qkv, rotary.cos, rotary.sin, positions, kv.write_index, queries, kv.key, kv.value,
        ids, key_bias, heads, kv.key.shape[2], config.pad_id if pad_id is None else pad_id,
        mask_value(key_bias.dtype),
        DK=depth, INTERLEAVED=rotary.interleaved, WRITE_BIAS=write_bias, **options,
    )  # fmt: skip
    return queries


def attend(queries: Tensor, g_lm: Tensor, kv: StaticLayerKV, key_bias: Tensor) -> Tensor:
    """``softmax((q G_LM) K^T / sqrt(dk) + bias) V`` of one new query per row ([B, H, dk]
    queries, G_LM [B or 1, H, dk, dk]) over the keys written so far -> [B, H * dk]."""
    batch, heads, depth = queries.shape
    out = torch.empty(batch, heads * depth, dtype=queries.dtype, device=queries.device)
    g_row_stride = g_lm.stride(0) if g_lm.shape[0] > 1 else 0
    _kernels().attend[(batch, heads)](
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
    pad_id: int | None = None,
) -> Tensor:
    """The decoder's last hidden state [B, d_model] for one new token per row (``ids`` [B] at
    rotary ``positions`` [B]), with the static KV-cache ``kv`` (written in place at its write
    index, which ``key_bias`` [B, slots] masks) and the G-cache ``g``: what
    ``model.run_layers(ids[:, None], positions[:, None], key_bias[:, None, None], False, kv, g,
    packed=packed)`` computes, in nine kernels a layer (see the module's docstring). A new key
    whose token is ``pad_id`` stays masked (None: the model's pad id, as the original; -1:
    none, as rows with an attention mask)."""
    hidden = embed_norm(model, ids)
    for index, (layer, pack, layer_kv, layer_g) in enumerate(
        zip(model.decoder.dec_layers, packed, kv, g)
    ):
        attention = layer.mha1
        queries = rope_kv(
            model, pack.qkv(hidden), positions, layer_kv, ids, key_bias, index == 0, pad_id
        )
        attended = attention.dense(attend(queries, layer_g.G_LM, layer_kv, key_bias))
        hidden = add_norm(hidden, attended, layer.layernorm1)
        ffn = layer.ffn.gluw3(silu_mul(pack.gate_up(hidden)))
        hidden = add_norm(hidden, ffn, layer.layernorm2)
    return hidden


def penalize(
    logits: Tensor,
    counts: Tensor,
    seen: Tensor,
    bias: Tensor,
    factors: tuple[Tensor, Tensor, Tensor],
    rows: Tensor | None = None,
) -> Tensor:
    """:meth:`pldr_llm.core.processing.RowProcessing.apply`'s penalties and bias of [B, V]
    ``logits`` in one kernel (float32 out; the arithmetic of the op-by-op version, bit for bit):
    ``counts`` [R, V] float32, ``seen`` [R, V] bool (in the prompt), ``bias`` [R, V] float32 and
    the (repetition, presence, frequency) ``factors`` [R] of the state's rows, row ``rows[b]``
    (or ``b``) for logits row ``b``."""
    batch, vocab = logits.shape
    out = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)
    block = 1024
    options = {} if interpreting() else {"num_warps": 4, "enable_fp_fusion": False}
    _kernels().penalize[(batch, _ceil_div(vocab, block))](
        logits.contiguous(), counts, seen.view(torch.uint8), bias, *factors,
        rows if rows is not None else counts, out, vocab, HAS_ROWS=rows is not None,
        BLOCK=block, **options,
    )  # fmt: skip
    return out


def argmax_partial(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of [B, V] logits and per block of :data:`ARGMAX_BLOCK`: the maximum and the first
    index holding it ([B, parts] each); :func:`advance` finishes the arg-max."""
    batch, vocab = logits.shape
    parts = _ceil_div(vocab, ARGMAX_BLOCK)
    best = torch.empty(batch, parts, dtype=torch.float32, device=logits.device)
    where = torch.empty(batch, parts, dtype=torch.int64, device=logits.device)
    _kernels().argmax_partial[(batch, parts)](
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
    finished flag. KVStep.advance_rows (core/decode_step.py) is the op-by-op form."""
    batch, slots = history.shape
    greedy = new is None
    best = where = None
    parts, vocab = 1, 1
    if greedy:
        assert logits is not None
        best, where = argmax_partial(logits)
        parts, vocab = best.shape[1], logits.shape[1]
    forcing = forced is not None
    _kernels().advance[(1,)](
        new if new is not None else ids, best if best is not None else report,
        where if where is not None else ids, ids, active, done, counters, history, report,
        stop_ids, max_new, forced if forcing else ids, forced_len if forcing else ids,
        # the rows of counters and report [3, B] are B apart also in a view of fewer rows
        batch, slots, parts, vocab, counters.stride(0), report.stride(0),
        N_STOP=stop_ids.shape[1], BLOCK_B=_block(batch), BLOCK_P=_block(parts),
        GREEDY=greedy, FORCING=forcing, **_launch_options(4),
    )  # fmt: skip

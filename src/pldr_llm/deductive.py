"""Deductive outputs as data: spectra, ranks, determinants, cache invariance, heatmaps.

A PLDR-LLM exposes, per decoder layer and head, four ``dk x dk`` tensors: the metric tensor ``A``,
``A_LM``, the potential tensor ``A_P`` and the energy-curvature tensor ``G_LM`` (see
:mod:`pldr_llm.model.plga`). This module turns them into figures a notebook or the
``pldr-llm inspect`` / ``pldr-llm compare`` commands can use:

* :func:`matrix_stats` / :func:`analyze_g_list` / :func:`analyze_deductive`: per head singular
  values (descending), numerical rank, ``log|det|`` with its sign, RMS -- all in float64.
* :func:`compare`: per layer/head RMSE between two sets of deductive outputs (G files, G-caches,
  model outputs).
* :func:`cache_mode_runs` / :func:`cache_invariance`: run a model with and without KV-/G-cache
  on one continuation and measure how far the deductive outputs of each step move.
* :func:`inspect_model`: all of the above for a model and one or more prompts.
* :func:`plot_deductive` / :func:`plot_compare`: PNG heatmaps (layers x heads grids) and
  singular-value spectra, with matplotlib (optional; nothing global such as the pyplot backend is
  changed).

Numerical rank rule (stated in every report as ``rank_rule``): a singular value counts when it is
greater than ``tol = s_max * max(m, n) * eps``, where ``eps`` is the machine epsilon of the dtype
the tensor was *stored* in (float32: 1.19e-7) -- numpy's ``matrix_rank`` default applied to the
matrix as given. The SVD itself runs in float64; using float64's epsilon for float32 data would
call rounding noise "rank". Pass ``rtol`` to use ``tol = rtol * s_max`` instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pldr_llm.errors import PLDRError
from pldr_llm.gfile import load_g_file, normalize_g_entries

__all__ = [
    "CACHE_MODES",
    "DEDUCTIVE_NAMES",
    "CacheRuns",
    "DeductiveReport",
    "HeadStats",
    "InspectResult",
    "PlotSummary",
    "analyze_deductive",
    "analyze_g_list",
    "cache_invariance",
    "cache_mode_runs",
    "compare",
    "compare_across_prompts",
    "deductive_outputs",
    "head_matrices",
    "inspect_model",
    "layer_tensors",
    "matrix_stats",
    "plot_compare",
    "plot_deductive",
    "rank_rule",
]

#: The deductive tensors, in the order reports and plots list them.
DEDUCTIVE_NAMES = ("A", "A_LM", "A_P", "G_LM")

#: Cache modes of :func:`cache_mode_runs`, named like the golden data: KV-cache on/off, G-cache
#: on/off. ``kv0_g0`` (no cache at all, everything recomputed) is the reference.
CACHE_MODES = ("kv1_g1", "kv1_g0", "kv0_g1", "kv0_g0")

REPORT_FORMAT = "pldr-llm-deductive"
REPORT_VERSION = 1

LayerTensors = dict[str, Tensor]


def rank_rule(rtol: float | None = None) -> str:
    """The numerical-rank rule in words, as written into reports."""
    if rtol is not None:
        return f"rank = #(s > tol), tol = {rtol!r} * s_max"
    return (
        "rank = #(s > tol), tol = s_max * max(m, n) * eps(stored dtype) "
        "(numpy matrix_rank default; float32 eps = 1.1920929e-07); SVD in float64"
    )


# --------------------------------------------------------------------------------------------
# Per-matrix figures
# --------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class HeadStats:
    """Figures of one ``dk x dk`` matrix (one layer, one head), computed in float64."""

    singular_values: np.ndarray  # descending
    rank: int
    rank_tol: float
    log_abs_det: float  # -inf when the determinant is 0
    det_sign: float  # -1, 0 or 1
    rms: float

    @property
    def top_sv_energy(self) -> float:
        """``s_1^2 / sum(s_i^2)``: 1.0 for a rank-1 matrix (the fraction of the squared
        Frobenius norm in the leading singular direction)."""
        total = float(np.sum(self.singular_values**2))
        return float(self.singular_values[0] ** 2 / total) if total > 0 else 0.0

    @property
    def condition_number(self) -> float:
        """``s_max / s_min`` (inf when singular)."""
        s_min = float(self.singular_values[-1])
        return float(self.singular_values[0] / s_min) if s_min > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures; non-finite values (``log|det|`` of a singular matrix) are null."""
        return {
            "singular_values": [float(s) for s in self.singular_values],
            "rank": int(self.rank),
            "rank_tol": float(self.rank_tol),
            "log_abs_det": _finite_or_none(self.log_abs_det),
            "det_sign": float(self.det_sign),
            "rms": float(self.rms),
            "top_sv_energy": self.top_sv_energy,
            "condition_number": _finite_or_none(self.condition_number),
        }


def _eps_of(dtype: torch.dtype | np.dtype) -> float:
    if isinstance(dtype, torch.dtype):
        return (
            float(torch.finfo(dtype).eps)
            if dtype.is_floating_point
            else float(np.finfo(np.float64).eps)
        )
    return (
        float(np.finfo(dtype).eps)
        if np.issubdtype(dtype, np.floating)
        else float(np.finfo(np.float64).eps)
    )


def _stats_batch(mats: Tensor | np.ndarray, rtol: float | None) -> list[HeadStats]:
    """Figures of every matrix of a [N, m, n] stack."""
    if isinstance(mats, Tensor):
        eps = _eps_of(mats.dtype)
        arr = mats.detach().to("cpu", torch.float64).numpy()
    else:
        eps = _eps_of(mats.dtype)
        arr = np.asarray(mats, dtype=np.float64)
    if arr.ndim != 3:
        raise PLDRError(f"expected a stack of matrices [N, m, n], got shape {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise PLDRError("the tensor holds NaN or infinite values")
    m, n = arr.shape[-2:]
    s = np.linalg.svd(arr, compute_uv=False)  # descending per matrix
    if m == n:
        sign, logdet = np.linalg.slogdet(arr)
    else:  # no determinant for a rectangular matrix
        sign, logdet = np.full(len(arr), np.nan), np.full(len(arr), np.nan)
    rms = np.sqrt(np.mean(arr**2, axis=(-2, -1)))
    out = []
    for i in range(len(arr)):
        s_max = float(s[i, 0]) if s.shape[1] else 0.0
        tol = s_max * rtol if rtol is not None else s_max * max(m, n) * eps
        out.append(
            HeadStats(
                singular_values=s[i],
                rank=int(np.sum(s[i] > tol)),
                rank_tol=float(tol),
                log_abs_det=float(logdet[i]),
                det_sign=float(sign[i]),
                rms=float(rms[i]),
            )
        )
    return out


def matrix_stats(matrix: Tensor | np.ndarray, rtol: float | None = None) -> HeadStats:
    """Figures of one ``m x n`` matrix (see the module docstring for the rank rule)."""
    m = matrix if isinstance(matrix, Tensor) else np.asarray(matrix)
    if m.ndim != 2:
        raise PLDRError(f"expected a matrix, got shape {list(m.shape)}")
    return _stats_batch(m[None], rtol)[0]


def head_matrices(t: Tensor, batch_index: int = 0) -> Tensor:
    """One layer's tensor as a [H, dk, dk] stack: picks ``batch_index`` from [B, H, dk, dk]."""
    if t.dim() == 4:
        if not -t.shape[0] <= batch_index < t.shape[0]:
            raise PLDRError(f"batch index {batch_index} is out of range for {t.shape[0]} rows")
        return t[batch_index]
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t[None]
    raise PLDRError(f"expected [B, H, dk, dk], [H, dk, dk] or [dk, dk], got {list(t.shape)}")


# --------------------------------------------------------------------------------------------
# Sets of deductive outputs
# --------------------------------------------------------------------------------------------


def _detach(t: Any) -> Tensor | None:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise PLDRError(f"expected a tensor, got {type(t).__name__}")
    return t.detach().to("cpu")


def layer_tensors(obj: Any) -> list[LayerTensors]:
    """Any set of deductive outputs as ``[{name: tensor}, ...]`` per layer, on the CPU.

    Accepts: a path to a G file; a list of the model's ``Deductive`` (``output.deductive``); a
    ``PLDROutput`` (its ``.deductive``, else its G-cache); a ``PLDRCache`` (its G-cache); a list of
    ``GCacheEntry`` or of ``(A_LM, G_LM)`` pairs or of G_LM tensors; a list of dicts. Names that
    are ``None`` are left out.
    """
    if isinstance(obj, (str, os.PathLike)):
        obj = load_g_file(obj)
    elif hasattr(obj, "logits") and hasattr(obj, "cache"):  # PLDROutput
        obj = obj.deductive if getattr(obj, "deductive", None) else obj.cache
    if hasattr(obj, "g") and not isinstance(obj, (list, tuple, Mapping)):  # PLDRCache
        if obj.g is None:
            raise PLDRError("the cache holds no G-cache")
        obj = obj.g
    if not isinstance(obj, (list, tuple)) or not obj:
        raise PLDRError(f"expected a non-empty list of per-layer outputs, got {type(obj).__name__}")
    layers: list[LayerTensors] = []
    if all(isinstance(x, Mapping) for x in obj):
        for item in obj:
            layers.append(
                {k: _detach(v) for k, v in item.items() if k in DEDUCTIVE_NAMES and v is not None}
            )  # type: ignore[misc]
        return layers
    if all(hasattr(x, "G_LM") for x in obj):
        for item in obj:
            d = {}
            for name in DEDUCTIVE_NAMES:
                v = getattr(item, name, None)
                if v is not None:
                    d[name] = _detach(v)
            layers.append(d)  # type: ignore[arg-type]
        return layers
    for a, g in normalize_g_entries(obj):
        layers.append({"G_LM": g} if a is None else {"A_LM": a, "G_LM": g})
    return layers


def _rmse(x: Tensor, y: Tensor) -> np.ndarray:
    """Per-head RMSE between [B, H, dk, dk] tensors (over batch rows and entries)."""
    a = x.detach().to("cpu", torch.float64)
    b = y.detach().to("cpu", torch.float64)
    if a.dim() == 3:
        a = a[None]
    if b.dim() == 3:
        b = b[None]
    if a.dim() != 4 or b.dim() != 4 or a.shape[1:] != b.shape[1:]:
        raise PLDRError(f"cannot compare tensors of shapes {list(x.shape)} and {list(y.shape)}")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise PLDRError(f"cannot compare batches of {a.shape[0]} and {b.shape[0]} rows")
    a, b = torch.broadcast_tensors(a, b)
    return ((a - b) ** 2).mean(dim=(0, 2, 3)).sqrt().numpy()


def compare(a: Any, b: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """RMSE between two sets of deductive outputs, per layer and head, in float64.

    ``a`` and ``b`` are anything :func:`layer_tensors` accepts. ``names`` picks the tensors (by
    default every name present in both, in ``DEDUCTIVE_NAMES`` order). Returns
    ``{"tensors": [...], "overall": {name: rmse}, "max_head": {name: rmse},
    "layers": [{"layer": i, name: [rmse per head], ...}]}``; ``overall`` is the RMSE over every
    layer, head and entry.
    """
    la, lb = layer_tensors(a), layer_tensors(b)
    if len(la) != len(lb):
        raise PLDRError(f"cannot compare {len(la)} layers with {len(lb)} layers")
    common = [n for n in DEDUCTIVE_NAMES if all(n in x for x in la) and all(n in x for x in lb)]
    if names is not None:
        missing = [n for n in names if n not in common]
        if missing:
            raise PLDRError(f"'{missing[0]}' is not present in both sets of deductive outputs")
        common = [n for n in DEDUCTIVE_NAMES if n in names]
    if not common:
        raise PLDRError("the two sets of deductive outputs share no tensor")
    layers: list[dict[str, Any]] = []
    sq: dict[str, list[np.ndarray]] = {n: [] for n in common}
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        entry: dict[str, Any] = {"layer": i}
        for n in common:
            per_head = _rmse(x[n], y[n])
            sq[n].append(per_head**2)
            entry[n] = [float(v) for v in per_head]
        layers.append(entry)
    overall = {n: float(np.sqrt(np.mean(np.concatenate(sq[n])))) for n in common}
    max_head = {n: float(np.sqrt(np.max(np.concatenate(sq[n])))) for n in common}
    return {"tensors": list(common), "overall": overall, "max_head": max_head, "layers": layers}


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


@dataclass
class DeductiveReport:
    """Per layer and head figures of one tensor (``tensor``, G_LM by default), optionally of the
    other deductive tensors (``others``), plus RMSE sections. ``to_dict``/``to_json`` write the
    JSON form ``{"layers": [{"heads": [{"singular_values": [...], "rank": n, ...}]}], ...}``."""

    layers: list[list[HeadStats]]
    tensor: str = "G_LM"
    others: dict[str, list[list[HeadStats]]] = field(default_factory=dict)
    rmse: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    rtol: float | None = None
    batch_index: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    @property
    def dk(self) -> int:
        return len(self.layers[0][0].singular_values) if self.layers and self.layers[0] else 0

    def ranks(self) -> np.ndarray:
        """[layers, heads] numerical ranks of ``tensor``."""
        return np.array([[h.rank for h in layer] for layer in self.layers])

    def log_abs_dets(self) -> np.ndarray:
        """[layers, heads] ``log|det|`` of ``tensor``."""
        return np.array([[h.log_abs_det for h in layer] for layer in self.layers])

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for i, layer in enumerate(self.layers):
            heads = []
            for h, stats in enumerate(layer):
                d: dict[str, Any] = {"head": h, **stats.to_dict()}
                for name, other in self.others.items():
                    d[name] = other[i][h].to_dict()
                heads.append(d)
            layers.append({"layer": i, "heads": heads})
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "source": self.source,
            "tensor": self.tensor,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "dk": self.dk,
            "batch_index": self.batch_index,
            "rank_rule": rank_rule(self.rtol),
            "layers": layers,
            "rmse": self.rmse,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int | None = 1) -> str:
        """The report as JSON text (standard JSON: no NaN/Infinity); written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def summary(self) -> str:
        """A fixed-width table: one row per layer and head."""
        lines = [
            f"{self.tensor}: {self.num_layers} layers x {self.num_heads} heads, dk={self.dk}; "
            + rank_rule(self.rtol),
            f"{'layer':>5} {'head':>4} {'rank':>5} {'log|det|':>12} {'sign':>5} "
            f"{'rms':>11} {'s_max':>11} {'s1^2/sum':>9}",
        ]
        for i, layer in enumerate(self.layers):
            for h, s in enumerate(layer):
                lines.append(
                    f"{i:>5} {h:>4} {s.rank:>5} {s.log_abs_det:>12.5g} {s.det_sign:>5.0f} "
                    f"{s.rms:>11.5g} {s.singular_values[0]:>11.5g} {s.top_sv_energy:>9.4f}"
                )
        return "\n".join(lines)


def _analyze_layers(
    layers: Sequence[LayerTensors],
    tensor: str,
    others: Iterable[str],
    rtol: float | None,
    batch_index: int,
    source: Mapping[str, Any] | None,
) -> DeductiveReport:
    if not layers or any(tensor not in x for x in layers):
        raise PLDRError(f"'{tensor}' is missing from the deductive outputs")
    main = [_stats_batch(head_matrices(x[tensor], batch_index), rtol) for x in layers]
    extra: dict[str, list[list[HeadStats]]] = {}
    for name in others:
        if name != tensor and all(name in x for x in layers):
            extra[name] = [_stats_batch(head_matrices(x[name], batch_index), rtol) for x in layers]
    return DeductiveReport(
        layers=main,
        tensor=tensor,
        others=extra,
        source=dict(source or {}),
        rtol=rtol,
        batch_index=batch_index,
    )


def analyze_g_list(
    entries: Any,
    rtol: float | None = None,
    batch_index: int = 0,
    include_A_LM: bool = True,
    source: Mapping[str, Any] | None = None,
) -> DeductiveReport:
    """Figures of a G list: a path to a G file, ``(A_LM, G_LM)`` pairs, G_LM tensors, a cache.

    The report's heads describe G_LM; with ``include_A_LM`` and pairs that carry A_LM, each head
    also gets an ``A_LM`` section.
    """
    if isinstance(entries, (str, os.PathLike)):
        source = {"kind": "g_file", "path": str(entries), **dict(source or {})}
    layers = layer_tensors(entries)
    return _analyze_layers(
        layers, "G_LM", ("A_LM",) if include_A_LM else (), rtol, batch_index, source
    )


def analyze_deductive(
    deductive: Any,
    rtol: float | None = None,
    batch_index: int = 0,
    tensor: str = "G_LM",
    others: Sequence[str] = ("A", "A_LM", "A_P"),
    source: Mapping[str, Any] | None = None,
) -> DeductiveReport:
    """Figures of a model's deductive outputs (``output.deductive``) for one batch row."""
    return _analyze_layers(layer_tensors(deductive), tensor, others, rtol, batch_index, source)


# --------------------------------------------------------------------------------------------
# Running a model
# --------------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_ids(ids: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    t = ids if isinstance(ids, Tensor) else torch.tensor(list(ids), dtype=torch.long)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise PLDRError("give one prompt at a time (shape [L] or [1, L])")
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise PLDRError("a prompt must be a non-empty sequence of token ids")
    return t.to(device=device, dtype=torch.long)[None]


def _cpu_layers(deductive: Sequence[Any] | None) -> list[LayerTensors]:
    if not deductive:
        raise PLDRError("the model returned no deductive outputs")
    return layer_tensors(list(deductive))


class _EvalMode:
    """``with _EvalMode(model):`` runs in eval mode and restores the training flag."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def deductive_outputs(
    model: Any, input_ids: Sequence[int] | Tensor, cache: Any = None
) -> list[LayerTensors]:
    """One forward pass with ``output_deductive=True`` (no cache unless given), on the CPU."""
    with _EvalMode(model):
        ids = _as_ids(input_ids, _model_device(model))
        out = model(ids, cache=cache, output_deductive=True)
    return _cpu_layers(out.deductive)


@dataclass
class CacheRuns:
    """Deductive outputs of one prompt and a fixed continuation in every cache mode.

    ``prompt`` is the uncached pass over the prompt (which is also what fills the G-cache);
    ``steps[mode][k]`` the outputs of decoding step ``k + 1`` (the prompt plus ``k + 1``
    continuation tokens) in ``mode`` (see :data:`CACHE_MODES`). ``g_cache`` holds the
    ``(A_LM, G_LM)`` pairs of the prompt pass.
    """

    prompt_ids: list[int]
    continuation: list[int]
    prompt: list[LayerTensors]
    steps: dict[str, list[list[LayerTensors]]]
    g_cache: list[tuple[Tensor | None, Tensor]]


@torch.no_grad()
def cache_mode_runs(model: Any, prompt_ids: Sequence[int] | Tensor, steps: int = 2) -> CacheRuns:
    """Decode ``steps`` greedy tokens after the prompt and record deductive outputs per mode.

    The continuation is fixed first (greedy on full recomputation), then every mode decodes that
    same token sequence, so differences come only from caching:

    * ``kv0_g0``: no cache; each step recomputes A, A_LM, A_P, G_LM over the grown sequence.
    * ``kv1_g1``: KV- and G-cache of the prompt pass; only the new token is run, G_LM reused.
    * ``kv1_g0``: KV-cache only; the metric tensor A cached with the keys is reused, the power
      law recomputed from it.
    * ``kv0_g1``: G-cache only; the grown sequence is recomputed with the prompt's G_LM.
    """
    if steps < 1:
        raise PLDRError("steps must be at least 1")
    device = _model_device(model)
    ids = _as_ids(prompt_ids, device)
    max_len = int(getattr(getattr(model, "config", None), "max_seq_len", 0) or 0)
    if max_len and ids.shape[1] + steps > max_len:
        raise PLDRError(
            f"prompt of {ids.shape[1]} tokens plus {steps} steps exceeds max_seq_len={max_len}"
        )
    with _EvalMode(model):
        first = model(ids, output_deductive=True)
        prompt = _cpu_layers(first.deductive)
        g_cache = [(_detach(e.A_LM), _detach(e.G_LM)) for e in first.cache.g]

        # Fixed continuation and the reference (no cache) outputs of every step.
        seq = ids
        logits = first.logits
        reference: list[list[LayerTensors]] = []
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, token), dim=1)
            out = model(seq, output_deductive=True)
            reference.append(_cpu_layers(out.deductive))
            logits = out.logits
        continuation = seq[0, ids.shape[1] :]

        runs: dict[str, list[list[LayerTensors]]] = {"kv0_g0": reference}
        for mode in ("kv1_g1", "kv1_g0"):
            cache = first.cache if mode == "kv1_g1" else first.cache.drop_g()
            outs = []
            for k in range(steps):
                out = model(continuation[k : k + 1][None], cache=cache, output_deductive=True)
                outs.append(_cpu_layers(out.deductive))
                cache = out.cache if mode == "kv1_g1" else out.cache.drop_g()
            runs[mode] = outs
        g_only = first.cache.drop_kv()
        runs["kv0_g1"] = [
            _cpu_layers(
                model(seq[:, : ids.shape[1] + k + 1], cache=g_only, output_deductive=True).deductive
            )
            for k in range(steps)
        ]
    return CacheRuns(
        prompt_ids=[int(i) for i in ids[0].tolist()],
        continuation=[int(i) for i in continuation.tolist()],
        prompt=prompt,
        steps={m: runs[m] for m in CACHE_MODES},
        g_cache=g_cache,
    )


def cache_invariance(runs: CacheRuns, names: Sequence[str] | None = None) -> dict[str, Any]:
    """RMSE sections of :func:`cache_mode_runs`: for every mode and step, the deductive outputs
    against the prompt pass (``vs_prompt``: 0 where the G-cache or the cached A is reused) and
    against the uncached step (``vs_uncached``: the same step recomputed with caches off)."""
    modes: dict[str, Any] = {}
    for mode in CACHE_MODES:
        per_step = []
        for k, layers in enumerate(runs.steps[mode]):
            entry: dict[str, Any] = {"step": k + 1}
            entry["vs_prompt"] = compare(layers, runs.prompt, _shared(layers, runs.prompt, names))
            if mode != "kv0_g0":
                ref = runs.steps["kv0_g0"][k]
                entry["vs_uncached"] = compare(layers, ref, _shared(layers, ref, names))
            per_step.append(entry)
        modes[mode] = per_step
    return {
        "description": (
            "RMSE of the deductive outputs of each decoding step, per cache mode (kv1_g1: KV- and "
            "G-cache; kv1_g0: KV-cache only; kv0_g1: G-cache only; kv0_g0: none), against the "
            "uncached prompt pass (vs_prompt) and against the same step without caches "
            "(vs_uncached)"
        ),
        "prompt_ids": runs.prompt_ids,
        "continuation": runs.continuation,
        "modes": modes,
    }


def _shared(
    a: Sequence[LayerTensors], b: Sequence[LayerTensors], names: Sequence[str] | None
) -> list[str]:
    have = [n for n in DEDUCTIVE_NAMES if all(n in x for x in a) and all(n in x for x in b)]
    return have if names is None else [n for n in have if n in names]


def compare_across_prompts(prompt_outputs: Sequence[Sequence[LayerTensors]]) -> dict[str, Any]:
    """RMSE between the deductive outputs of the first prompt and of each other prompt."""
    pairs = []
    for j in range(1, len(prompt_outputs)):
        pairs.append({"a": 0, "b": j, **compare(prompt_outputs[0], prompt_outputs[j])})
    return {
        "description": "RMSE between the uncached deductive outputs of prompt 0 and prompt b",
        "pairs": pairs,
    }


@dataclass
class InspectResult:
    """What :func:`inspect_model` found: the report, and the tensors behind it."""

    report: DeductiveReport
    prompt_outputs: list[list[LayerTensors]]  # uncached pass over each prompt
    runs: CacheRuns

    @property
    def g_cache(self) -> list[tuple[Tensor | None, Tensor]]:
        """``(A_LM, G_LM)`` per layer from the first prompt (for ``save_g_file``)."""
        return self.runs.g_cache


def inspect_model(
    model: Any,
    prompts: Sequence[Sequence[int] | Tensor],
    steps: int = 2,
    rtol: float | None = None,
    source: Mapping[str, Any] | None = None,
) -> InspectResult:
    """Figures of a model's deductive outputs over ``prompts`` (token ids, one list per prompt).

    The report's heads describe G_LM of the uncached pass over the first prompt (A, A_LM, A_P as
    extra sections); ``rmse.cached_vs_uncached`` compares cache modes over ``steps`` greedy
    decoding steps of the first prompt (:func:`cache_invariance`); ``rmse.across_prompts``
    compares each prompt's uncached outputs with the first prompt's.
    """
    if not prompts:
        raise PLDRError("give at least one prompt")
    runs = cache_mode_runs(model, prompts[0], steps=steps)
    outputs = [runs.prompt] + [deductive_outputs(model, p) for p in prompts[1:]]
    report = analyze_deductive(runs.prompt, rtol=rtol, source=source)
    report.rmse = {
        "cached_vs_uncached": cache_invariance(runs),
        "across_prompts": compare_across_prompts(outputs),
    }
    return InspectResult(report=report, prompt_outputs=outputs, runs=runs)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


@dataclass
class PlotSummary:
    """What a plot function drew: image size in pixels and, per block, the grid of panels
    actually present in the figure (counted from its axes, not from the request)."""

    path: Path
    width: int
    height: int
    grids: dict[str, tuple[int, int]]
    figure: Any = None

    @property
    def panels(self) -> dict[str, int]:
        return {k: r * c for k, (r, c) in self.grids.items()}


def _figure(width_in: float, height_in: float, dpi: int) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # optional dependency
        raise PLDRError("plotting needs matplotlib: pip install 'pldr-llm[plot]'") from exc
    # A bare Figure on an Agg canvas: no pyplot state, no GUI backend, nothing global changed.
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _panel_inches(cols: int) -> float:
    return float(min(1.1, max(0.35, 14.0 / max(cols, 1))))


_GRID = {"wspace": 0.05, "hspace": 0.08, "left": 0.06, "right": 0.99, "top": 0.86, "bottom": 0.02}


def _label(ax: Any, i: int, j: int, row_prefix: str = "L") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.minorticks_off()
    if i == 0:
        ax.set_title(f"h{j}", fontsize=7, pad=2)
    if j == 0:
        ax.set_ylabel(f"{row_prefix}{i}", fontsize=7)


def _heatmap_block(sub: Any, name: str, mats: Sequence[Tensor], title: str) -> None:
    rows, cols = len(mats), mats[0].shape[0]
    axes = sub.subplots(rows, cols, squeeze=False, gridspec_kw=_GRID)
    for i in range(rows):
        arr = mats[i].detach().to("cpu", torch.float64).numpy()
        for j in range(cols):
            ax = axes[i][j]
            m = arr[j]
            vmax = float(np.max(np.abs(m))) or 1.0
            ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_gid(f"{name}:{i}:{j}")
            _label(ax, i, j)
    sub.suptitle(title, fontsize=9)


def _spectra_block(
    sub: Any, name: str, series: Sequence[tuple[str, list[list[HeadStats]]]], title: str
) -> None:
    first = series[0][1]
    rows, cols = len(first), len(first[0])
    # No sharey: matplotlib's shared-axis bookkeeping is quadratic in the number of panels;
    # one explicit y-range for the whole block is as comparable and much faster.
    axes = sub.subplots(rows, cols, squeeze=False, gridspec_kw=_GRID)
    values = np.array(
        [
            s
            for _, layers in series
            for layer in layers
            for h in layer
            for s in (*h.singular_values, h.rank_tol)
        ]
    )
    positive = values[values > 0]
    floor = float(positive.min()) if positive.size else 1e-12
    top = float(positive.max()) if positive.size else 1.0
    lo = math.floor(math.log10(floor))
    # strictly above the largest value, so a flat spectrum (identity: all ones) stays visible
    hi = math.floor(math.log10(max(top, floor * 10))) + 1
    ticks = [10.0**e for e in sorted({lo, (lo + hi) // 2, hi})]
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_yscale("log")
            ax.set_autoscale_on(False)
            n = len(first[i][j].singular_values)
            for k, (label, layers) in enumerate(series):
                stats = layers[i][j]
                sv = np.maximum(stats.singular_values, floor)
                x = np.arange(1, len(sv) + 1)
                ax.plot(x, sv, lw=0.9, color=f"C{k}", label=label)
                tol = max(stats.rank_tol, floor)
                ax.plot([1, n], [tol, tol], color=f"C{k}", lw=0.6, ls=":")
            ax.set_xlim(0.5, n + 0.5)
            ax.set_ylim(10.0**lo, 10.0**hi)
            ax.set_gid(f"{name}:{i}:{j}")
            _label(ax, i, j)
            if j == 0:
                ax.set_yticks(ticks, [f"1e{round(math.log10(t))}" for t in ticks])
                ax.tick_params(axis="y", labelsize=5, length=2, pad=1)
                ax.minorticks_off()
    if len(series) > 1:
        axes[0][0].legend(fontsize=5, loc="upper right")
    sub.suptitle(title, fontsize=9)


def _grids_of(fig: Any) -> dict[str, tuple[int, int]]:
    """Rows x columns of panels per block, read back from the axes' ids."""
    cells: dict[str, set[tuple[int, int]]] = {}
    for ax in _all_axes(fig):
        gid = ax.get_gid()
        if gid and gid.count(":") == 2:
            name, i, j = gid.split(":")
            cells.setdefault(name, set()).add((int(i), int(j)))
    grids = {}
    for name, c in cells.items():
        rows = len({i for i, _ in c})
        cols = len({j for _, j in c})
        grids[name] = (rows, cols)
    return grids


def _all_axes(fig: Any) -> list[Any]:
    axes = list(fig.axes)
    for sub in getattr(fig, "subfigs", []):
        axes.extend(_all_axes(sub))
    return axes


def _save(fig: Any, path: str | os.PathLike[str], dpi: int, keep_figure: bool) -> PlotSummary:
    out = Path(path)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    width, height = (int(round(v)) for v in fig.get_size_inches() * dpi)
    return PlotSummary(
        path=out,
        width=width,
        height=height,
        grids=_grids_of(fig),
        figure=fig if keep_figure else None,
    )


def plot_deductive(
    path: str | os.PathLike[str],
    tensors: Any,
    report: DeductiveReport | None = None,
    names: Sequence[str] | None = None,
    batch_index: int = 0,
    title: str | None = None,
    dpi: int = 100,
    keep_figure: bool = False,
) -> PlotSummary:
    """Draw heatmaps of each deductive tensor (a layers x heads grid per tensor) and the
    singular-value spectra (another layers x heads grid, dotted line = rank tolerance) to a PNG.

    ``tensors`` is anything :func:`layer_tensors` accepts (a G file path, G list, model
    ``output.deductive``...). Each heatmap is scaled to its own max |value| with a diverging
    colormap (red > 0 > blue). ``report`` supplies the spectra (computed here otherwise, for
    G_LM). Returns a :class:`PlotSummary`; with ``keep_figure`` it holds the matplotlib Figure.
    """
    layers = layer_tensors(tensors)
    chosen = [n for n in DEDUCTIVE_NAMES if all(n in x for x in layers)]
    if names is not None:
        chosen = [n for n in chosen if n in names]
    if not chosen:
        raise PLDRError("nothing to plot: no deductive tensor is present in every layer")
    if report is None:
        report = _analyze_layers(
            layers, "G_LM" if "G_LM" in chosen else chosen[0], (), None, batch_index, None
        )
    mats = {n: [head_matrices(x[n], batch_index) for x in layers] for n in chosen}
    rows, cols = len(layers), mats[chosen[0]][0].shape[0]
    p = _panel_inches(cols)
    block_h = rows * p + 0.45
    fig = _figure(cols * p + 0.6, block_h * (len(chosen) + 1), dpi)
    subs = fig.subfigures(len(chosen) + 1, 1, squeeze=False)[:, 0]
    for index, (sub, name) in enumerate(zip(subs, chosen, strict=False)):
        heading = f"{name} (layers x heads; each panel scaled to its max |value|)"
        if title and index == 0:  # one heading line per block: a figure title would overlap it
            heading = f"{title} - {heading}"
        _heatmap_block(sub, name, mats[name], heading)
    _spectra_block(
        subs[-1],
        "spectra",
        [(report.tensor, report.layers)],
        f"singular values of {report.tensor} (log scale; dotted: rank tolerance)",
    )
    return _save(fig, path, dpi, keep_figure)


def plot_compare(
    path: str | os.PathLike[str],
    a: Any,
    b: Any,
    labels: tuple[str, str] = ("A", "B"),
    tensor: str = "G_LM",
    report_a: DeductiveReport | None = None,
    report_b: DeductiveReport | None = None,
    batch_index: int = 0,
    dpi: int = 100,
    keep_figure: bool = False,
) -> PlotSummary:
    """Draw ``tensor`` of ``a`` minus that of ``b`` as heatmaps (layers x heads) and both
    singular-value spectra overlaid in each panel."""
    la, lb = layer_tensors(a), layer_tensors(b)
    if len(la) != len(lb):
        raise PLDRError(f"cannot compare {len(la)} layers with {len(lb)} layers")
    if any(tensor not in x for x in la + lb):
        raise PLDRError(f"'{tensor}' is not present in both")
    diff = []
    for x, y in zip(la, lb, strict=True):
        hx, hy = head_matrices(x[tensor], batch_index), head_matrices(y[tensor], batch_index)
        if hx.shape != hy.shape:
            raise PLDRError(
                f"cannot compare {tensor} of shapes {list(hx.shape)} and {list(hy.shape)}"
            )
        diff.append(hx.to(torch.float64) - hy.to(torch.float64))
    ra = report_a or _analyze_layers(la, tensor, (), None, batch_index, None)
    rb = report_b or _analyze_layers(lb, tensor, (), None, batch_index, None)
    rows, cols = len(diff), diff[0].shape[0]
    p = _panel_inches(cols)
    fig = _figure(cols * p + 0.6, (rows * p + 0.45) * 2, dpi)
    subs = fig.subfigures(2, 1, squeeze=False)[:, 0]
    _heatmap_block(
        subs[0], "difference", diff, f"{tensor}: {labels[0]} - {labels[1]} (each panel scaled)"
    )
    _spectra_block(
        subs[1],
        "spectra",
        [(labels[0], ra.layers), (labels[1], rb.layers)],
        f"singular values of {tensor}: {labels[0]} (C0) vs {labels[1]} (C1)",
    )
    return _save(fig, path, dpi, keep_figure)

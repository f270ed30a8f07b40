"""Float64 figures of deductive outputs: spectra, ranks, determinants, RMSE, reports.

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
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pldr_llm.core.cache import g_entries
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import atomic_write_text
from pldr_llm.gfile import load_g_file

#: The deductive tensors, in the order reports and plots list them.
DEDUCTIVE_NAMES = ("A", "A_LM", "A_P", "G_LM")

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
    """Figures of one ``m x n`` matrix (the module docstring states the rank rule)."""
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
                {
                    k: t
                    for k, v in item.items()
                    if k in DEDUCTIVE_NAMES and (t := _detach(v)) is not None
                }
            )
        return layers
    if all(hasattr(x, "G_LM") for x in obj):
        for item in obj:
            d: LayerTensors = {}
            for name in DEDUCTIVE_NAMES:
                t = _detach(getattr(item, name, None))
                if t is not None:
                    d[name] = t
            layers.append(d)
        return layers
    for e in g_entries(obj):
        pair = {"A_LM": _detach(e.A_LM), "G_LM": _detach(e.G_LM)}
        layers.append({k: v for k, v in pair.items() if v is not None})
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
            atomic_write_text(path, text + "\n")
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

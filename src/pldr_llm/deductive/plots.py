"""PNG heatmaps (layers x heads grids) and singular-value spectra of deductive outputs.

matplotlib is optional; nothing global such as the pyplot backend is changed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import atomic_path
from pldr_llm.deductive.stats import (
    DEDUCTIVE_NAMES,
    DeductiveReport,
    HeadStats,
    _analyze_layers,
    head_matrices,
    layer_tensors,
)


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
    with atomic_path(out) as tmp:  # a failed write keeps the previous image (see fileio)
        fig.savefig(tmp, dpi=dpi, format="png")
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


def plot_leak(
    path: str | os.PathLike[str],
    audit: Any,
    title: str | None = None,
    dpi: int = 100,
    keep_figure: bool = False,
) -> PlotSummary:
    """Draw a :class:`~pldr_llm.deductive.leak.LeakAudit`'s loss by position (as trained, causal,
    generation-time) and, below, causal minus as trained per position."""
    full = np.asarray(audit.loss_full)
    causal = np.asarray(audit.loss_causal)
    gen = np.asarray(audit.loss_generation)
    x = np.arange(1, len(full) + 1)  # position of the predicted token
    fig = _figure(9.0, 5.5, dpi)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.plot(x, full, lw=0.8, color="C0", label=f"as trained ({full.mean():.3f})")
    top.plot(x, causal, lw=0.8, color="C1", label=f"causal ({causal.mean():.3f})")
    gx = np.arange(audit.prompt_len, audit.prompt_len + len(gen))
    top.plot(gx, gen, lw=0.8, color="C2", label=f"generation, prompt {audit.prompt_len}")
    top.axvline(audit.prompt_len - 0.5, color="0.5", lw=0.6, ls=":")
    top.set_ylabel("next-token loss (nats)")
    top.legend(fontsize=7, loc="upper right")
    top.set_gid("loss:0:0")
    bottom.plot(x, causal - full, lw=0.8, color="C3")
    bottom.axhline(0.0, color="0.5", lw=0.6)
    bottom.set_ylabel("causal - trained")
    bottom.set_xlabel("position of the predicted token")
    bottom.set_gid("loss:1:0")
    fig.suptitle(title or "causal-leak audit: loss by position", fontsize=9)
    return _save(fig, path, dpi, keep_figure)

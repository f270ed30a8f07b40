"""Deductive outputs as data: spectra, ranks, determinants, cache invariance, heatmaps, leaks.

A PLDR-LLM exposes, per decoder layer and head, four ``dk x dk`` tensors: the metric tensor ``A``,
``A_LM``, the potential tensor ``A_P`` and the energy-curvature tensor ``G_LM`` (see
:mod:`pldr_llm.core.plga`). This package turns them into figures a notebook or the
``pldr-llm inspect`` / ``pldr-llm compare`` commands can use:

* :mod:`~pldr_llm.deductive.stats` -- :func:`matrix_stats` / :func:`analyze_g_list` /
  :func:`analyze_deductive`: per head singular values (descending), numerical rank, ``log|det|``
  with its sign, RMS -- all in float64; :func:`compare`: per layer/head RMSE between two sets of
  deductive outputs (G files, G-caches, model outputs).
* :mod:`~pldr_llm.deductive.runs` -- :func:`cache_mode_runs` / :func:`cache_invariance`: run a
  model with and without KV-/G-cache on one continuation and measure how far the deductive
  outputs of each step move; :func:`inspect_model`: all of the above for a model and prompts.
* :mod:`~pldr_llm.deductive.plots` -- :func:`plot_deductive` / :func:`plot_compare`: PNG
  heatmaps (layers x heads grids) and singular-value spectra, with matplotlib (optional).
* :mod:`~pldr_llm.deductive.leak` -- :func:`leak_audit`: how much a model's teacher-forced loss
  depends on the metric tensor seeing future tokens (see docs/deductive.md).

The rank rule is described in :mod:`pldr_llm.deductive.stats` and stated in every report.
"""

from pldr_llm.deductive.leak import LayerLeak, LeakAudit, leak_audit
from pldr_llm.deductive.plots import PlotSummary, plot_compare, plot_deductive, plot_leak
from pldr_llm.deductive.runs import (
    CACHE_MODES,
    CacheRuns,
    InspectResult,
    cache_invariance,
    cache_mode_runs,
    compare_across_prompts,
    deductive_outputs,
    inspect_model,
)
from pldr_llm.deductive.stats import (
    DEDUCTIVE_NAMES,
    DeductiveReport,
    HeadStats,
    analyze_deductive,
    analyze_g_list,
    compare,
    head_matrices,
    layer_tensors,
    matrix_stats,
    rank_rule,
)

__all__ = [
    "CACHE_MODES",
    "DEDUCTIVE_NAMES",
    "CacheRuns",
    "DeductiveReport",
    "HeadStats",
    "InspectResult",
    "LayerLeak",
    "LeakAudit",
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
    "leak_audit",
    "matrix_stats",
    "plot_compare",
    "plot_deductive",
    "plot_leak",
    "rank_rule",
]

"""A training run's curves as a PNG: what ``pldr-llm plot RUN_DIR`` draws.

Reads ``RUN_DIR/metrics.jsonl`` (written by ``pldr-llm train``) and draws three panels: training
loss (per step and its running mean) with validation loss, accuracy, and the learning rate (and the
DAG losses when the run used them). Needs matplotlib (``pip install 'pldr-llm[plot]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pldr_llm.core.errors import PLDRError


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for value in values:
        queue.append(value)
        total += value
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, smooth: int = 0) -> Path:
    """Draw the curves of ``run_dir`` to ``out`` (default ``run_dir/curves.png``); returns it."""
    from pldr_llm.train.metrics import read_metrics

    if smooth < 0:
        raise PLDRError(f"smooth must be 0 (off) or a number of steps, got {smooth}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PLDRError(f"run folder not found: {run_dir}")
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r and r.get("event") is None]
    vals = [r for r in records if r.get("event") == "val"]
    if not steps:
        raise PLDRError(
            f"{run_dir}/metrics.jsonl holds no complete training step (a line cut short by a "
            "kill is skipped): train for at least one logged step"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PLDRError("plotting needs matplotlib: pip install 'pldr-llm[plot]'") from None

    def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for row in rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs.append(int(row["step"]))
                ys.append(float(value))
        return xs, ys

    has_dag = any("dag_A" in r for r in steps)
    panels = 4 if has_dag else 3
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), sharex=True)

    def metric_panel(ax: Any, key: str, global_mean: bool) -> None:
        """Train ``key`` (raw and its moving mean), its global mean, and its validation figure."""
        x, y = series(steps, key)
        ax.plot(x, y, lw=0.8, alpha=0.6, label=f"train {key}")
        if smooth and smooth > 1:
            ax.plot(
                x, _moving_average(y, smooth), lw=1.5, label=f"train {key} ({smooth}-step mean)"
            )
        gx, gy = series(steps, f"{key}_global") if global_mean else ([], [])
        if gx:
            ax.plot(gx, gy, lw=1.2, ls="--", label="global mean")
        vx, vy = series(vals, f"val_{key}")
        if vx:
            ax.plot(vx, vy, "o-", lw=1.5, label=f"validation {key}")
        ax.set_ylabel(key)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    metric_panel(axes[0], "loss", global_mean=True)
    metric_panel(axes[1], "accuracy", global_mean=False)

    ax = axes[2]
    x, y = series(steps, "lr")
    ax.plot(x, y, lw=1.2)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)

    if has_dag:
        ax = axes[3]
        for key in ("dag_A", "dag_A_P", "dag_G"):
            x, y = series(steps, key)
            ax.plot(x, y, lw=1.0, label=key)
        ax.set_ylabel("DAG loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(str(run_dir.resolve().name))
    fig.tight_layout()
    target = Path(out) if out is not None else run_dir / "curves.png"
    from pldr_llm.core.fileio import atomic_path

    with atomic_path(target) as tmp:  # a full disk leaves the previous plot intact
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return target

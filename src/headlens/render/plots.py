"""Figures of intervention, comparison and distance results (matplotlib), for the report, the CLI and papers.

Each function takes a result table and returns a matplotlib figure; none runs a model.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure  # a plain Figure: no pyplot state, the user's backend untouched
from matplotlib.ticker import FuncFormatter

from headlens.errors import HeadlensError
from headlens.heads import head_name
from headlens.interventions.ablation import SweepResult
from headlens.interventions.prune import PruneResult
from headlens.io import save_figure
from headlens.render.viz import head_heatmaps


def plot_sweep(sweep: SweepResult, path: str | Path | None = None, *, title: str | None = None):
    """Layer × head (or kv group) heatmap of the relative worsening (%) of an ablation sweep; PNG if ``path``."""
    table = sweep.table
    percent = table.assign(**{"worsening (%)": 100 * table["worsening"]})
    title = title or f"{sweep.method} ablation: {sweep.metric} change (%)"
    fig = head_heatmaps(percent, "worsening (%)", by=[], center=0.0, ncols=1, title=title)
    if path is not None:
        save_figure(fig, path, dpi=110)
    return fig


def plot_comparison(df: pd.DataFrame, *, columns=("jsd", "dW_Q", "dW_K", "dW_V", "dW_O")):
    """Layer x head heatmaps of the attention change (bits) and of each weight change (relative), side by side."""
    columns = [c for c in columns if c in df.columns]
    named = df.rename(columns={c: c + (" (bits)" if c.startswith("jsd") else " (relative)") for c in columns})
    values = [c + (" (bits)" if c.startswith("jsd") else " (relative)") for c in columns]
    return head_heatmaps(named, values, by=[], center=None, ncols=len(values), scale="data")


def plot_distance_heatmap(
    profile: pd.DataFrame,
    *,
    probe: str | None = None,
    value: str = "attention",
    max_distance: int = 32,
    log: bool = True,
):
    """Heatmap of ``value`` (attention or lift) with one row per head (``L5H3``) and one column per distance."""
    df = _select_probe(profile, probe)
    df = df[df["distance"] <= max_distance]
    table = df.pivot_table(index=["layer", "head"], columns="distance", values=value)
    n_rows = len(table)
    fig, ax = plt.subplots(figsize=(min(3 + 0.25 * table.shape[1], 14), min(2 + 0.12 * n_rows, 40)))
    data = table.to_numpy()
    norm = (
        LogNorm(vmin=max(np.nanmin(data[data > 0]) if (data > 0).any() else 1e-6, 1e-6), vmax=np.nanmax(data))
        if log
        else None
    )
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    ax.set_xlabel("relative distance q - k")
    ax.set_ylabel("head")
    step = max(1, n_rows // 40)
    ax.set_yticks(range(0, n_rows, step))
    ax.set_yticklabels([head_name(l, h) for l, h in table.index][::step], fontsize=6)
    ax.set_title(f"{value} by distance" + (f" ({probe})" if probe else ""))
    fig.colorbar(im, ax=ax, label=value)
    fig.tight_layout()
    return fig


def plot_distance_curves(
    profile: pd.DataFrame, heads, *, value: str = "attention", max_distance: int = 32, log: bool = True
):
    """One panel per head in ``heads`` ([(layer, head), ...]): ``value`` against distance, one line per probe."""
    heads = list(heads)
    if not heads:
        raise HeadlensError("plot_distance_curves needs at least one (layer, head)")
    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    probes = profile["probe"].unique() if "probe" in profile.columns else [None]
    for ax, (layer, head) in zip(axes.flat, heads):
        for p in probes:
            g = profile[(profile["layer"] == layer) & (profile["head"] == head) & (profile["distance"] <= max_distance)]
            if p is not None:
                g = g[g["probe"] == p]
            if g.empty:
                raise HeadlensError(f"head ({layer}, {head}) is not in the profile")
            ax.plot(g["distance"], g[value], marker=".", label=p or value)
        ax.set_title(head_name(layer, head), fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("distance")
    for ax in list(axes.flat)[len(heads) :]:
        ax.axis("off")
    axes[0][0].set_ylabel(value)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _select_probe(profile: pd.DataFrame, probe: str | None) -> pd.DataFrame:
    if "probe" not in profile.columns:
        return profile
    probes = list(profile["probe"].unique())
    if probe is None:
        if len(probes) > 1:
            raise HeadlensError(f"the profile holds several probes ({', '.join(probes)}); pass probe=...")
        return profile
    if probe not in probes:
        raise HeadlensError(f"probe {probe!r} is not in the profile (it has {', '.join(probes)})")
    return profile[profile["probe"] == probe]


def plot_prune_curve(result: PruneResult, path: str | Path | None = None, *, title: str | None = None):
    """Relative worsening vs fraction removed, tolerance line and the largest removable fraction; PNG if ``path``."""
    curve = result.curve.sort_values("n_removed")
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    grid = curve[~curve.refined]
    ax.plot(grid.fraction_removed, 100 * grid.worsening, "o-", ms=3, label=f"{result.metric} (grid)")
    ref = curve[curve.refined]
    if len(ref):
        ax.plot(ref.fraction_removed, 100 * ref.worsening, "x", color="C2", label="bisection")
    ax.axhline(100 * result.tolerance, color="C3", ls="--", lw=1, label=f"tolerance {result.tolerance:.1%}")
    ax.axvline(result.max_fraction, color="C1", ls=":", lw=1, label=f"max removable {result.max_fraction:.1%}")
    ax.set_yscale("symlog", linthresh=max(100 * result.tolerance, 1e-3))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g}%" if v else "0%"))  # not "-10^0"
    ax.set_xlabel("fraction of attention heads removed")
    ax.set_ylabel("relative worsening of metric (%)")
    ax.set_title(
        title
        or f"greedy head pruning ({result.settings.get('order', '')}, {result.settings.get('method', '')} ablation)"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi=110)
    return fig

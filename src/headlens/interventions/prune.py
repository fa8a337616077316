"""Greedy head pruning: remove the least important heads first and trace the metric as heads go.

Order: ``order="gradient"`` ranks the remaining heads by Michel et al.'s gate-gradient importance
(:func:`headlens.interventions.ablation.head_importance`); with ``reestimate=True`` (default) the importance is
re-computed at every grid point with the already-removed heads ablated (their gates at 0), as
Michel et al. do when pruning iteratively; with ``reestimate=False`` one ranking from the full model
is used throughout. ``order="ablation"`` ranks by the exact single-head ablation effect
(:func:`headlens.interventions.ablation.ablation_sweep`, computed once on the full model). Least important =
smallest importance (gradient) or least harmful effect (ablation; heads whose removal helps go first).

"Removed" means ablated with ``method`` (zero by default, as in Michel et al.). The metric is
measured with every removed head ablated at once. The largest removable fraction is the largest
evaluated fraction whose relative worsening is within ``tolerance``; with ``refine=True`` the gap
between that grid point and the next is bisected (in the greedy order) to the exact head count.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import HeadLike, format_heads, head_name, kv_heads
from headlens.interventions.ablation import (
    Head,
    Method,
    Metric,
    MetricFn,
    _as_metric,
    ablated_metric,
    ablation_sweep,
    clean_metric,
    head_importance,
)
from headlens.progress import tqdm


@dataclass
class PruneResult:
    """``curve``: metric vs heads removed; ``order``: heads in removal order (last rows = last to go)."""

    curve: pd.DataFrame
    order: pd.DataFrame
    clean: float
    tolerance: float
    max_removed: int
    n_heads: int
    metric: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def max_fraction(self) -> float:
        """Largest fraction of heads removed with the metric within tolerance."""
        return self.max_removed / self.n_heads

    def last_heads(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` heads pruned last (most important), last first."""
        return self.order.tail(n).iloc[::-1].reset_index(drop=True)

    def summary(self) -> str:
        last = ", ".join(head_name(r.layer, r.head) for r in self.last_heads(5).itertuples())
        return (
            f"{self.metric}: clean {self.clean:.4f}; {self.max_removed}/{self.n_heads} heads "
            f"({self.max_fraction:.1%}) removable within {self.tolerance:.1%}; last to go: {last}"
        )


def _ranking(
    model: HookedTransformer, metric: Metric, removed: list[HeadLike], *, order: str, method: str, reference, seed: int
) -> list[tuple[Head, float]]:
    gone = set(removed)
    if order == "gradient":
        table = head_importance(model, metric, method=method, reference=reference, ablated=removed, seed=seed).table
        score = table.importance
    else:
        table = ablation_sweep(model, metric, method=method, reference=reference, seed=seed, progress=False).table
        score = table.worsening
    ranked = sorted(((int(r.layer), int(r.head)), float(s)) for r, s in zip(table.itertuples(), score))
    ranked = [(h, s) for h, s in ranked if h not in gone]
    return sorted(ranked, key=lambda hs: (hs[1], hs[0]))


def prune_curve(
    model: HookedTransformer,
    metric: Metric | MetricFn,
    *,
    tokens: Tensor | None = None,
    tolerance: float = 0.01,
    steps: int = 20,
    order: Literal["gradient", "ablation"] = "gradient",
    reestimate: bool = True,
    method: Method = "zero",
    reference: Tensor | None = None,
    refine: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> PruneResult:
    """Remove heads greedily, least important first, in ``steps`` equal grid steps from 0 to all heads (at most one
    step per head: ``steps`` above the model's head count gives one head per step).

    Returns a :class:`PruneResult`: ``curve`` (n_removed, fraction_removed, metric, change, worsening,
    within_tolerance, refined, removed), ``order`` (rank, layer, head, kv_head, score, step) and
    ``max_removed`` / ``max_fraction`` (largest count within ``tolerance`` relative worsening).
    """
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    metric = _as_metric(model, metric, tokens)
    if order not in ("gradient", "ablation"):
        raise HeadlensError(f"unknown pruning order {order!r}: use 'gradient' or 'ablation'")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < math.inf:
        raise HeadlensError(f"tolerance must be a finite number >= 0, e.g. 0.01 for a 1% worsening (got {tolerance!r})")
    steps = check_count("steps", steps)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    N = L * H
    counts = sorted(set(np.round(np.linspace(0, N, steps + 1)).astype(int).tolist()))
    kv = kv_heads(model)
    clean = clean_metric(model, metric)

    def measure(heads: list[HeadLike]) -> float:
        if not heads:
            return clean
        return ablated_metric(model, metric, heads, method=method, reference=reference, seed=seed)

    removed: list[HeadLike] = []
    ranked: list[tuple[Head, float]] = []
    order_rows, rows = [], []
    rows.append(_row(0, N, clean, clean, metric, tolerance, False, []))
    pending: dict[int, list[tuple[Head, float]]] = {}
    for step, count in enumerate(tqdm(counts[1:], desc="pruning", disable=not progress, leave=False), start=1):
        if not ranked or reestimate:
            ranked = _ranking(model, metric, removed, order=order, method=method, reference=reference, seed=seed)
        take, ranked = ranked[: count - len(removed)], ranked[count - len(removed) :]
        pending[count] = take
        for head, score in take:
            order_rows.append(
                {
                    "rank": len(order_rows),
                    "layer": head[0],
                    "head": head[1],
                    "kv_head": kv[head[1]],
                    "score": score,
                    "step": step,
                }
            )
        removed += [h for h, _ in take]
        value = measure(removed)
        rows.append(_row(count, N, value, clean, metric, tolerance, False, [h for h, _ in take]))
    curve = pd.DataFrame(rows)

    # the largest count before the curve FIRST leaves the tolerance: every smaller grid count is within it too,
    # so "k heads removable" never contradicts a worse point earlier on the curve (the curve need not be monotone)
    over = curve.n_removed[~curve.within_tolerance]
    first_over = int(over.min()) if len(over) else N + 1
    best = int(curve.n_removed[curve.within_tolerance & (curve.n_removed < first_over)].max())
    if refine and best < N:
        nxt = min(c for c in counts if c > best)
        prefix = [h for h, _ in _order_list(order_rows)[:best]]
        extra = [h for h, _ in pending[nxt]]
        lo, hi = 0, len(extra)  # lo: known within tolerance, hi: known outside
        refined_rows = []
        while hi - lo > 1:
            mid = (lo + hi) // 2
            value = measure(prefix + extra[:mid])
            row = _row(best + mid, N, value, clean, metric, tolerance, True, extra[:mid])
            refined_rows.append(row)
            lo, hi = (mid, hi) if row["within_tolerance"] else (lo, mid)
        best += lo
        if refined_rows:
            curve = (
                pd.concat([curve, pd.DataFrame(refined_rows)])
                .sort_values(["n_removed", "refined"])
                .reset_index(drop=True)
            )
    settings = dict(order=order, reestimate=reestimate, method=method, steps=steps, seed=seed)
    return PruneResult(
        curve=curve,
        order=pd.DataFrame(order_rows),
        clean=clean,
        tolerance=tolerance,
        max_removed=best,
        n_heads=N,
        metric=metric.name,
        settings=settings,
    )


def _order_list(order_rows: list[dict]) -> list[tuple[Head, float]]:
    return [((r["layer"], r["head"]), r["score"]) for r in order_rows]


def _row(
    count: int,
    n: int,
    value: float,
    clean: float,
    metric: Metric,
    tolerance: float,
    refined: bool,
    heads: list[HeadLike],
) -> dict:
    worse = metric.worsening(value, clean)
    return {
        "n_removed": count,
        "fraction_removed": count / n,
        "metric": value,
        "change": value - clean,
        "worsening": worse,
        "within_tolerance": bool(worse <= tolerance),
        "refined": refined,
        "removed": format_heads(heads),
    }

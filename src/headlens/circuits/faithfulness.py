"""Circuits and their faithfulness, as MIB's circuit track scores them (Mueller et al. 2025, "MIB: a mechanistic
interpretability benchmark").

A circuit is the top ``k`` edges of a ranking (by |score|, or with ``signed=True`` most negative score first: the
edges whose ablation lowers the metric most; no pruning of dangling edges), or the edges among the top
``k`` nodes. Everything outside it is corrupted (:mod:`headlens.circuits.paths`): with ``ablation="mean"`` (default)
each left-out edge carries its sender's mean output over a separate set of prompts of the same task; with
``"resample"`` its output on the corrupted prompt. Faithfulness is

    f(C) = (m(C) − m(∅)) / (m(full) − m(∅))

with ``m(full)`` the clean model's metric and ``m(∅)`` the metric with every edge corrupted. Over the grid
``k ∈ {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100} %`` of edges (``int(k · n_edges)`` edges, as MIB counts), the
circuit performance ratio CPR is the area under f against the fraction of edges kept (trapezoids, linear axis from
0.1 % to 100 %; higher is better) and the circuit-model distance CMD the area under |1 − f| (lower is better). On a
linear axis the 50–100 % interval weighs half of either area, so the smallest k reaching f ≥ 0.8 is reported too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.circuits.graph import EMBED, LOGITS, Graph
from headlens.circuits.paths import mask_run, prepare_pair, run_edges, split_inputs
from headlens.errors import HeadlensError, check_count, check_model

PERCENTS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
"""MIB's grid of circuit sizes, in percent of the graph's edges."""
TARGET = 0.8


def n_kept(percent: float, n_edges: int) -> int:
    """Edges in a circuit of ``percent`` % of ``n_edges`` (MIB: ``int(fraction * n_edges)``)."""
    return int(percent / 100 * n_edges)


def ranking(
    graph: Graph, scores: Float[Tensor, "sender slot"], *, signed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(sender, slot) indices of every edge, largest |score| first, or with ``signed`` most negative score first (the
    edges whose ablation lowers the metric most: those that carry the behaviour); stable: ties keep the graph's order."""
    s, r = graph.edge_index()
    values = graph.check_scores(scores)[torch.as_tensor(s), torch.as_tensor(r)].double()
    key = (-values if signed else values.abs()).numpy()
    order = np.argsort(-key, kind="stable")
    return s[order], r[order]


def top_edges(
    graph: Graph, scores: Float[Tensor, "sender slot"], n: int, *, signed: bool = False
) -> Bool[Tensor, "sender slot"]:
    """The circuit of the top ``n`` edges of :func:`ranking`, as a ``[sender, slot]`` mask."""
    n = check_count("n", n, minimum=0, why="edges to keep")
    s, r = ranking(graph, scores, signed=signed)
    mask = torch.zeros(graph.n_senders, graph.n_slots, dtype=torch.bool)
    mask[torch.as_tensor(s[:n]), torch.as_tensor(r[:n])] = True
    return mask


def node_circuit(graph: Graph, nodes: Sequence[str]) -> Bool[Tensor, "sender slot"]:
    """The edges among ``nodes`` (plus ``embed`` and ``logits``, always in): sender in the set, receiver in the set."""
    keep = set(nodes) | {EMBED, LOGITS}
    unknown = sorted(set(nodes) - set(graph.senders) - {LOGITS})
    if unknown:
        raise HeadlensError(f"not nodes of this graph: {', '.join(unknown)}")
    sender_in = torch.tensor([n in keep for n in graph.senders])
    slot_in = torch.tensor([slot.node in keep for slot in graph.slots])
    return graph.valid & sender_in[:, None] & slot_in[None, :]


def exact_key(
    primary: Float[Tensor, "sender slot"],
    exact: Float[Tensor, "sender slot"],
    checked: Bool[Tensor, "sender slot"],
    *,
    signed: bool = False,
) -> Float[Tensor, "sender slot"]:
    """Scores that :func:`ranking` orders with the exactly checked edges first (by their exact score), then the rest
    by ``primary``."""
    if not signed:
        return torch.where(checked, primary.abs().max() + 1.0 + exact.abs(), primary.abs())
    top = primary.abs().max() + exact.abs().max() + 1.0
    return torch.where(checked, exact - top, primary)


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` against ``fractions`` (linear axis)."""
    x, y = np.asarray(fractions, dtype=float), np.asarray(values, dtype=float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


@dataclass
class FaithfulnessResult:
    """What :func:`faithfulness` returns.

    - ``table``: one row per method and k: ``method, k`` (percent), ``fraction`` (edges kept / all), ``n_edges, metric,
      faithfulness``;
    - ``full``, ``empty``: m(full model), m(∅: every edge ablated); ``n_edges_total``; ``ablation``; ``signed``;
    - ``summary``: per method ``cpr``, ``cmd``, ``k_at_target`` and ``n_edges_at_target`` (the smallest k with
      faithfulness >= ``target``, or None).
    """

    table: pd.DataFrame
    full: float
    empty: float
    n_edges_total: int
    ablation: str
    summary: dict
    target: float
    signed: bool


def faithfulness(
    model: HookedTransformer,
    task,
    rankings: dict[str, Float[Tensor, "sender slot"]],
    *,
    ablation: str = "mean",
    percents: Sequence[float] = PERCENTS,
    signed: bool = False,
    runs_per_pass: int = 4,
    progress: bool = True,
) -> FaithfulnessResult:
    """The faithfulness curve of each ranking (a ``[sender, slot]`` score matrix, e.g. EAP, EAP-IG, exact).

    ``task``: a :class:`headlens.circuits.tasks.CircuitTask` (its ``mean_tokens`` for mean ablation); see
    :class:`FaithfulnessResult` for what comes back.
    """
    check_model(model)
    if not rankings:
        raise HeadlensError("give at least one ranking (method -> [sender, slot] scores)")
    graph = Graph.of(model)
    pair = task.pair
    total = graph.n_edges
    grid = [float(p) for p in percents]
    if not grid or any(not 0 < p <= 100 for p in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
        raise HeadlensError(f"percents must increase within (0, 100], got {list(percents)}")
    with split_inputs(model):
        setting = prepare_pair(model, pair, mean_tokens=task.mean_tokens, ablation=ablation, graph=graph)
        valid = graph.valid
        runs, keys = [mask_run(valid)], [("empty", 0.0)]
        for method, scores in rankings.items():
            s, r = ranking(graph, scores, signed=signed)
            for p in grid:
                n = n_kept(p, total)
                kept = torch.zeros_like(valid)
                kept[torch.as_tensor(s[:n]), torch.as_tensor(r[:n])] = True
                runs.append(mask_run(valid & ~kept))
                keys.append((method, p))
        values = run_edges(model, setting, runs, runs_per_pass=runs_per_pass, progress=progress, desc="faithfulness")
    full, empty = setting.clean.metric, values[0]
    if abs(full - empty) < 1e-6 * max(1.0, abs(full)):
        raise HeadlensError(
            f"the full model and the fully ablated one give the same metric ({full:.6g}): faithfulness is undefined"
        )
    rows = []
    for (method, p), v in zip(keys[1:], values[1:]):
        n = n_kept(p, total)
        rows.append((method, p, n / total, n, v, (v - empty) / (full - empty)))
    df = pd.DataFrame(rows, columns=["method", "k", "fraction", "n_edges", "metric", "faithfulness"])
    summary = {}
    for method, part in df.groupby("method", sort=False):
        hit = part[part.faithfulness >= TARGET]
        summary[method] = {
            "cpr": area(part.fraction, part.faithfulness),
            "cmd": area(part.fraction, (1 - part.faithfulness).abs()),
            "k_at_target": None if hit.empty else float(hit.k.iloc[0]),
            "n_edges_at_target": None if hit.empty else int(hit.n_edges.iloc[0]),
        }
    return FaithfulnessResult(df, full, empty, total, ablation, summary, TARGET, signed)


def circuit_metric(
    model: HookedTransformer, task, kept: Bool[Tensor, "sender slot"], *, ablation: str = "mean"
) -> dict[str, float]:
    """``metric``, ``full``, ``empty`` and ``faithfulness`` of one circuit (a mask of kept edges)."""
    graph = Graph.of(model)
    if not isinstance(kept, Tensor) or kept.dtype != torch.bool:
        raise HeadlensError(f"kept must be a boolean [sender, slot] mask (top_edges, node_circuit), got {kept!r:.80}")
    graph.check_scores(kept, "kept")
    pair = task.pair
    with split_inputs(model):
        setting = prepare_pair(model, pair, mean_tokens=task.mean_tokens, ablation=ablation, graph=graph)
        empty, value = run_edges(
            model,
            setting,
            [mask_run(graph.valid), mask_run(graph.valid & ~kept.bool())],
            runs_per_pass=1,
            progress=False,
        )
    full = setting.clean.metric
    return {"metric": value, "full": full, "empty": empty, "faithfulness": (value - empty) / (full - empty)}


def smallest_circuit(
    model: HookedTransformer,
    task,
    scores: Float[Tensor, "sender slot"],
    low: int,
    high: int,
    *,
    ablation: str = "mean",
    signed: bool = False,
    target: float = TARGET,
) -> dict:
    """Bisection between ``low`` edges (faithfulness below ``target``) and ``high`` (at or above) for the smallest top-n
    circuit of ``scores`` reaching ``target``; assumes f rises with n between the two (it need not: each probe is
    measured, and the result is a circuit that does reach the target). Returns ``n``, ``faithfulness``, ``probes``."""
    graph = Graph.of(model)
    low = check_count("low", low, minimum=0, why="edges of a circuit below the target")
    high = check_count("high", high, why="edges of a circuit at or above the target")
    if not low < high <= graph.n_edges:
        raise HeadlensError(f"need low < high <= {graph.n_edges} (the graph's edges), got low={low}, high={high}")
    s, r = ranking(graph, scores, signed=signed)
    pair = task.pair
    probes = []
    with split_inputs(model):
        setting = prepare_pair(model, pair, mean_tokens=task.mean_tokens, ablation=ablation, graph=graph)
        empty = run_edges(model, setting, [mask_run(graph.valid)], progress=False)[0]
        full = setting.clean.metric

        def f(n: int) -> float:
            kept = torch.zeros_like(graph.valid)
            kept[torch.as_tensor(s[:n]), torch.as_tensor(r[:n])] = True
            value = run_edges(model, setting, [mask_run(graph.valid & ~kept)], progress=False)[0]
            out = (value - empty) / (full - empty)
            probes.append((n, out))
            return out

        best = (high, f(high))
        while high - low > max(1, low // 20):
            mid = (low + high) // 2
            value = f(mid)
            if value >= target:
                high, best = mid, (mid, value)
            else:
                low = mid
    return {"n": best[0], "faithfulness": best[1], "probes": probes, "full": full, "empty": empty}

"""One call from a task to a circuit: edge attribution (EAP, EAP-IG), an exact path-patching check of the top edges,
faithfulness curves for every ranking, the circuit, and edge/node tables that carry census labels.

The exact check runs on :mod:`headlens.engine.executor` (locally, or on Ray workers with one model copy each): one shard per
receiver layer, each re-recording the clean and corrupted runs (cheap next to the patched runs), results in shard
order, so the table is the same wherever it ran.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.circuits.edges import IG_STEPS, METHODS, edge_attribution
from headlens.circuits.faithfulness import PERCENTS, FaithfulnessResult, exact_key, faithfulness, n_kept, ranking
from headlens.circuits.graph import Graph, node_head, node_kind
from headlens.circuits.labels import head_cards, head_labels, node_label
from headlens.circuits.paths import prepare_pair, run_edges, single_edges, split_inputs
from headlens.circuits.tasks import CircuitTask
from headlens.engine.executor import resolve
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import kv_heads

SCORE_COLUMNS = {"eap": "eap", "eap-ig": "eap_ig", "exact": "exact"}


# ---------------------------------------------------------------- exact checks, sharded


def _exact_shard(model: HookedTransformer, shard) -> list[float]:
    """Exact path-patching deltas of one shard's edges: ``(task, senders, slots, ablation, runs_per_pass)``."""
    task, s, r, ablation, runs_per_pass = shard
    graph = Graph.of(model)
    pair = task.pair
    with split_inputs(model):
        setting = prepare_pair(model, pair, mean_tokens=task.mean_tokens, ablation=ablation, graph=graph)
        values = run_edges(model, setting, single_edges(graph, s, r), runs_per_pass=runs_per_pass, progress=False)
    return [v - setting.clean.metric for v in values]


def exact_edges(
    model: HookedTransformer,
    task,
    senders: np.ndarray,
    slots: np.ndarray,
    *,
    ablation: str = "resample",
    executor=None,
    runs_per_pass: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """Exact path-patching delta (patched − clean metric) of each edge alone, its sender's output taken from the
    corrupted prompt (``ablation="resample"``) or the task's mean set (``"mean"``); one shard per receiver layer on
    ``executor`` (None: this process)."""
    graph = Graph.of(model)
    senders, slots = graph.check_edges(senders, slots)
    if len(senders) == 0:
        return np.zeros(0)
    layers = np.array([graph.slots[int(j)].layer for j in slots])
    groups = [np.nonzero(layers == layer)[0] for layer in sorted(set(layers.tolist()))]
    shards = [(task, senders[g], slots[g], ablation, runs_per_pass) for g in groups]
    parts = resolve(executor).map(
        _exact_shard, model, shards, key="headlens.circuits.exact_edges", desc="exact path patching", progress=progress
    )
    out = np.full(len(senders), np.nan)
    for g, values in zip(groups, parts):
        out[g] = values
    return out


# ---------------------------------------------------------------- the result


@dataclass
class CircuitResult:
    """A circuit search on one task.

    - ``edges``: one row per edge of the graph: ``sender, receiver, input, sender_layer, receiver_layer``, a score
      column per method (``eap``, ``eap_ig``: estimated change of the metric when the edge alone is corrupted,
      metric units), ``score`` (the primary method's), ``exact`` (exact path-patching change, where checked, else
      NaN), ``rank`` (1 = largest |score|), ``in_circuit``, ``sender_label``, ``receiver_label`` (census labels;
      ``embed``/``mlp``/``logits`` for other nodes);
    - ``nodes``: one row per node: ``node, kind, layer, head, kv_head, label, card, score`` (sum of the primary
      scores of its outgoing edges: about the effect of corrupting the node's output everywhere), ``abs_score`` (sum
      of |...|), ``in_circuit``;
    - ``faithfulness``: :func:`headlens.circuits.faithfulness.faithfulness`'s :class:`FaithfulnessResult` (its
      ``summary``: CPR, CMD per method);
    - ``scores``: method -> ``[sender, slot]`` tensor; ``circuit``: the kept-edge mask; ``info``: settings, metrics,
      timings and which ranking and k made the circuit.
    """

    task: object
    graph: Graph
    scores: dict[str, Tensor]
    edges: pd.DataFrame
    nodes: pd.DataFrame
    faithfulness: pd.DataFrame
    circuit: Tensor
    info: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Per method: CPR, CMD and the smallest k (percent of edges) with faithfulness >= 0.8."""
        rows = [{"method": m, **v} for m, v in self.faithfulness.summary.items()]
        return pd.DataFrame(rows)

    def circuit_edges(self) -> pd.DataFrame:
        """The circuit's edges, largest |score| first."""
        return self.edges[self.edges.in_circuit].sort_values("rank").reset_index(drop=True)


def find_circuit(
    model: HookedTransformer,
    task,
    *,
    methods: Sequence[str] = METHODS,
    steps: int = IG_STEPS,
    check: int = 100,
    ablation: str = "mean",
    percents: Sequence[float] = PERCENTS,
    census: pd.DataFrame | None = None,
    executor=None,
    runs_per_pass: int = 16,
    scores: dict[str, Tensor] | None = None,
    signed: bool = False,
    progress: bool = True,
) -> CircuitResult:
    """Score every edge with ``methods`` (for the same ``ablation`` the faithfulness is measured with: ``"mean"``
    over the task's mean set, or ``"resample"`` from the corrupted prompt), check the top ``check`` edges of the primary method (EAP-IG when asked for,
    else the first) by exact path patching, and measure the faithfulness of each ranking (``exact``: the checked
    edges by |exact| first, then the rest by the primary score).

    The circuit is the ranking and k (of ``percents``) that reach faithfulness >= 0.8 with the fewest edges (ties: the
    higher CPR); when none does, the top ``check`` edges of the primary ranking. ``signed`` ranks edges by score
    (most negative first: those whose ablation lowers the metric) instead of |score|. ``scores`` reuses edge attributions
    already computed (method -> ``[sender, slot]``, for the same ``ablation``) instead of recomputing them.
    """
    check_model(model)
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise HeadlensError(f"unknown method(s) {unknown or methods}: choose from {', '.join(METHODS)}")
    check = check_count("check", check, minimum=0, why="edges to check exactly")
    if not isinstance(task, CircuitTask):
        raise HeadlensError(
            f"find_circuit takes a CircuitTask (got {type(task).__name__}): build_task(model, 'induction'), or "
            "pair_task(model, clean, corrupted) for a prompt pair"
        )
    graph = Graph.of(model)
    timings: dict[str, float] = {}
    given, scores = dict(scores or {}), {}
    unused = [m for m in given if m not in methods]
    if unused:
        raise HeadlensError(f"scores given for {unused}, not among methods {methods}: add them to methods or drop them")
    for method, matrix in given.items():
        graph.check_scores(matrix, f"scores[{method!r}]")
    for method in methods:
        if method in given:
            scores[method] = given[method].cpu()
            continue
        start = time.perf_counter()
        scores[method] = edge_attribution(
            model,
            task,
            method=method,
            steps=steps if method == "eap-ig" else None,
            ablation=ablation,
            graph=graph,
            progress=progress,
        ).cpu()
        timings[method] = time.perf_counter() - start
    primary = "eap-ig" if "eap-ig" in scores else methods[0]
    s_rank, r_rank = ranking(graph, scores[primary], signed=signed)
    n_check = min(int(check), graph.n_edges)
    start = time.perf_counter()
    exact_values = exact_edges(
        model,
        task,
        s_rank[:n_check],
        r_rank[:n_check],
        ablation=ablation,
        executor=executor,
        runs_per_pass=runs_per_pass,
        progress=progress,
    )
    timings["exact"] = time.perf_counter() - start
    exact = torch.full((graph.n_senders, graph.n_slots), float("nan"))
    checked = torch.zeros(graph.n_senders, graph.n_slots, dtype=torch.bool)
    if n_check:
        idx = (torch.as_tensor(s_rank[:n_check]), torch.as_tensor(r_rank[:n_check]))
        exact[idx] = torch.as_tensor(exact_values, dtype=torch.float32)
        checked[idx] = True
    rankings = dict(scores)
    if n_check:
        rankings["exact"] = exact_key(scores[primary], torch.nan_to_num(exact), checked, signed=signed)
    start = time.perf_counter()
    curves = faithfulness(model, task, rankings, ablation=ablation, percents=percents, signed=signed, progress=progress)
    timings["faithfulness"] = time.perf_counter() - start
    chosen, k, kept = _choose(graph, curves, rankings, scores[primary], n_check, signed)
    labels = head_labels(census) if census is not None else {}
    cards = head_cards(census) if census is not None else {}
    edges = _edge_table(graph, scores, primary, exact, kept, labels)
    nodes = _node_table(model, graph, scores[primary], kept, labels, cards)
    info = {
        "task": task.name,
        "task_info": task.info,
        "methods": methods,
        "primary": primary,
        "ig_steps": steps if "eap-ig" in methods else None,
        "checked": n_check,
        "ablation": ablation,
        "signed": signed,
        "n_edges": graph.n_edges,
        "clean_metric": curves.full,
        "ablated_metric": curves.empty,
        "circuit_method": chosen,
        "circuit_k": k,
        "circuit_edges": int(kept.sum()),
        "seconds": timings,
    }
    return CircuitResult(task, graph, {**scores, "exact": exact}, edges, nodes, curves, kept, info)


def _choose(graph: Graph, curves: FaithfulnessResult, rankings: dict, primary: Tensor, n_check: int, signed: bool):
    """(method, k, kept mask) of the smallest circuit reaching the target; else the primary's top ``n_check``."""
    best = None
    for method, stats in curves.summary.items():
        if stats["k_at_target"] is None:
            continue
        key = (stats["n_edges_at_target"], -stats["cpr"])
        if best is None or key < best[0]:
            best = (key, method, stats["k_at_target"])
    if best is None:
        n = max(1, n_check or n_kept(1, graph.n_edges))
        s, r = ranking(graph, primary, signed=signed)
        method, k = None, 100 * n / graph.n_edges
    else:
        _, method, k = best
        n = n_kept(k, graph.n_edges)
        s, r = ranking(graph, rankings[method], signed=signed)
    kept = torch.zeros(graph.n_senders, graph.n_slots, dtype=torch.bool)
    kept[torch.as_tensor(s[:n]), torch.as_tensor(r[:n])] = True
    return method, k, kept


def _edge_table(graph: Graph, scores: dict, primary: str, exact: Tensor, kept: Tensor, labels: dict) -> pd.DataFrame:
    df = graph.edge_frame({SCORE_COLUMNS[m]: v for m, v in scores.items()})
    df["score"] = df[SCORE_COLUMNS[primary]]
    s, r = graph.edge_index()
    idx = (torch.as_tensor(s), torch.as_tensor(r))
    df["exact"] = exact[idx].double().numpy()
    df["rank"] = df["score"].abs().rank(ascending=False, method="first").astype(int)
    df["in_circuit"] = kept[idx].numpy()
    df["sender_label"] = [node_label(n, labels) for n in df.sender]
    df["receiver_label"] = [node_label(n, labels) for n in df.receiver]
    return df.sort_values("rank").reset_index(drop=True)


def _node_table(model, graph: Graph, primary: Tensor, kept: Tensor, labels: dict, cards: dict) -> pd.DataFrame:
    kv = kv_heads(model)
    names = list(graph.senders) + ["logits"]
    out_score = primary.sum(1).tolist() + [float("nan")]
    out_abs = primary.abs().sum(1).tolist() + [float("nan")]
    in_circuit = kept.any(1).tolist() + [bool(kept[:, -1].any())]
    slot_nodes = {slot.node for slot, on in zip(graph.slots, kept.any(0).tolist()) if on}
    rows = []
    for name, score, total, sends in zip(names, out_score, out_abs, in_circuit):
        head = node_head(name)
        layer = (
            -1
            if name == "embed"
            else graph.n_layers
            if name == "logits"
            else int(graph.sender_layer[graph.sender_index[name]])
        )
        rows.append(
            {
                "node": name,
                "kind": node_kind(name),
                "layer": layer,
                "head": pd.NA if head is None else head.head,
                "kv_head": pd.NA if head is None else kv[head.head],
                "label": node_label(name, labels),
                "card": "" if head is None else cards.get((head.layer, head.head), ""),
                "score": score,
                "abs_score": total,
                "in_circuit": bool(sends or name in slot_nodes),
            }
        )
    df = pd.DataFrame(rows)
    df["head"] = df["head"].astype("Int64")
    df["kv_head"] = df["kv_head"].astype("Int64")
    return df


def recall_at(exact: Sequence[float], estimate: Sequence[float], top_k: int) -> float:
    """Share of the ``top_k`` edges by |exact| that are also in the ``top_k`` by |estimate| (same edge list)."""
    exact, estimate = np.abs(np.asarray(exact, dtype=float)), np.abs(np.asarray(estimate, dtype=float))
    if len(exact) != len(estimate) or not 0 < top_k <= len(exact):
        raise HeadlensError(f"recall needs two equally long lists and 0 < top_k <= their length (got top_k={top_k})")
    a = set(np.argsort(-exact, kind="stable")[:top_k].tolist())
    b = set(np.argsort(-estimate, kind="stable")[:top_k].tolist())
    return len(a & b) / top_k


def receiver_senders(graph: Graph, receivers: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(sender, slot) indices of every edge into the given ``(receiver, input)`` slots, e.g. ``[("L9H8", "k")]``."""
    receivers = list(receivers)
    if not receivers:
        raise HeadlensError("receiver_senders needs at least one (receiver, input) slot, e.g. [('L9H8', 'k')]")
    s_all, r_all = [], []
    for node, kind in receivers:
        key = (str(node), kind)
        if key not in graph.slot_index:
            raise HeadlensError(f"{node}[{kind}] is not a receiver input of this graph")
        r = graph.slot_index[key]
        senders = torch.nonzero(graph.valid[:, r]).flatten().numpy()
        s_all.append(senders)
        r_all.append(np.full(len(senders), r))
    return np.concatenate(s_all), np.concatenate(r_all)


def as_mask(graph: Graph, s: np.ndarray, r: np.ndarray) -> Bool[Tensor, "sender slot"]:
    mask = torch.zeros(graph.n_senders, graph.n_slots, dtype=torch.bool)
    mask[torch.as_tensor(s), torch.as_tensor(r)] = True
    return mask


def matrix(graph: Graph, s: np.ndarray, r: np.ndarray, values) -> Float[Tensor, "sender slot"]:
    """A ``[sender, slot]`` matrix holding ``values`` at the given edges (0 elsewhere)."""
    out = torch.zeros(graph.n_senders, graph.n_slots)
    out[torch.as_tensor(s), torch.as_tensor(r)] = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return out

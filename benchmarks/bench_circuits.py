"""Cost of edge attribution vs exact path patching over all edges of the default Qwen (179,749 edges), 4x21 induction.

EAP-IG (5 steps) and EAP score every edge in one go; both are timed end to end (``--repeats`` runs). Exact path
patching of every edge alone would take one patched run per edge: far too long to run here, so it is timed on a
sample and extrapolated, which this file says in its results. Per sampled receiver layer (``--layers``) ``--per-layer``
random edges into that layer's inputs (q, k, v, MLP) are path patched (one shard, the engine's stacking as used for
real); their mean time per edge, interpolated linearly between sampled layers, times the number of edges into each
layer, plus the 361 logits edges timed in full, gives the projected exact cost. Each repeat re-measures everything.

    flock /tmp/hl/qwen.lock python benchmarks/bench_circuits.py --note "quiet machine"

Writes benchmarks/results/circuits.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from headlens import load_model
from headlens.circuits.edges import edge_attribution
from headlens.circuits.graph import Graph
from headlens.circuits.study import exact_edges
from headlens.circuits.tasks import induction_task
from headlens.io import write_json

RESULTS = Path(__file__).parent / "results"


def _edges_into_layer(graph: Graph, layer: int) -> tuple[np.ndarray, np.ndarray]:
    s_all, r_all = graph.edge_index()
    keep = np.array([graph.slots[j].layer == layer for j in r_all])
    return s_all[keep], r_all[keep]


def one_run(model, task, graph: Graph, layers: list[int], per_layer: int, seed: int, steps: int) -> dict:
    out: dict = {}
    t = time.perf_counter()
    edge_attribution(model, task, method="eap-ig", steps=steps, ablation="resample", graph=graph, progress=False)
    out["eap_ig_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    edge_attribution(model, task, method="eap", ablation="resample", graph=graph, progress=False)
    out["eap_seconds"] = time.perf_counter() - t
    rng = np.random.default_rng(seed)
    per_edge = {}
    for layer in layers:
        s, r = _edges_into_layer(graph, layer)
        pick = rng.choice(len(s), size=min(per_layer, len(s)), replace=False)
        t = time.perf_counter()
        exact_edges(model, task, s[pick], r[pick], progress=False)
        per_edge[layer] = (time.perf_counter() - t) / len(pick)
    s, r = _edges_into_layer(graph, graph.n_layers)  # the logits
    t = time.perf_counter()
    exact_edges(model, task, s, r, progress=False)
    logits_seconds = time.perf_counter() - t
    counts = {layer: len(_edges_into_layer(graph, layer)[0]) for layer in range(graph.n_layers)}
    sampled = sorted(per_edge)
    cost = np.interp(range(graph.n_layers), sampled, [per_edge[layer] for layer in sampled])
    projected = float(sum(cost[layer] * counts[layer] for layer in range(graph.n_layers)) + logits_seconds)
    out.update(
        exact_seconds_per_edge_by_layer={str(k): round(v, 4) for k, v in per_edge.items()},
        exact_logits_edges_seconds=round(logits_seconds, 2),
        exact_all_edges_projected_seconds=round(projected, 1),
        exact_all_edges_projected_hours=round(projected / 3600, 2),
        ratio_exact_over_eap_ig=round(projected / out["eap_ig_seconds"], 1),
        ratio_exact_over_eap=round(projected / out["eap_seconds"], 1),
    )
    out["eap_ig_seconds"] = round(out["eap_ig_seconds"], 2)
    out["eap_seconds"] = round(out["eap_seconds"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", default="0,4,8,12,16,20,23", help="receiver layers whose exact cost is sampled")
    parser.add_argument("--per-layer", type=int, default=24, help="edges path patched per sampled layer")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    parser.add_argument("--note", default="", help="run conditions, recorded in the results")
    parser.add_argument("--output", default="circuits.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    graph = Graph.of(model)
    task = induction_task(model, n_tokens=10, n_seqs=4, seed=0)
    layers = [int(x) for x in args.layers.split(",")]
    runs = [one_run(model, task, graph, layers, args.per_layer, seed, args.steps) for seed in range(args.repeats)]
    ratios = [r["ratio_exact_over_eap_ig"] for r in runs]
    record = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "note": args.note,
        "task": "induction, 4 sequences x 21 tokens (headlens.circuits.tasks.induction_task, seed 0)",
        "n_edges": graph.n_edges,
        "eap_ig_steps": args.steps,
        "exact": (
            "projected, not run: per-edge path-patching time measured on a sample of edges per receiver layer "
            f"({args.per_layer} per layer at layers {layers}), interpolated between them, times the edges into each "
            "layer; the 361 logits edges are timed in full"
        ),
        "runs": runs,
        "ratio_exact_over_eap_ig": {"min": min(ratios), "max": max(ratios)},
        "eap_ig_seconds": {
            "min": min(r["eap_ig_seconds"] for r in runs),
            "max": max(r["eap_ig_seconds"] for r in runs),
        },
        "exact_projected_hours": {
            "min": min(r["exact_all_edges_projected_hours"] for r in runs),
            "max": max(r["exact_all_edges_projected_hours"] for r in runs),
        },
    }
    write_json(RESULTS / args.output, record)
    print(record)


if __name__ == "__main__":
    main()

"""Overhead of the Ray path (2 workers) against one process, on the default Qwen, and per-shard costs for a projection.

Run on a quiet machine: ``python benchmarks/bench_scale.py`` (the driver and each worker hold a Qwen copy: about
3 x 2.5 GB).

One run of each, in this order, on this 2-core CPU machine:

1. census, single process (``LocalExecutor``, 2 torch threads), default probes, batch size 8 (3 shards:
   one per probe kind) — per-shard times recorded; after one warm-up census (first-call costs);
2. the same census on ``RayExecutor(2)`` (1 torch thread per worker) with cold workers (Ray start,
   each worker loading Qwen from the local cache), then again with warm workers;
3. zero-ablation sweep of every head of layers 0, 12 and 23 (repeat-loss metric, 4 x 65 tokens,
   fast strategy), one ``ablation_sweep`` call in one process vs Ray (warm workers; one shard per layer,
   each shard re-running the clean forward it needs).

The outputs of both paths are compared (max |Δ|). Ratios are Ray wall time / single-process wall time.
The projection (README "Scaling") uses the recorded per-shard costs: with N workers, shards are
handed out greedily (longest first) and the wall time is the busiest worker's sum, plus a fixed
per-worker start cost (Ray + one model load) measured here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "scale.json"


def projected(costs: list[float], workers: int, start: float = 0.0) -> float:
    """Wall time of ``costs`` shards on ``workers`` workers, longest first to the least busy worker, plus ``start``."""
    load = [0.0] * workers
    for c in sorted(costs, reverse=True):
        load[load.index(min(load))] += c
    return start + max(load)


def main(source: str = "qwen2.5-coder-0.5b", results: Path = RESULTS) -> dict:
    import ray

    import headlens
    from headlens.engine.executor import LocalExecutor, RayExecutor
    from headlens.interventions.ablation import ablation_sweep, repeat_loss_metric

    torch.set_num_threads(2)
    model = headlens.load_model(source)
    out: dict = {
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, ray {ray.__version__}",
        "model": f"{source} fp32",
        "note": "one run of each; load_average_1min_at_start: the machine's load when the run began",
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }

    t = time.perf_counter()
    headlens.run_census(model, seed=0, progress=False)  # warm-up: first-call costs (page-in, allocator) on neither side
    census_first = time.perf_counter() - t
    local = LocalExecutor()
    t = time.perf_counter()
    single = headlens.run_census(model, seed=0, progress=False, executor=local).table
    census_local = time.perf_counter() - t
    shard_costs = [s.seconds for s in sorted(local.timings, key=lambda s: s.index)]

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    ex = RayExecutor(2, threads=1)
    ex.worker_pids(model)  # start both workers and let them load Qwen
    startup = time.perf_counter() - t
    t = time.perf_counter()
    cold_table = headlens.run_census(model, seed=0, progress=False, executor=ex).table
    census_ray_after_start = time.perf_counter() - t
    t = time.perf_counter()
    warm_table = headlens.run_census(model, seed=0, progress=False, executor=ex).table
    census_ray_warm = time.perf_counter() - t
    ray_shard_costs = [s.seconds for s in sorted(ex.timings, key=lambda s: s.index)]
    scores = [c for c in single.columns if single[c].dtype.kind == "f"]
    out["census"] = {
        "shards": len(shard_costs),
        "single_process_first_call_s (warm-up, not used in ratios)": census_first,
        "single_process_s": census_local,
        "ray_startup_s (ray.init + 2 workers loading Qwen)": startup,
        "ray_cold_s (startup + census)": startup + census_ray_after_start,
        "ray_warm_s": census_ray_warm,
        "ratio_warm": census_ray_warm / census_local,
        "ratio_cold": (startup + census_ray_after_start) / census_local,
        "shard_seconds_single_process_2_threads": shard_costs,
        "shard_seconds_ray_1_thread": ray_shard_costs,
        "max_abs_diff": float((single[scores] - warm_table[scores]).abs().max().max()),
        "labels_equal": bool((single.label == cold_table.label).all() and (single.label == warm_table.label).all()),
    }

    metric = repeat_loss_metric(model)
    layers = sorted({0, model.cfg.n_layers // 2, model.cfg.n_layers - 1})
    ablation_sweep(model, metric, layers=[model.cfg.n_layers - 1], progress=False)  # warm-up
    t = time.perf_counter()
    plain = ablation_sweep(model, metric, layers=layers, progress=False).table
    sweep_plain = time.perf_counter() - t
    t = time.perf_counter()
    remote = ablation_sweep(model, metric, layers=layers, progress=False, executor=ex).table
    sweep_ray = time.perf_counter() - t
    out["ablation_sweep"] = {
        "layers": layers,
        "units": len(plain),
        "single_process_s (ablation_sweep, one call)": sweep_plain,
        "ray_warm_s": sweep_ray,
        "ratio_warm (ray / one call)": sweep_ray / sweep_plain,
        "shard_seconds_ray_1_thread": [s.seconds for s in sorted(ex.timings, key=lambda s: s.index)],
        "max_abs_diff": float((plain.metric - remote.metric).abs().max()),
        "tables_equal": bool(plain.equals(remote)),
    }
    ex.close()
    ray.shutdown()

    # projection from measured per-shard costs (1 torch thread per worker, as on Ray)
    census_costs = ray_shard_costs
    sweep_costs = out["ablation_sweep"]["shard_seconds_ray_1_thread"]
    per_layer = {layer: c for layer, c in zip(layers, sweep_costs)}
    # all 24 layers: interpolate the measured per-layer shard cost linearly in the layer index
    xs, ys = list(per_layer), list(per_layer.values())
    full = []
    for layer in range(model.cfg.n_layers):
        j = 0 if layer <= xs[1] else 1
        full.append(ys[j] + (ys[j + 1] - ys[j]) * (layer - xs[j]) / (xs[j + 1] - xs[j]))
    out["projection"] = {
        "method": "greedy longest-first assignment of measured 1-thread shard costs to N workers, plus the measured "
        "per-worker start cost (not amortised: one run)",
        "worker_start_s": startup,
        "census_default_probes": {n: projected(census_costs, n, startup) for n in (1, 2, 3, 4, 8)},
        "sweep_all_24_layers_interpolated_shard_costs": full,
        "sweep_all_24_layers": {n: projected(full, n, startup) for n in (1, 2, 4, 8, 12, 24)},
    }
    from headlens.io import write_json

    write_json(results, out)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="source (tiny-qwen2 for a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(json.dumps(main(args.model, args.out), indent=2))

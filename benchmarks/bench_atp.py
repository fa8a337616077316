"""Attribution patching (AtP, AtP*, integrated gradients) vs exact patching on the default Qwen, 4x61 induction pair.

Exact activation patching of every head's output (``hook_z``) is the ground truth. Its table is saved once
to ``results/atp_exact_4x61.csv`` (with the induction pair's token hash) and reused while the pair is the
same; ``--recompute`` (or a changed pair) regenerates it. Reported per estimator: wall time, speed-up over
exact, recall of the exact top-k by |effect| within the estimator's top-2k, Pearson and Spearman.

``--heldout`` instead scores the estimators (quality only, no timing) on three more pairs: the induction pair
with seed 1 (4x61) and seed 2 (4x41), and four IOI prompts (IG was built on the seed-0 pair; its default of
2 steps was chosen after these results were seen, so they test it only in part); it writes
``results/atp_heldout.json`` and caches each exact table beside it.

    python benchmarks/bench_atp.py --note "quiet machine"
    python benchmarks/bench_atp.py --heldout
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlens import load_model
from headlens.heads import head_name
from headlens.interventions.attribution import attribution_patching, estimate_quality
from headlens.interventions.patching import activation_patching, induction_pair, text_pair
from headlens.io import write_csv, write_json

RESULTS = Path(__file__).parent / "results"
METHODS = {
    "atp": {"method": "atp"},
    "atp*": {"method": "atp*"},
    "ig2": {"method": "ig", "steps": 2},
    "ig3": {"method": "ig", "steps": 3},
    "ig4": {"method": "ig", "steps": 4},
}
TIMED = ("atp", "atp*", "ig2", "ig4")
IOI_CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Anna went to the park, Anna gave a ball to",
    "When David and Sarah went to the shop, Sarah gave a book to",
    "When James and Paul went to the beach, Paul gave a hat to",
]
IOI_CORRUPTED = [  # the second mention of the subject replaced by a third name
    "When Mary and John went to the store, Paul gave a drink to",
    "When Tom and Anna went to the park, John gave a ball to",
    "When David and Sarah went to the shop, Mary gave a book to",
    "When James and Paul went to the beach, Sarah gave a hat to",
]


def heldout_pairs(model) -> dict:
    return {
        "induction_seed1_4x61": induction_pair(model, n_tokens=30, n_seqs=4, seed=1),
        "induction_seed2_4x41": induction_pair(model, n_tokens=20, n_seqs=4, seed=2),
        "ioi_4": text_pair(
            model,
            IOI_CLEAN,
            IOI_CORRUPTED,
            answer=[" Mary", " Tom", " David", " James"],
            wrong=[" John", " Anna", " Sarah", " Paul"],
        ),
    }


def score(exact: pd.DataFrame, table: pd.DataFrame, names: list[str]) -> dict:
    """Recall/correlations of one estimate against the exact table, plus sign agreement on the exact top 10."""
    assert np.array_equal(table[["layer", "head"]].to_numpy(dtype=int), exact[["layer", "head"]].to_numpy(dtype=int))
    estimate, effect = table["effect"].to_numpy(), exact["effect"].to_numpy()
    quality = estimate_quality(effect, estimate, top_k=10)
    quality["missed"] = [names[i] for i in quality["missed"]]
    top = np.argsort(-np.abs(effect), kind="stable")[:10]
    quality["sign_agrees_top10"] = float(np.mean(np.sign(estimate[top]) == np.sign(effect[top])))
    return quality


def heldout(model) -> None:
    record = {"model": model.cfg.model_name, "k": 10, "pairs": {}}
    for slug, pair in heldout_pairs(model).items():
        exact, _ = exact_table(model, pair, RESULTS / f"atp_exact_{slug}.csv", recompute=False)
        names = [head_name(layer, head) for layer, head in zip(exact["layer"], exact["head"])]
        rows = {
            name: score(exact, attribution_patching(model, pair, activations=["z"], **kwargs).table, names)
            for name, kwargs in METHODS.items()
        }
        top = exact["effect"].abs().sort_values(ascending=False).index[:10]
        record["pairs"][slug] = {
            "tokens": list(pair.clean.shape),
            "metric": pair.info.get("metric"),
            "exact_top10": {names[i]: round(float(exact.effect[i]), 4) for i in top},
            "methods": rows,
        }
        for name, q in rows.items():
            print(
                f"{slug} {name:>5}: recall {q['recall_top10_in_20']:.2f} pearson {q['pearson']:.3f} missed {q['missed']}"
            )
    write_json(RESULTS / "atp_heldout.json", record)
    print(f"wrote {RESULTS / 'atp_heldout.json'}")


def token_hash(pair) -> str:
    data = torch.cat([pair.clean, pair.corrupted]).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def exact_table(model, pair, path: Path, recompute: bool) -> tuple[pd.DataFrame, float | None]:
    """The exact patching table (cached in ``path`` with its pair hash); returns it and its wall time if computed."""
    meta = path.with_suffix(".json")
    if not recompute and path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("pair_hash") == token_hash(pair) and info.get("model") == model.cfg.model_name:
            return pd.read_csv(path), info["seconds"]
    start = time.perf_counter()
    result = activation_patching(model, pair, activation="z", runs_per_pass=32, progress=False)
    seconds = time.perf_counter() - start
    exact = result.table
    write_csv(exact, path)
    write_json(
        meta,
        {
            "model": model.cfg.model_name,
            "pair_hash": token_hash(pair),
            "seconds": seconds,
            "threads": torch.get_num_threads(),
            "clean_metric": result.clean,
            "corrupted_metric": result.corrupted,
        },
    )
    return exact, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recompute", action="store_true", help="recompute the exact table even if it is cached")
    parser.add_argument("--exact-only", action="store_true")
    parser.add_argument("--note", default="", help="run conditions, recorded in the results")
    parser.add_argument("--grad-drop", action=argparse.BooleanOptionalAction, default=True, help="also time GradDrop")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cheap estimator (median reported)")
    parser.add_argument("--heldout", action="store_true", help="score the estimators on three more pairs instead")
    parser.add_argument("--output", default="atp_4x61.json", help="results file name (a second run: another name)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    if args.heldout:
        heldout(model)
        return
    output = RESULTS / args.output
    pair = induction_pair(model, n_tokens=30, n_seqs=4, seed=0)
    exact, t_exact = exact_table(model, pair, RESULTS / "atp_exact_4x61.csv", args.recompute)
    names = [head_name(layer, head) for layer, head in zip(exact["layer"], exact["head"])]  # by row of exact
    print(f"exact: {t_exact:.1f} s")
    if args.exact_only:
        return
    estimates, results = {}, {}
    for name in TIMED:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            table = attribution_patching(model, pair, activations=["z"], **METHODS[name]).table
            times.append(time.perf_counter() - start)
        estimates[name] = table["effect"].to_numpy()
        quality = score(exact, table, names)
        results[name] = {"seconds": times, "seconds_median": float(np.median(times)), **quality}
        print(
            f"{name:>15}: {np.median(times):6.1f} s, recall top-10 in top-20 "
            f"{quality['recall_top10_in_20']:.2f}, pearson {quality['pearson']:.3f}, spearman {quality['spearman']:.3f}, "
            f"missed {quality['missed']}"
        )
        order = exact["effect"].abs().sort_values(ascending=False).index[:20]
        top = [
            {
                "head": names[i],
                "exact": round(float(exact.effect[i]), 4),
                **{name: round(float(est[i]), 4) for name, est in estimates.items()},
            }
            for i in order
        ]
        write_json(
            output,
            {
                "model": model.cfg.model_name,
                "tokens": list(pair.clean.shape),
                "threads": torch.get_num_threads(),
                "note": args.note,
                "exact_seconds_saved_full_run": t_exact,
                "exact_table": "benchmarks/results/atp_exact_4x61.csv",
                "methods": results,
                "top20_by_abs_exact": top,
            },
        )
    # exact cost measured in this run (same machine load as the estimators): heads of 4 spread layers, whose mean
    # restart depth matches the whole model's, scaled to all layers
    layers = [0, 8, 16, 23]
    start = time.perf_counter()
    subset = activation_patching(model, pair, activation="z", layers=layers, runs_per_pass=32, progress=False).table
    t_subset = time.perf_counter() - start
    mine = exact[exact["layer"].isin(layers)]["effect"].to_numpy()
    assert np.abs(subset["effect"].to_numpy() - mine).max() < 1e-4, "the saved exact table does not reproduce"
    t_exact_now = t_subset * model.cfg.n_layers / len(layers)
    print(
        f"exact, layers {layers}: {t_subset:.1f} s -> all layers ~{t_exact_now:.1f} s (saved full run: {t_exact:.1f} s)"
    )
    record = json.loads(output.read_text())
    for name, result in record["methods"].items():
        result["speedup_vs_exact"] = t_exact_now / result["seconds_median"]
        print(f"{name:>15}: {result['speedup_vs_exact']:.1f}x cheaper than exact")
    record.update(
        exact_subset_layers=layers,
        exact_subset_seconds=t_subset,
        exact_seconds_this_run=t_exact_now,
        speedup_basis="exact_seconds_this_run: exact patching of 4 spread layers in this run, scaled to all layers",
    )
    write_json(output, record)
    print(f"wrote {output}")
    # the workflow docs/attribution.md recommends: the IG screen, then exact patching of its top 20 heads
    start = time.perf_counter()
    table = attribution_patching(model, pair, activations=["z"], **METHODS["ig2"]).table
    top = table.reindex(table["effect"].abs().sort_values(ascending=False).index).head(20)
    verified = activation_patching(
        model, pair, activation="z", heads=list(zip(top["layer"], top["head"])), runs_per_pass=32, progress=False
    ).table
    seconds = time.perf_counter() - start
    by_head = exact.set_index(["layer", "head"])["effect"]
    values = verified.set_index(["layer", "head"])["effect"]
    assert np.abs(values - by_head.loc[values.index]).max() < 1e-4, "the verified heads do not match the exact table"
    exact_top10 = set(by_head.abs().sort_values(ascending=False).index[:10])
    record["methods"]["ig2+verify20"] = {
        "seconds": [seconds],
        "seconds_median": seconds,
        "speedup_vs_exact": t_exact_now / seconds,
        "recall_top10_in_20": len(exact_top10 & set(values.index)) / 10,
        "missed": [head_name(layer, head) for layer, head in sorted(exact_top10 - set(values.index))],
        "verified_top10_in_exact_top10": len(exact_top10 & set(values.abs().sort_values(ascending=False).index[:10]))
        / 10,
        "note": "the 20 screened heads carry their exact effects",
    }
    write_json(output, record)
    print(f"ig2 + exact patching of its top 20: {seconds:.1f} s, {t_exact_now / seconds:.1f}x cheaper than exact")
    if args.grad_drop:  # one backward pass per layer: measured last
        start = time.perf_counter()
        table = attribution_patching(model, pair, activations=["z"], method="atp*", grad_drop=True).table
        seconds = time.perf_counter() - start
        quality = score(exact, table, names)
        record["methods"]["atp*+graddrop"] = {
            "seconds": [seconds],
            "seconds_median": seconds,
            "speedup_vs_exact": t_exact_now / seconds,
            **quality,
        }
        for row in record["top20_by_abs_exact"]:
            i = names.index(row["head"])
            row["atp*+graddrop"] = round(float(table["effect"][i]), 4)
        write_json(output, record)
        print(
            f"atp*+graddrop: {seconds:.1f} s, recall {quality['recall_top10_in_20']:.2f}, pearson {quality['pearson']:.3f}"
        )


if __name__ == "__main__":
    main()

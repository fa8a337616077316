"""A census you can trust, measured on the default Qwen (issue 13).

One run writes analyses/results/census_trust/:
- census_seed{0,1,2}.csv    default census at seeds 0, 1, 2 (scores, _nosink scores, label, confidence, intervals)
- stability.json            label agreement across the seeds (all heads; heads confident >= 0.9 in every seed)
- sizes.csv                 agreement across seeds when only the first k sequences per probe kind are used
- thresholds.csv            agreement and `other` share if the local / first_token thresholds were elsewhere
- counts.csv                heads per label at seed 0 with 95 % bootstrap intervals
- null.csv                  each label's threshold vs its null (random-weights Qwen, shuffled repeats)
- causal.csv                label heads vs layer-matched random head sets (effect ratio with interval)
- summary.json              the headline numbers, timings (2 cores, run with nothing else), provenance

Run: .venv/bin/python analyses/census_trust.py  (about 15 minutes on 2 cores, nothing else running);
``--cached`` re-labels the per-sequence scores of the last run (kept in /tmp) without new forwards.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlens import load_model
from headlens.census.calibrate import null_levels, null_scores
from headlens.census.registry import WEIGHTS, head_types
from headlens.census.run import PerSequence, _thresholds, build_table, collect
from headlens.census.validate import causal_validation
from headlens.data.corpus import provenance
from headlens.data.probes import default_probes

OUT = Path(__file__).parent / "results" / "census_trust"
SEEDS = (0, 1, 2)
SIZES = (4, 8, 16, 32)
SENSITIVITY = [{"local": lo, "first_token": ft} for lo in (0.3, 0.4, 0.6) for ft in (0.3, 0.6)]
CACHE = Path("/tmp/headlens_census_trust")  # per-sequence scores, for re-labelling with --cached (not committed)


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def agreement(tables: list[pd.DataFrame]) -> dict:
    labels = np.stack([t["label"].to_numpy() for t in tables])
    same = (labels == labels[0]).all(0)
    out = {"n_heads": int(len(same)), "same_label": float(same.mean()), "n_same": int(same.sum())}
    if all("confidence" in t and t["confidence"].notna().all() for t in tables):
        confident = np.stack([t["confidence"].to_numpy() >= 0.9 for t in tables]).all(0)
        out |= {
            "n_confident_all_seeds": int(confident.sum()),
            "share_confident_all_seeds": float(confident.mean()),
            "same_label_among_confident": float(same[confident].mean()) if confident.any() else float("nan"),
        }
    return out


def subset(per, k: int):
    return PerSequence({kind: {c: v[:k] for c, v in cols.items()} for kind, cols in per.by_kind.items()}, per.weights)


def main() -> None:
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    model = load_model()
    types = head_types()
    limits = _thresholds(types, None)
    tables, pers, timings, sources = [], [], {}, {}
    counts = None  # heads per label at seed 0, from the census bootstrap
    for seed in SEEDS:
        start = time.perf_counter()
        probes = default_probes(model, seed=seed)
        cache = CACHE / f"seed{seed}.npz"
        if "--cached" in sys.argv and cache.exists():  # re-label stored per-sequence scores (no forwards)
            with np.load(cache, allow_pickle=False) as z:
                per = PerSequence({}, {})
                for key in z.files:
                    kind, col = key.split("|", 1)
                    (per.weights if kind == WEIGHTS else per.by_kind.setdefault(kind, {}))[col] = z[key]
        else:
            per = collect(model, probes, types, batch_size=8, progress=False)
            CACHE.mkdir(parents=True, exist_ok=True)
            arrays = {f"{k}|{c}": v for k, d in per.by_kind.items() for c, v in d.items()}
            np.savez(cache, **arrays, **{f"{WEIGHTS}|{c}": v for c, v in per.weights.items()})
        table, seed_counts = build_table(model, per, types, limits, seed=seed)
        if counts is None:
            counts = seed_counts
        timings[f"census_seed{seed}_s"] = round(time.perf_counter() - start, 1)
        sources[seed] = {k: list(p.sources) for k, p in probes.items() if p.sources}
        table.to_csv(OUT / f"census_seed{seed}.csv.tmp", index=False)
        os.replace(OUT / f"census_seed{seed}.csv.tmp", OUT / f"census_seed{seed}.csv")
        tables.append(table)
        pers.append(per)
        print(f"seed {seed}: {timings[f'census_seed{seed}_s']} s", flush=True)
    stability = agreement(tables)
    stability["label_counts_by_seed"] = {s: t["label"].value_counts().to_dict() for s, t in zip(SEEDS, tables)}
    atomic_text(OUT / "stability.json", json.dumps(stability, indent=2) + "\n")

    n_default = {kind: v["_sink"].shape[0] for kind, v in pers[0].by_kind.items()}
    rows = []
    for k in (*SIZES, max(n_default.values())):
        sub = [build_table(model, subset(p, k), types, limits, seed=s, n_boot=0)[0] for p, s in zip(pers, SEEDS)]
        rows.append({"sequences_per_kind": k, **{key: v for key, v in agreement(sub).items() if key != "n_heads"}})
    pd.DataFrame(rows).to_csv(OUT / "sizes.csv", index=False)

    rows = []
    for overrides in SENSITIVITY:
        alt = _thresholds(types, overrides)
        sub = [build_table(model, p, types, alt, seed=s, n_boot=0)[0] for p, s in zip(pers, SEEDS)]
        same = agreement(sub)
        rows.append(
            {
                **{f"{k}_threshold": v for k, v in overrides.items()},
                "default": all(limits[k] == v for k, v in overrides.items()),
                "same_label": same["same_label"],
                "other_share_seed0": float((sub[0]["label"] == "other").mean()),
            }
        )
    pd.DataFrame(rows).to_csv(OUT / "thresholds.csv", index=False)

    counts.to_csv(OUT / "counts.csv", index=False)

    start = time.perf_counter()
    null_cache = CACHE / "nulls.npz"
    if "--cached" in sys.argv and null_cache.exists():
        with np.load(null_cache, allow_pickle=False) as z:
            nulls = {}
            for key in z.files:
                null, col = key.split("|", 1)
                nulls.setdefault(null, {})[col] = z[key]
    else:
        nulls = null_scores(model, default_probes(model, seed=0), seed=0, progress=False)
        np.savez(null_cache, **{f"{k}|{c}": v for k, d in nulls.items() for c, v in d.items()})
    levels = null_levels(nulls)
    timings["nulls_s"] = round(time.perf_counter() - start, 1)
    levels.to_csv(OUT / "null.csv", index=False)

    start = time.perf_counter()
    causal = causal_validation(model, tables[0], n_random=10, n_seqs=4, seed=0, progress=False)
    timings["causal_s"] = round(time.perf_counter() - start, 1)
    causal.to_csv(OUT / "causal.csv", index=False)

    other = int((tables[0]["label"] == "other").sum())
    labelled = set(tables[0]["label"]) - {"other"}
    summary = {
        "model": "Qwen2.5-Coder-0.5B-Instruct (fp32, CPU)",
        "probes": {kind: n for kind, n in n_default.items()},
        "seq_len": int(default_probes.__kwdefaults__["seq_len"]),
        "stability": {k: v for k, v in stability.items() if k != "label_counts_by_seed"},
        "other_share": other / len(tables[0]),
        "labels_clear_null": {r.label: bool(r.clears) for r in levels.itertuples() if r.label in labelled},
        "causal": {
            r.label: {"ratio": r.ratio, "lo": r.ratio_lo, "hi": r.ratio_hi, "n_heads": r.n_heads}
            for r in causal.itertuples()
        },
        # a --cached run re-labels stored per-sequence scores: its census and null times are not the cost of a census
        "timings_s_quiet_2_cores": {k: v for k, v in timings.items() if k == "causal_s"}
        if "--cached" in sys.argv
        else timings,
        "provenance": {
            **provenance(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "argv": sys.argv,
            "probe_sources": sources,
        },
    }
    atomic_text(OUT / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=2, default=float))


if __name__ == "__main__":
    main()

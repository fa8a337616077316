"""bf16 vs fp32 census scores on the default Qwen (CPU): how far do reduced-precision weights move them?

The census scores patterns in float32 whatever the model's dtype (``headlens.census.run.batch_sums``), so
the difference measured here is the model's own: weights rounded to bf16, activations and
attention computed in bf16. Default census probes, seed 0, batch size 8. Per score: max and mean
|Δ| over the 336 heads; label agreement; the heads whose label changes, with their fp32 scores.

Writes ``analyses/results/precision/precision.json`` and ``deltas.csv`` (per head and score).
Run: ``python analyses/precision.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import headlens
from headlens.census.run import score_columns
from headlens.io import write_csv, write_json

OUT = Path(__file__).parent / "results" / "precision"


def main(dtypes=("bfloat16",)) -> dict:
    torch.manual_seed(0)
    tables, seconds = {}, {}
    for dtype in ("float32", *dtypes):
        model = headlens.load_model(dtype=dtype)
        start = time.perf_counter()
        tables[dtype] = headlens.run_census(model, seed=0, progress=False).table
        seconds[dtype] = time.perf_counter() - start
        del model
    ref = tables["float32"]
    # every score the census fills (positional_offset is the offset a positional head prefers, not a score)
    scored = [c for c in score_columns() if c in ref and ref[c].notna().any() and not c.endswith("_offset")]
    result = {
        "model": "qwen2.5-coder-0.5b",
        "device": "cpu",
        "seed": 0,
        "n_heads": len(ref),
        "census_seconds": seconds,
        "load_avg_1min_at_end": os.getloadavg()[0],  # > 2 on this 2-core machine: the seconds were contended
        "torch": torch.__version__,
        "python": platform.python_version(),
        "per_dtype": {},
    }
    rows = []
    for dtype in dtypes:
        other = tables[dtype]
        per_score = {}
        for score in scored:
            delta = (other[score] - ref[score]).abs()
            per_score[score] = {
                "max_abs": float(delta.max()),
                "mean_abs": float(delta.mean()),
                "p99_abs": float(delta.quantile(0.99)),
            }
        changed = ref.label != other.label
        flips = [
            {"head": f"L{r.layer}H{r.head}", "fp32": r.label, dtype: o}
            for r, o in zip(ref[changed].itertuples(), other.label[changed])
        ]
        result["per_dtype"][dtype] = {
            "scores": per_score,
            "max_abs_any_score": max(v["max_abs"] for v in per_score.values()),
            "label_agreement": float((~changed).mean()),
            "label_changes": flips,
        }
        for score in scored:
            rows.append(
                pd.DataFrame(
                    {
                        "dtype": dtype,
                        "score": score,
                        "layer": ref["layer"],
                        "head": ref["head"],
                        "fp32": ref[score],
                        "value": other[score],
                        "abs_delta": (other[score] - ref[score]).abs(),
                    }
                )
            )
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(pd.concat(rows, ignore_index=True), OUT / "deltas.csv")
    write_json(OUT / "precision.json", result)
    return result


if __name__ == "__main__":
    out = main()
    json.dump(
        {
            k: {"max_abs_any_score": v["max_abs_any_score"], "label_agreement": v["label_agreement"]}
            for k, v in out["per_dtype"].items()
        },
        sys.stdout,
        indent=2,
    )

"""How many probe sequences `headlens compare` needs: per-head attention change (mean JSD) from fewer sequences
against the census's full probe set, on the default Qwen and the shipped LoRA adapter.

The choice is made on seed 0 (development) and checked, frozen, on seed 1 (fresh probes):

- seed 0: the census probes (48 natural, delimiter, code and 24 repeated sequences) are run in chunks of 4
  sequences per kind; the estimate from the first k sequences of each kind is the query-weighted mean of its chunks,
  for k in CANDIDATES; the smallest k whose top-10 heads equal the full set's and whose Spearman rank correlation is
  >= 0.99 is chosen;
- seed 1: ``attention_divergence`` on ``default_probes(n_seqs=k)`` (what ``compare`` runs) vs the full probe set.

Writes benchmarks/results/compare_probes.json. Run alone: ``flock /tmp/hl/qwen.lock python
benchmarks/bench_compare_probes.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

import headlens
from headlens.analysis.compare import attention_divergence
from headlens.data.probes import default_probes
from headlens.io import write_text
from headlens.models import load_tuned

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "analyses" / "results" / "lora_finetune" / "adapter"
OUT = Path(__file__).resolve().parent / "results" / "compare_probes.json"
CANDIDATES = (4, 8, 12, 16, 24)
CHUNK = 4


def agreement(full: pd.Series, part: pd.Series) -> dict:
    top = set(full.nlargest(10).index)
    return {
        "spearman": round(float(spearmanr(full, part).statistic), 4),
        "top10_overlap": len(top & set(part.nlargest(10).index)),
        "max_abs_diff_bits": float((full - part).abs().max()),
        "top1_same": bool(full.idxmax() == part.idxmax()),
    }


def main() -> None:
    base = headlens.load_model()
    tuned = load_tuned(base, ADAPTER, base_source="qwen2.5-coder-0.5b")
    result = {"adapter": str(ADAPTER.relative_to(ROOT)), "candidates": list(CANDIDATES), "load_average_1min": []}

    # seed 0: chunks of the full probe set
    probes = default_probes(base, seed=0)
    sums, weights = {}, {}
    for probe in probes:
        for start in range(0, probe.tokens.shape[0], CHUNK):
            chunk = probe.tokens[start : start + CHUNK]
            jsd = attention_divergence(base, tuned, chunk, progress=False).set_index(["layer", "head"])["jsd"]
            sums[(probe.kind, start)] = jsd * chunk.shape[0] * (chunk.shape[1] - 1)
            weights[(probe.kind, start)] = chunk.shape[0] * (chunk.shape[1] - 1)

    def estimate(k: int | None) -> pd.Series:
        keys = [key for key in sums if k is None or key[1] < k]
        return sum(sums[key] for key in keys) / sum(weights[key] for key in keys)

    full = estimate(None)
    dev = {k: agreement(full, estimate(k)) for k in CANDIDATES}
    chosen = next(
        (k for k in CANDIDATES if dev[k]["top10_overlap"] == 10 and dev[k]["spearman"] >= 0.99), CANDIDATES[-1]
    )
    result["seed0_development"] = {str(k): v for k, v in dev.items()}
    result["chosen_n_seqs"] = chosen
    result["load_average_1min"].append(os.getloadavg()[0])

    # seed 1: what compare runs, frozen k, against the full set
    timings = {}
    start = time.perf_counter()
    full1 = attention_divergence(base, tuned, default_probes(base, seed=1), progress=False)
    timings["full_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    part1 = attention_divergence(base, tuned, default_probes(base, seed=1, n_seqs=chosen), progress=False)
    timings[f"n_seqs_{chosen}_s"] = round(time.perf_counter() - start, 1)
    key = ["layer", "head"]
    result["seed1_test"] = agreement(full1.set_index(key)["jsd"], part1.set_index(key)["jsd"])
    result["seed1_top10_full"] = [f"L{l}H{h}" for l, h in full1.set_index(key)["jsd"].nlargest(10).index]
    result["seed1_top10_chosen"] = [f"L{l}H{h}" for l, h in part1.set_index(key)["jsd"].nlargest(10).index]
    result["seed1_divergence_seconds"] = timings
    result["load_average_1min"].append(os.getloadavg()[0])
    write_text(OUT, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

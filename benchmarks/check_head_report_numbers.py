"""Recompute the engine-dependent numbers of the committed head_report study and compare them with its files.

analyses/head_report.py takes ``ablation_repeat_loss`` (zero-ablation sweep of every head, repeated-token loss,
2 x 33 tokens) and ``patching_recovery`` (exact z patching, default induction pair) from the ablation and patching
code; named_heads.csv keeps them for 21 heads. This reruns just those two pieces with the current code and writes
the largest absolute differences to benchmarks/results/engine/head_report_check.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from headlens import load_model
from headlens.interventions.ablation import ablation_sweep, repeat_loss_metric
from headlens.interventions.patching import activation_patching, induction_pair
from headlens.io import write_text

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "engine" / "head_report_check.json"


def main() -> None:
    torch.manual_seed(0)
    model = load_model()
    committed = pd.read_csv(ROOT / "analyses" / "results" / "head_report" / "named_heads.csv")
    start = time.perf_counter()
    sweep = ablation_sweep(model, repeat_loss_metric(model, n_seqs=2, half_len=16, seed=0), method="zero").table
    patch = activation_patching(model, induction_pair(model, seed=0), activation="z").table
    seconds = time.perf_counter() - start
    new = committed[["layer", "head", "ablation_repeat_loss", "patching_recovery"]].merge(
        sweep[["layer", "head", "effect"]].astype({"head": int}).rename(columns={"effect": "ablation_new"}),
        on=["layer", "head"],
    )
    new = new.merge(
        patch[["layer", "head", "effect"]].astype({"head": int}).rename(columns={"effect": "patching_new"}),
        on=["layer", "head"],
    )
    result = {
        "heads_compared": len(new),
        "max_abs_diff_ablation_repeat_loss": float((new.ablation_new - new.ablation_repeat_loss).abs().max()),
        "max_abs_diff_patching_recovery": float((new.patching_new - new.patching_recovery).abs().max()),
        "max_abs_ablation_effect": float(new.ablation_repeat_loss.abs().max()),
        "seconds": round(seconds, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_text(OUT, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

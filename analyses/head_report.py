"""Head-classification report of Qwen2.5-Coder-0.5B: census, label counts per layer, named heads with evidence.

Evidence per head: its census scores, the effect of zero-ablating it alone on the repeated-half loss
(in-context copying), the share of the induction pair's clean behaviour that patching its output
recovers, and its RoPE distance profile; the HTML report adds CircuitsVis pictures of its pattern.

    python analyses/head_report.py

Writes under analyses/results/head_report/: report.html (self-contained), figures/*.png, census.csv,
labels_per_layer.csv, named_heads.csv, summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from _harness import study_args, write_summary

from headlens import (
    ablation_sweep,
    activation_patching,
    distance_profiles,
    induction_pair,
    load_model,
    repeat_loss_metric,
    rope_summary,
    run_census,
    write_report,
)
from headlens.io import write_csv
from headlens.models import DEFAULT_MODEL
from headlens.render.viz import top_heads_by_label

OUT = Path(__file__).resolve().parent / "results" / "head_report"
MODEL = DEFAULT_MODEL
SEED = 0


def main() -> None:
    global OUT, SEED, MODEL
    args = study_args(__doc__, out=OUT, seed=SEED)
    OUT, SEED, MODEL = args.out, args.seed, args.model
    start = time.perf_counter()
    model = load_model(MODEL)
    result = run_census(model, seed=SEED)
    table = result.table
    sweep = ablation_sweep(model, repeat_loss_metric(model, n_seqs=2, half_len=16, seed=SEED), method="zero").table
    patch = activation_patching(model, induction_pair(model, seed=SEED), activation="z").table
    profile = distance_profiles(model, probes=("natural", "constant"), n_seqs=4, seq_len=64, seed=SEED)
    summary = rope_summary(profile[profile.probe == "constant"])

    evidence = (
        table.merge(
            sweep[["layer", "head", "effect"]].rename(columns={"effect": "ablation_repeat_loss"}), on=["layer", "head"]
        )
        .merge(patch[["layer", "head", "effect"]].rename(columns={"effect": "patching_recovery"}), on=["layer", "head"])
        .merge(summary[["layer", "head", "peak_distance", "positional_score"]], on=["layer", "head"])
    )
    named = top_heads_by_label(table, top_k=3).merge(evidence, on=["layer", "head"])
    per_layer = pd.crosstab(table.layer, table.label)

    OUT.mkdir(parents=True, exist_ok=True)
    write_report(
        OUT,
        model=model,
        census=result,
        ablation=sweep[["layer", "head", "effect"]].rename(columns={"effect": "repeat_loss_increase"}),
        patching=patch[["layer", "head", "effect"]].rename(columns={"effect": "induction_pair_recovery"}),
        rope=profile,
    )
    # census.csv is the richer table: census + per-head ablation, patching and RoPE evidence (write_report writes no CSV)
    write_csv(evidence, OUT / "census.csv")
    write_csv(per_layer, OUT / "labels_per_layer.csv", index=True)
    write_csv(named, OUT / "named_heads.csv")
    induction = evidence[evidence.label == "induction"]
    others = evidence[evidence.label != "induction"]
    result = {
        "labels": table.label.value_counts().to_dict(),
        "mean_ablation_effect_induction_heads": round(float(induction.ablation_repeat_loss.mean()), 4),
        "mean_ablation_effect_other_heads": round(float(others.ablation_repeat_loss.mean()), 4),
        "mean_patching_recovery_induction_heads": round(float(induction.patching_recovery.mean()), 4),
        "mean_patching_recovery_other_heads": round(float(others.patching_recovery.mean()), 4),
        "top_ablation_heads": [
            f"L{r.layer}H{r.head} {r.label} {r.ablation_repeat_loss:+.3f}"
            for r in evidence.nlargest(5, "ablation_repeat_loss").itertuples()
        ],
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_summary(OUT / "summary.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

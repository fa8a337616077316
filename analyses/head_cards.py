"""Head cards on the default Qwen: every number docs/head_cards.md quotes, regenerated.

Runs the default census (seed 0), the default causal evidence (headlens.analysis.evidence: each label's verdict and the
single-head effects of its top heads), a card per head, and the task roles of every head on a name-mover prompt pair
of our own (IOI-style). Writes analyses/results/head_cards/:

- cards.csv: per head, label, the column that decided it (raw or _nosink), deciding score and interval, raw score,
  runner-up and why it lost, and the card;
- causal.csv, causal_heads.csv: the label verdicts and single-head effects;
- roles.csv: every head's patching effect, direct logit attribution and attention to the answer on the pair;
- summary.json: timings (quiet, 2 cores, under /tmp/hl/qwen.lock), how many heads the sink-corrected score labelled,
  how many labels' top-3 differ between raw and deciding ranking, the worked example's card and evidence table.

Run: flock /tmp/hl/qwen.lock env PYTHONPATH=src .venv/bin/python analyses/head_cards.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from headlens import load_model, run_census
from headlens.analysis import cards
from headlens.analysis.evidence import label_evidence
from headlens.analysis.roles import task_roles
from headlens.census import LABEL_SCORE
from headlens.heads import head_name
from headlens.interventions.patching import text_pair
from headlens.io import write_csv, write_json

OUT = Path(__file__).parent / "results" / "head_cards"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
ANSWER, WRONG = " Mary", " John"


def main() -> None:
    torch.set_num_threads(2)
    timings = {}
    start = time.perf_counter()
    model = load_model()
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    result = run_census(model, seed=0, progress=False)
    timings["census_s"] = time.perf_counter() - start
    table = result.table

    start = time.perf_counter()
    evidence = label_evidence(model, table, seed=0, progress=False)
    timings["evidence_s"] = time.perf_counter() - start

    start = time.perf_counter()
    table["card"] = cards.head_cards(model, table, evidence=evidence)
    timings["cards_s"] = time.perf_counter() - start

    pair = text_pair(model, CLEAN, CORRUPTED, answer=ANSWER, wrong=WRONG)
    start = time.perf_counter()
    roles = task_roles(model, pair, answer=ANSWER, wrong=WRONG)
    timings["roles_s"] = time.perf_counter() - start

    why = cards.explain(table)
    why["raw"] = [float(table[c.removesuffix("_nosink")].iloc[i]) if isinstance(c, str) else np.nan
                  for i, c in enumerate(why["column"])]  # fmt: skip
    why["card"] = table["card"]
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(why, OUT / "cards.csv")
    write_csv(table, OUT / "census.csv")
    write_csv(evidence.labels, OUT / "causal.csv")
    write_csv(evidence.heads, OUT / "causal_heads.csv")
    write_csv(roles, OUT / "roles.csv")

    nosink = why[why["column"].fillna("").str.endswith("_nosink")]
    far = nosink[(nosink["score"] - nosink["raw"]).abs() > 0.1]
    example = far.sort_values(["confidence", "score"], ascending=False).iloc[0]
    layer, head = int(example["layer"]), int(example["head"])
    differ = {}
    for label, part in table[table.label != "other"].groupby("label"):
        raw = LABEL_SCORE.get(label)
        by_raw = [head_name(r.layer, r.head) for r in part.nlargest(3, raw).itertuples()]
        by_deciding = [head_name(r.layer, r.head) for r in part.nlargest(3, "label_score").itertuples()]
        if by_raw != by_deciding:
            differ[label] = {"raw": by_raw, "deciding": by_deciding}
    top_roles = roles.reindex(roles["patching"].abs().sort_values(ascending=False).index).head(5)
    summary = {
        "model": "Qwen2.5-Coder-0.5B-Instruct (fp32, CPU)",
        "seed": 0,
        "timings_s_quiet_2_cores": {k: round(v, 1) for k, v in timings.items()},
        "evidence_settings": evidence.settings,
        "n_heads": len(table),
        "labelled_by_nosink": int(len(nosink)),
        "labelled_by_nosink_more_than_0.1_from_raw": int(len(far)),
        "labels_whose_top3_differ_raw_vs_deciding": differ,
        "verdicts": dict(zip(evidence.labels["label"], evidence.labels["verdict"])),
        "example": {
            "head": head_name(layer, head),
            "label": example["label"],
            "column": example["column"],
            "score": example["score"],
            "lo": example["lo"],
            "hi": example["hi"],
            "raw": example["raw"],
            "threshold": example["threshold"],
            "card": example["card"],
            "scores": cards.score_table(table, layer, head).round(4).to_dict("records"),
        },
        "pair": {"clean": CLEAN, "corrupted": CORRUPTED, "answer": ANSWER, "wrong": WRONG},
        "top_roles": [
            {
                "head": head_name(r.layer, r.head),
                "label": str(table.label.iloc[r.Index]),
                "patching": round(r.patching, 4),
                "dla": round(r.dla, 4),
                "attn_answer": round(r.attn_answer, 4),
            }
            for r in top_roles.itertuples()
        ],  # fmt: skip
    }
    write_json(OUT / "summary.json", _finite(summary))
    print(json.dumps({k: summary[k] for k in ("timings_s_quiet_2_cores", "labelled_by_nosink", "verdicts")}, indent=1))
    print(summary["example"]["card"])


def _finite(value):
    """``value`` with every NaN as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


if __name__ == "__main__":
    main()

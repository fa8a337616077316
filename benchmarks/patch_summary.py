"""The README's patching sentence, from committed results: largest effect and census labels of the top heads.

Reads ``benchmarks/results/patching_4x21.json`` (``bench_patching.py --n-tokens 10 --n-seqs 4``: the default
induction pair of ``headlens patch``) and the census labels in ``analyses/results/head_report/census.csv``
(``analyses/head_report.py``); writes ``benchmarks/results/patch_default_summary.json``.

    python benchmarks/patch_summary.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from headlens.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    bench = json.loads((ROOT / "benchmarks/results/patching_4x21.json").read_text())
    census = pd.read_csv(ROOT / "analyses/results/head_report/census.csv")
    label = {(int(r.layer), int(r.head)): r.label for r in census.itertuples()}
    heads = pd.DataFrame(bench["top_heads"])  # the top 20 by |exact effect|
    heads["label"] = [label[(int(r.layer), int(r.head))] for r in heads.itertuples()]
    top_abs = heads.head(10)
    top_signed = heads.sort_values("exact", ascending=False).head(10)  # what nlargest(10, "effect") shows
    name = lambda rows: [f"L{r.layer}H{r.head}" for r in rows.itertuples()]  # noqa: E731
    summary = {
        "source": ["benchmarks/results/patching_4x21.json", "analyses/results/head_report/census.csv"],
        "tokens": bench["tokens"],
        "largest_effect": float(heads["exact"].max()),
        "largest_effect_head": name(heads.head(1))[0],
        "top10_by_effect": name(top_signed),
        "top10_by_effect_induction": name(top_signed[top_signed["label"] == "induction"]),
        "top10_by_abs_effect": name(top_abs),
        "top10_by_abs_effect_induction": name(top_abs[top_abs["label"] == "induction"]),
    }
    write_json(ROOT / "benchmarks/results/patch_default_summary.json", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

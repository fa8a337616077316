"""Fast ablation sweep and exact patching on the default Qwen, timed for side-by-side runs of two code versions.

Run once per version (its ``src`` on PYTHONPATH), alternating, on a quiet machine; ``--compare`` merges the runs:

    sh -c 'for i in 1 2; do for v in old new; do PYTHONPATH=$v/src python bench_engine.py --label $v \
        --out results/engine/$v-$i.json; done; done'
    python benchmarks/bench_engine.py --compare results/engine/*.json --out results/engine_vs_old.json

Timed: ``ablation_sweep`` (fast, zero ablation, corpus loss on 2x16 tokens, layers 0/12/23 = 42 heads),
``ablation_sweep`` on the repeated-token loss (2 x 33 tokens, same layers), and ``activation_patching`` of every
head's z (336 heads) on the induction pair (1 x 17 tokens). Each result's metric column is stored so the two
versions' numbers can be compared.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from headlens.io import write_text


def run(label: str, out: Path, layers: list[int]) -> None:
    from headlens import load_model
    from headlens.interventions.ablation import ablation_sweep, loss_metric, repeat_loss_metric
    from headlens.interventions.patching import activation_patching, induction_pair

    torch.manual_seed(0)
    model = load_model()
    loss = loss_metric(model, n_seqs=2, seq_len=16)
    repeat = repeat_loss_metric(model, n_seqs=2, half_len=16, seed=0)
    pair = induction_pair(model, n_tokens=8, n_seqs=1, seed=0)
    ablation_sweep(model, loss, layers=[model.cfg.n_layers - 1], progress=False)  # warm-up
    result = {"label": label, "threads": torch.get_num_threads(), "layers": layers}
    for name, fn in [
        ("ablation_loss", lambda: ablation_sweep(model, loss, layers=layers, batch_size=28, progress=False)),
        ("ablation_repeat", lambda: ablation_sweep(model, repeat, layers=layers, batch_size=28, progress=False)),
        ("patching_z", lambda: activation_patching(model, pair, activation="z", runs_per_pass=32, progress=False)),
    ]:
        start = time.perf_counter()
        table = fn().table  # SweepResult / PatchingResult
        result[f"{name}_s"] = round(time.perf_counter() - start, 2)
        result[f"{name}_metric"] = [float(v) for v in table["metric"]]
        print(f"{label} {name}: {result[f'{name}_s']} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result) + "\n")


def compare(paths: list[Path], out: Path) -> None:
    runs = [json.loads(p.read_text()) for p in paths]
    summary = {"runs": len(runs), "files": [p.name for p in paths]}
    for name in ("ablation_loss", "ablation_repeat", "patching_z"):
        times = {lab: [r[f"{name}_s"] for r in runs if r["label"] == lab] for lab in ("old", "new")}
        ref = next(r for r in runs if r["label"] == "old")[f"{name}_metric"]
        delta = max(max(abs(a - b) for a, b in zip(r[f"{name}_metric"], ref)) for r in runs)
        summary[name] = {
            "old_s": times["old"],
            "new_s": times["new"],
            "old_over_new_min": round(min(times["old"]) / min(times["new"]), 3),
            "n_units": len(ref),
            "max_abs_metric_delta_vs_old": delta,
        }
    write_text(out, json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="new")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, nargs="*", default=[0, 12, 23])
    parser.add_argument("--compare", type=Path, nargs="*", help="merge these run files into --out")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare, args.out)
    else:
        run(args.label, args.out, args.layers)

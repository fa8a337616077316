"""Exact per-head patching: headlens vs TransformerLens' patching functions; attribution vs exact.

Default Qwen, the built-in induction pair (short sequences), patching every head's output (``hook_z``,
all positions):

1. headlens ``activation_patching`` vs TransformerLens ``get_act_patch_attn_head_out_all_pos`` on the heads
   of a spread of layers (TL runs one full forward per head, so all 336 heads would take ~10 minutes on
   this shared CPU); both must give equal numbers. The layers are spread so that the mean depth
   headlens restarts from matches the whole model's.
2. headlens exact patching of all heads vs attribution patching of all heads: time and Spearman rank
   correlation (all heads, and the top-20 by |exact effect|).

    flock /tmp/headlens-qwen.lock python benchmarks/bench_patching.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
import transformer_lens.patching as tl_patching

from headlens import load_model
from headlens.interventions.attribution import attribution_patching, rank_correlation
from headlens.interventions.patching import activation_patching, induction_pair
from headlens.io import write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--n-tokens", type=int, default=8, help="length of the repeated half")
    parser.add_argument("--n-seqs", type=int, default=1, help="sequences in the induction pair")
    parser.add_argument("--runs-per-pass", type=int, default=32, help="patched runs per forward (headlens)")
    parser.add_argument(
        "--tl-layers", default="0,8,16,23", help="layers whose heads TransformerLens patches ('all' for every layer)"
    )
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "patching.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(L)) if args.tl_layers == "all" else [int(x) % L for x in args.tl_layers.split(",")]
    pair = induction_pair(model, n_tokens=args.n_tokens, n_seqs=args.n_seqs, seed=0)

    start = time.perf_counter()
    ours_subset = activation_patching(
        model, pair, activation="z", layers=layers, runs_per_pass=args.runs_per_pass, progress=False
    ).table
    t_ours_subset = time.perf_counter() - start

    start = time.perf_counter()
    _, clean_cache = model.run_with_cache(pair.clean, names_filter=lambda n: n.endswith("hook_z"))
    index = pd.DataFrame([(layer, head) for layer in layers for head in range(H)], columns=["layer", "head"])
    theirs = tl_patching.generic_activation_patch(
        model,
        pair.corrupted,
        clean_cache,
        pair.metric_logits,
        tl_patching.layer_head_vector_patch_setter,
        "z",
        index_df=index,
    )
    t_tl = time.perf_counter() - start
    max_diff = float((torch.tensor(ours_subset["metric"].to_numpy()) - theirs.cpu()).abs().max())

    start = time.perf_counter()
    exact_result = activation_patching(model, pair, activation="z", runs_per_pass=args.runs_per_pass, progress=False)
    t_exact = time.perf_counter() - start
    start = time.perf_counter()
    attr = attribution_patching(model, pair, activations=["z"]).table
    t_attr = time.perf_counter() - start
    exact = exact_result.table

    ranked = exact.assign(attribution=attr["effect"].to_numpy()).reindex(
        exact["effect"].abs().sort_values(ascending=False).index
    )
    results = {
        "model": model.cfg.model_name,
        "device": str(model.cfg.device),
        "threads": torch.get_num_threads(),
        "tokens": list(pair.clean.shape),
        "clean_metric": exact_result.clean,
        "corrupted_metric": exact_result.corrupted,
        "tl_comparison_layers": layers,
        "tl_comparison_heads": len(index),
        "transformerlens_exact_s": t_tl,
        "headlens_exact_same_heads_s": t_ours_subset,
        "exact_speedup_vs_transformerlens": t_tl / t_ours_subset,
        "exact_max_abs_diff_vs_transformerlens": max_diff,
        "all_heads": L * H,
        "headlens_exact_all_heads_s": t_exact,
        "attribution_all_heads_s": t_attr,
        "attribution_speedup_vs_exact": t_exact / t_attr,
        "spearman_all": rank_correlation(exact["effect"], attr["effect"]),
        f"spearman_top{args.top_k}": rank_correlation(exact["effect"], attr["effect"], top_k=args.top_k),
        "top_heads": [
            {
                "layer": int(r.layer),
                "head": int(r.head),
                "exact": round(float(r.effect), 4),
                "attribution": round(float(r.attribution), 4),
            }
            for r in ranked.head(args.top_k).itertuples()
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(
        f"{model.cfg.model_name}, induction pair tokens {tuple(pair.clean.shape)}, {torch.get_num_threads()} thread(s)"
    )
    print(f"exact patching of hook_z, {len(index)} heads (layers {layers}):")
    print(f"  TransformerLens generic_activation_patch (= get_act_patch_attn_head_out_all_pos)  {t_tl:8.2f} s")
    print(
        f"  headlens activation_patching   {t_ours_subset:8.2f} s   {t_tl / t_ours_subset:5.1f}x faster, max |diff| {max_diff:.1e}"
    )
    print(f"all {L * H} heads:")
    print(f"  headlens exact patching        {t_exact:8.2f} s")
    print(f"  headlens attribution patching  {t_attr:8.2f} s   {t_exact / t_attr:5.1f}x faster than exact")
    print(
        f"  Spearman(exact, attribution): all heads {results['spearman_all']:.3f}, top-{args.top_k} {results[f'spearman_top{args.top_k}']:.3f}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

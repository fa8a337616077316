"""Exact per-head patching: headlens vs TransformerLens' patching functions; attribution vs exact.

Runs on the default Qwen with the built-in induction pair (short sequences), patching every head's
output (``hook_z``, all positions). Checks both exact methods give equal numbers, then times
attribution patching and reports its Spearman rank correlation with exact patching.

    flock /tmp/headlens-qwen.lock python benchmarks/bench_patching.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformer_lens.patching as tl_patching

from headlens import load_model
from headlens.patching import activation_patching, attribution_patching, induction_pair, rank_correlation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--n-tokens", type=int, default=8, help="length of the repeated half")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="patched runs per forward (headlens)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "patching.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    pair = induction_pair(model, n_tokens=args.n_tokens, batch=args.batch, seed=0)
    n_heads = model.cfg.n_layers * model.cfg.n_heads

    start = time.perf_counter()
    ours = activation_patching(model, pair, activation="z", batch_size=args.batch_size, progress=False)
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    _, clean_cache = model.run_with_cache(pair.clean)
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(model, pair.corrupted, clean_cache, pair.metric_logits)
    t_tl = time.perf_counter() - start
    max_diff = float((torch.tensor(ours["metric"].to_numpy()).view_as(theirs) - theirs.cpu()).abs().max())

    start = time.perf_counter()
    attr = attribution_patching(model, pair, activations=["z"])
    t_attr = time.perf_counter() - start

    results = {
        "model": model.cfg.model_name,
        "device": str(model.cfg.device),
        "threads": torch.get_num_threads(),
        "tokens": list(pair.clean.shape),
        "heads_patched": n_heads,
        "clean_metric": ours.attrs["clean_metric"],
        "corrupted_metric": ours.attrs["corrupted_metric"],
        "transformerlens_exact_s": t_tl,
        "headlens_exact_s": t_ours,
        "exact_speedup_vs_transformerlens": t_tl / t_ours,
        "exact_max_abs_diff_vs_transformerlens": max_diff,
        "attribution_s": t_attr,
        "attribution_speedup_vs_headlens_exact": t_ours / t_attr,
        "spearman_all": rank_correlation(ours["effect"], attr["effect"]),
        f"spearman_top{args.top}": rank_correlation(ours["effect"], attr["effect"], top=args.top),
        "top_heads_exact": [
            {"layer": int(r.layer), "head": int(r.head), "effect": float(r.effect)}
            for r in ours.reindex(ours["effect"].abs().sort_values(ascending=False).index).head(10).itertuples()
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"exact patching of {n_heads} heads, tokens {tuple(pair.clean.shape)}:")
    print(f"  TransformerLens get_act_patch_attn_head_out_all_pos  {t_tl:8.2f} s")
    print(f"  headlens activation_patching                         {t_ours:8.2f} s   ({t_tl / t_ours:.1f}x faster, max |diff| {max_diff:.2e})")
    print(f"  headlens attribution_patching                        {t_attr:8.2f} s   ({t_ours / t_attr:.0f}x faster than exact)")
    print(f"  Spearman(exact, attribution): all {results['spearman_all']:.3f}, top-{args.top} {results[f'spearman_top{args.top}']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

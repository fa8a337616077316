"""Single-head ablation sweep on the default Qwen: the fast exact sweep vs the naive L·H loop, side by side.

naive: one full forward per head from layer 0 with a hook on hook_z (24 x 14 = 336 forwards).
fast:  resid_pre of each layer cached once; each layer's 14 ablations restart there
       (start_at_layer) stacked along the batch in one pass (24 passes of 14x the batch).
Both give the same table; we report the wall-clock ratio and max |delta metric|.

Run (holds the shared Qwen lock):  flock /tmp/headlens-qwen.lock python benchmarks/bench_ablation.py
Writes benchmarks/results/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from headlens import load_model
from headlens.interventions.ablation import ablation_sweep, loss_metric
from headlens.io import write_text

OUT = Path(__file__).resolve().parent / "results" / "ablation.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--n-seqs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--method", default="zero", choices=["zero", "mean", "resample"])
    parser.add_argument("--batch-size", type=int, default=28, help="max sequences per stacked pass (fast sweep)")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="sweep only these layers (default: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - t0
    metric = loss_metric(model, n_seqs=args.n_seqs, seq_len=args.seq_len)
    common = dict(method=args.method, layers=args.layers, progress=True)

    ablation_sweep(model, metric, layers=[model.cfg.n_layers - 1], progress=False)  # warm-up
    t0 = time.perf_counter()
    fast = ablation_sweep(model, metric, strategy="fast", batch_size=args.batch_size, **common).table
    fast_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = ablation_sweep(model, metric, strategy="naive", **common).table
    naive_s = time.perf_counter() - t0

    delta = float((fast.metric - naive.metric).abs().max())
    result = {
        "model": args.model,
        "metric": "next-token loss on the corpus",
        "method": args.method,
        "tokens": [args.n_seqs, args.seq_len],
        "layers": args.layers or "all",
        "n_heads_swept": len(fast),
        "batch_size": args.batch_size,
        "naive_s": round(naive_s, 2),
        "fast_s": round(fast_s, 2),
        "speedup": round(naive_s / fast_s, 2),
        "max_abs_delta": delta,
        "clean_loss": float(fast["clean"].iloc[0]),
        "max_effect": float(fast.effect.abs().max()),
        "load_s": round(load_s, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads (shared 2-core box)",
    }
    print(
        f"naive {naive_s:.1f} s   fast {fast_s:.1f} s   speedup x{naive_s / fast_s:.2f}   max|Δ| {delta:.2e}   "
        f"({len(fast)} heads, tokens {args.n_seqs}x{args.seq_len}, {args.method} ablation)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

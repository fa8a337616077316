"""AtP* vs plain attribution patching vs exact patching on the default Qwen, 4x61 induction pair.

Exact activation patching of every head's output (``hook_z``) is the ground truth. Its table is saved once
to ``results/atp_exact_4x61.csv`` (with the induction pair's token hash) and reused while the pair is the
same; ``--recompute`` (or a changed pair) regenerates it. Reported per estimator: wall time, speed-up over
exact, recall of the exact top-k by |effect| within the estimator's top-2k, Pearson and Spearman.

    /work/bin/qwen-slot --all python benchmarks/bench_atp.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import pandas as pd
import torch

from headlens import load_model
from headlens.patching import activation_patching, induction_pair

RESULTS = Path(__file__).parent / "results"


def token_hash(pair) -> str:
    data = torch.cat([pair.clean, pair.corrupted]).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def exact_table(model, pair, path: Path, recompute: bool) -> tuple[pd.DataFrame, float | None]:
    """The exact patching table (cached in ``path`` with its pair hash); returns it and its wall time if computed."""
    meta = path.with_suffix(".json")
    if not recompute and path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("pair_hash") == token_hash(pair) and info.get("model") == model.cfg.model_name:
            return pd.read_csv(path), info["seconds"]
    start = time.perf_counter()
    exact = activation_patching(model, pair, activation="z", batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    exact.to_csv(path, index=False)
    meta.write_text(
        json.dumps(
            {
                "model": model.cfg.model_name,
                "pair_hash": token_hash(pair),
                "seconds": seconds,
                "threads": torch.get_num_threads(),
                "clean_metric": exact.attrs["clean_metric"],
                "corrupted_metric": exact.attrs["corrupted_metric"],
            },
            indent=2,
        )
        + "\n"
    )
    return exact, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recompute", action="store_true", help="recompute the exact table even if it is cached")
    parser.add_argument("--exact-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    pair = induction_pair(model, n_tokens=30, batch=4, seed=0)
    exact, t_exact = exact_table(model, pair, RESULTS / "atp_exact_4x61.csv", args.recompute)
    print(f"exact: {t_exact:.1f} s")
    if args.exact_only:
        return


if __name__ == "__main__":
    main()

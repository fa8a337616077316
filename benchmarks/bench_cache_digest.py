"""What checking the weight cache's content digests costs on the default Qwen's cached load (issue 27).

Each run is a fresh process (imports included, as a user's `headlens` command) that loads the default Qwen from
the cache; the time spent hashing the cached tensors against the digests written when the cache file was built is
measured inside the same run. With ``--baseline-src DIR`` (a checkout of the code before the digests, e.g.
``git worktree add /tmp/base <commit>``) the same load by that code alternates with the new one, so both sides see the
same machine. Run it under the lock: ``flock /tmp/hl/qwen.lock python benchmarks/bench_cache_digest.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from headlens.io import write_text

SRC = str(Path(__file__).resolve().parents[1] / "src")
NEW = """
import time, json
t0 = time.perf_counter()
import headlens.models as m
spent = []
digests = m.tensor_digests
def timed(tensors):
    t = time.perf_counter(); out = digests(tensors); spent.append(time.perf_counter() - t); return out
m.tensor_digests = timed
model = m.load_model()
total = time.perf_counter() - t0
t = time.perf_counter(); m.check_weights(model, "qwen"); finite = time.perf_counter() - t
print(json.dumps({"load_s": total, "verify_s": sum(spent), "weights_check_s": finite}))
"""
OLD = """
import time, json
t0 = time.perf_counter()
import headlens
headlens.load_model()
print(json.dumps({"load_s": time.perf_counter() - t0}))
"""


def run(code: str, src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-src", help="src/ of the code before the cache digests")
    args = parser.parse_args()
    start, load = time.perf_counter(), os.getloadavg()[0]
    warm = run(NEW, SRC)  # a cache file from before the digests is rebuilt once, with them; warms the page cache
    new, old = [], []
    for _ in range(args.runs):
        new.append(run(NEW, SRC))
        if args.baseline_src:
            old.append(run(OLD, args.baseline_src))
    result = {
        "what": "default Qwen, cached load in a fresh process (imports included), quiet machine",
        "runs": args.runs,
        "warm_up_load_s": round(warm["load_s"], 2),
        "cached_load_s": [round(r["load_s"], 2) for r in new],
        "of_which_digest_check_s": [round(r["verify_s"], 2) for r in new],
        "weights_finite_check_s (after the load, also part of it)": [round(r["weights_check_s"], 2) for r in new],
        "median_cached_load_s": round(statistics.median(r["load_s"] for r in new), 2),
        "median_digest_check_s": round(statistics.median(r["verify_s"] for r in new), 2),
    }
    if old:
        result["baseline_cached_load_s"] = [round(r["load_s"], 2) for r in old]
        result["median_baseline_cached_load_s"] = round(statistics.median(r["load_s"] for r in old), 2)
    result["load_average_1min"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    result["bench_wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "cache_digest.json"
    write_text(out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

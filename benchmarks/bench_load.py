"""Load time of the default Qwen: first load (assemble + sha256 + dequantize + cache) and cached load.

Each phase runs in a fresh process against an empty temporary cache, so the figures are what a
user sees on a fresh machine. Targets (issue 3): cached load <= 10 s, first load <= 90 s.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from headlens.io import write_text

LOAD = "import time; t = time.perf_counter(); import headlens; headlens.load_model(); print(time.perf_counter() - t)"


def timed_load(cache: str) -> float:
    env = dict(os.environ, HEADLENS_CACHE=cache, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="headlens-bench-") as cache:
        first = timed_load(cache)
        cached = [timed_load(cache) for _ in range(3)]
    result = {
        "first_load_s": round(first, 1),
        "cached_load_s": round(min(cached), 1),
        "cached_runs_s": [round(c, 1) for c in cached],
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "load.json"
    write_text(out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Time, peak memory and disk of the main command, `headlens census` on the default Qwen, as a user runs it.

Each run is a fresh process under `/usr/bin/time -v` (wall time, peak resident memory of the process),
with the dequantized weights already cached. Disk: the weight cache (~/.cache/headlens or $HEADLENS_CACHE)
and the output directory. Run it with nothing else on the machine; the spread of the runs is reported with the
median, and the load average before and after.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from headlens.io import write_text

RUNS = int(os.environ.get("RUNS", "3"))
RESULT = os.environ.get("RESULT", "cli_census.json")  # file name under benchmarks/results/
EXTRA = os.environ.get("EXTRA", "").split()  # extra census options, e.g. --no-causal


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_census(out: Path) -> dict:
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "headlens.cli",
        "census",
        "--out",
        str(out),
        "--no-progress",
        *EXTRA,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", run.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    cpu = float(re.search(r"User time \(seconds\): (\S+)", run.stderr).group(1))
    cpu += float(re.search(r"System time \(seconds\): (\S+)", run.stderr).group(1))
    return {
        "wall_s": round(seconds, 1),
        "cpu_s": round(cpu, 1),
        "max_rss_gb": round(rss_kb * 1024 / 1e9, 2),
        "output_bytes": du(out),
    }


def main() -> None:
    from headlens.models import cache_dir

    runs = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="headlens-census-") as tmp:
        for i in range(RUNS):
            runs.append(timed_census(Path(tmp) / f"run{i}"))
    cache = cache_dir()
    result = {
        "command": " ".join(["headlens census --out DIR --no-progress", *EXTRA])
        + " (default Qwen2.5-Coder-0.5B-Instruct, fp32, CPU, weights cached)",
        "runs": runs,
        "wall_s_median": statistics.median(r["wall_s"] for r in runs),
        "wall_s_range": [min(r["wall_s"] for r in runs), max(r["wall_s"] for r in runs)],
        "max_rss_gb_median": statistics.median(r["max_rss_gb"] for r in runs),
        "max_rss_gb_range": [min(r["max_rss_gb"] for r in runs), max(r["max_rss_gb"] for r in runs)],
        "weight_cache_gb": round(du(cache) / 1e9, 2),
        "weight_cache_entries_gb": {e.name: round(du(e) / 1e9, 2) for e in sorted(cache.iterdir()) if e.is_dir()},
        "output_mb": round(statistics.median(r["output_bytes"] for r in runs) / 1e6, 1),
        "cpu_count": os.cpu_count(),
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "note": (
            "load_average_1min: before the first run and after the last; a value near the core count before the"
            " first run means other jobs shared the cores (cpu_s is the process's own CPU time)"
        ),
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / RESULT
    write_text(out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

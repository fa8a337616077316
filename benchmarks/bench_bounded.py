"""Bounded resources on the default Qwen (issue 27): peak memory of exact patching on a 14-token pair, and time and
peak memory of `headlens compare --no-census` against the shipped LoRA adapter.

Every measurement is a fresh process (imports and the cached load included where the command includes them):

- ``patch``: the library's exact z patching of all 336 heads on one 14-token prompt pair; peak resident memory of the
  whole process and of the patching alone (the kernel's high-water mark, reset after the load through
  ``/proc/self/clear_refs``). Also the command as a user runs it, ``headlens patch --clean ... --corrupted ...``,
  under ``/usr/bin/time -v`` (wall time, peak resident memory).
- ``compare``: ``headlens compare --base qwen --tuned analyses/results/lora_finetune/adapter --no-census`` under
  ``/usr/bin/time -v``.

``--baseline-src DIR`` (``src/`` of the code before, e.g. a ``git worktree``) runs the same measurements with that
code, alternating with the new one. Run it under the lock, nothing else on the machine:
``flock /tmp/hl/qwen.lock python benchmarks/bench_bounded.py --part patch``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from headlens.io import write_text

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
ADAPTER = ROOT / "analyses" / "results" / "lora_finetune" / "adapter"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
PATCH = f"""
import json, time
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024 / 1e9
import torch, headlens
from headlens.interventions.patching import activation_patching, text_pair
model = headlens.load_model()
pair = text_pair(model, {CLEAN!r}, {CORRUPTED!r})
assert pair.clean.shape[1] == 14, pair.clean.shape
load_peak, after_load = status("VmHWM"), status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: what follows is the patching's
start = time.perf_counter()
result = activation_patching(model, pair, activation="z", progress=False)
print(json.dumps({{"seconds": time.perf_counter() - start, "rss_after_load_gb": after_load, "load_peak_gb": load_peak,
                  "patching_peak_gb": status("VmHWM"), "n_heads": len(result.table),
                  "top_effect": float(result.table.effect.abs().max())}}))
"""


def python(code: str, src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_command(args: list[str], src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1")
    run = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "headlens.cli", *args], capture_output=True, text=True, env=env
    )
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", run.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    return {"wall_s": round(seconds, 1), "max_rss_gb": round(rss_kb * 1024 / 1e9, 2)}


def summary(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"median": round(statistics.median(values), 2), "range": [round(min(values), 2), round(max(values), 2)]}


def one_patch(src: str, tmp: Path, i: int, command: bool = False) -> tuple[dict, dict | None]:
    library = python(PATCH, src)
    if not command:
        return library, None
    args = ["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--activations", "z", "-o", str(tmp / f"p{i}")]
    return library, timed_command([*args, "--no-progress"], src)


def one_compare(src: str, tmp: Path, i: int, command: bool = True) -> dict:
    """``headlens compare --no-census`` as a user runs it (``command`` is always true here)."""
    args = ["compare", "--tuned", str(ADAPTER), "--no-census", "-o", str(tmp / f"c{i}"), "--no-progress"]
    return timed_command(args, src)


def report(part: str, runs: list) -> dict:
    if part == "compare":
        return {"runs": runs, "wall_s": summary(runs, "wall_s"), "max_rss_gb": summary(runs, "max_rss_gb")}
    library, command = [r[0] for r in runs], [r[1] for r in runs if r[1] is not None]
    result = {
        "library_exact_z_all_heads": library,
        "patching_peak_gb": summary(library, "patching_peak_gb"),
        "load_peak_gb": summary(library, "load_peak_gb"),
        "patching_s": summary(library, "seconds"),
    }
    if command:
        result["command (census, attribution atp* + exact z, cached load)"] = command
        result["command_max_rss_gb"] = summary(command, "max_rss_gb")
        result["command_wall_s"] = summary(command, "wall_s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("patch", "compare"), required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--command", action="store_true", help="patch: also time `headlens patch` (runs a census)")
    parser.add_argument("--baseline-src", help="src/ of the code before, measured alternately with the new code")
    args = parser.parse_args()
    one = one_patch if args.part == "patch" else one_compare
    sources = {"new": SRC, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    start, load = time.perf_counter(), os.getloadavg()[0]
    runs: dict[str, list] = {name: [] for name in sources}
    with tempfile.TemporaryDirectory(prefix="headlens-bench-") as tmp:
        for i in range(args.runs):
            for name, src in sources.items():
                runs[name].append(one(src, Path(tmp), i, args.command))
    result = {"part": args.part, "cpu_count": os.cpu_count(), **{n: report(args.part, r) for n, r in runs.items()}}
    result["load_average_1min"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    result["bench_wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    name = {"patch": "patch_memory.json", "compare": "compare_no_census.json"}[args.part]
    write_text(Path(__file__).parent / "results" / name, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

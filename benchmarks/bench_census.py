"""Census cost on the default Qwen: wall time against a plain forward over the same tokens, and peak memory.

Run with nothing else on the machine: ``.venv/bin/python benchmarks/bench_census.py --repeats 2``

1. Time. The default census (probes of ``default_probes``, batch_size 8) against plain forwards
   ``model(tokens)`` of the very same token batches (same batch split), alternated ``--repeats`` times;
   the best of each is compared. The census reads its weights-only scores from ``$HEADLENS_CACHE/scores``
   (the memory step's census stores them first; ``copying_s`` is what computing the copying score costs),
   and it is also compared with a forward that stops where the census stops (at the last block's
   attention pattern: no last attention output, MLP or unembedding): that ratio is the hooks' own cost.
2. Memory at 2048 tokens, batch 1. Peak resident memory above the loaded model: after loading,
   ``malloc_trim`` and a reset of the kernel's peak counter (``/proc/self/clear_refs`` = 5, which
   resets VmHWM), we read VmRSS as the baseline, run the step, and read VmHWM (peak RSS) again.
   The weights are paged in first (the cached model is memory-mapped: a warm-up forward and the
   copying score touch every weight), so the figure is activations and temporaries only.
   Measured for a census of one 2048-token natural-text sequence (the probe kind with the most
   reductions, entropy included) and for one plain 2048-token forward. A full pattern cache, the
   naive way, is given by arithmetic (layers x heads x 2048^2 x 4 bytes) rather than allocated.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

from headlens import load_model
from headlens.census import run_census
from headlens.census.ov import CENSUS_COPY_SAMPLE, copying_scores
from headlens.data.probes import ProbeSet, corpus_sections, default_probes, natural_text
from headlens.io import write_text

RESULTS = Path(__file__).parent / "results" / "census.json"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_over_baseline(step) -> tuple[float, float]:
    """(seconds, peak RSS above the RSS just before ``step``, in bytes)."""
    base = _reset_peak()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start, _status("VmHWM") - base


class _Stop(Exception):
    pass


def _stop(pattern, hook):
    raise _Stop


def plain_forward(model, probes: ProbeSet, batch_size: int, to_last_pattern: bool = False) -> None:
    """Forwards over the census's batches: whole, or stopped where the census stops (the last layer's pattern)."""
    hooks = [(f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern", _stop)] if to_last_pattern else []
    with torch.inference_mode():
        for probe in probes:
            for start in range(0, probe.n_seqs, batch_size):
                try:
                    model.run_with_hooks(probe.tokens[start : start + batch_size], fwd_hooks=hooks)
                except _Stop:
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mem-tokens", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - t0
    L, H = model.cfg.n_layers, model.cfg.n_heads

    copying_scores(model, n=CENSUS_COPY_SAMPLE)
    with torch.inference_mode():
        model(torch.arange(16)[None] + 1000)
    rss_model = _status("VmRSS")

    prose = corpus_sections()["prose"]
    long_text = prose * (1 + args.mem_tokens // max(1, len(model.tokenizer(prose)["input_ids"])))
    long_probe = ProbeSet(natural=natural_text(model, text=long_text, seq_len=args.mem_tokens, n_seqs=1))
    mem_census_s, mem_census = peak_over_baseline(lambda: run_census(model, long_probe, batch_size=1, progress=False))
    mem_forward_s, mem_forward = peak_over_baseline(lambda: plain_forward(model, long_probe, 1))

    start = time.perf_counter()
    probes = default_probes(model, seed=0)
    probes_s = time.perf_counter() - start
    copy_s = min(peak_over_baseline(lambda: copying_scores(model, n=CENSUS_COPY_SAMPLE))[0] for _ in range(2))
    census_runs, forward_runs, trunk_runs = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain_forward(model, probes, args.batch_size)
        forward_runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain_forward(model, probes, args.batch_size, to_last_pattern=True)
        trunk_runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        table = run_census(model, probes, batch_size=args.batch_size, progress=False).table
        census_runs.append(time.perf_counter() - start)
    best_census, best_forward = min(census_runs), min(forward_runs)

    results = {
        "model": args.model,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU fp32",
        "load_s": round(load_s, 2),
        "rss_loaded_model_GB": round(rss_model / 1e9, 3),
        "census_tokens": {p.kind: list(p.tokens.shape) for p in probes},
        "default_probes_s": round(probes_s, 2),
        "census_s_runs": [round(x, 2) for x in census_runs],
        "plain_forward_s_runs": [round(x, 2) for x in forward_runs],
        "census_s": round(best_census, 2),
        "plain_forward_s": round(best_forward, 2),
        "ratio_census_over_forward": round(best_census / best_forward, 3),
        "copying_s": round(copy_s, 2),
        "forward_to_last_pattern_s_runs": [round(x, 2) for x in trunk_runs],
        "ratio_census_over_forward_to_last_pattern": round(best_census / min(trunk_runs), 3),
        "load_average_at_end": list(os.getloadavg()),
        "mem_tokens": args.mem_tokens,
        "census_peak_over_model_GB": round(mem_census / 1e9, 3),
        "census_long_s": round(mem_census_s, 2),
        "plain_forward_peak_over_model_GB": round(mem_forward / 1e9, 3),
        "plain_forward_long_s": round(mem_forward_s, 2),
        "full_pattern_cache_GB_arithmetic": round(L * H * args.mem_tokens**2 * 4 / 1e9, 3),
        "labels": table["label"].value_counts().to_dict(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(
        f"census {best_census:.1f} s vs plain forward {best_forward:.1f} s: ratio {results['ratio_census_over_forward']:.2f}x "
        f"(copying {copy_s:.1f} s of it); peak over model at {args.mem_tokens} tokens: census {mem_census / 1e9:.2f} GB, "
        f"plain forward {mem_forward / 1e9:.2f} GB, full pattern cache {results['full_pattern_cache_GB_arithmetic']:.1f} GB"
    )


if __name__ == "__main__":
    main()

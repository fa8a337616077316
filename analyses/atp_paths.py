"""Why attribution patching misses L3H0, L8H7 and L9H8 on the 4x61 induction pair: the paths their effect takes.

For each head, exact patching of its clean output (``hook_z``) into the corrupted run, and the same patch with
(a) only first-half or only second-half positions patched, (b) the attention patterns of a range of later
layers frozen at their corrupted values. What survives freezing goes through values and MLPs (paths that a
linear estimate sees); what freezing removes goes through later attention patterns, which first-order AtP
linearises and AtP*'s key fix recomputes for one hop only (``benchmarks/results/atp_4x61.json``).

    python analyses/atp_paths.py        # ~2 min on 2 CPU cores

Writes analyses/results/atp_paths/paths.json (effects in nats of the pair's metric and as a share of
clean - corrupted, the ``effect`` of ``headlens.activation_patching``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformer_lens import utils

from headlens import load_model
from headlens.interventions.patching import induction_pair
from headlens.io import write_json

OUT = Path(__file__).resolve().parent / "results" / "atp_paths"
HEADS = ((3, 0), (8, 7), (9, 8))


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = load_model()
    pair = induction_pair(model, n_tokens=30, n_seqs=4, seed=0)
    L = model.cfg.n_layers
    keep = lambda name: name.endswith("hook_z") or name.endswith("hook_pattern")  # noqa: E731
    with torch.inference_mode():
        clean_logits, clean = model.run_with_cache(pair.clean, names_filter=keep)
        corrupted_logits, corrupted = model.run_with_cache(pair.corrupted, names_filter=keep)
    metric = lambda logits: float(pair.metric(logits[:, pair.positions]))  # noqa: E731
    m_clean, m_corrupted = metric(clean_logits), metric(corrupted_logits)
    half = pair.info["prefix"] + pair.info["n_tokens"]
    n = pair.clean.shape[1]

    def patched(layer, head, positions=range(n), frozen=()):
        def patch(z, hook):
            z[:, list(positions), head] = clean[hook.name][:, list(positions), head]
            return z

        hooks = [(utils.get_act_name("z", layer), patch)]
        hooks += [(utils.get_act_name("pattern", f), lambda p, hook: corrupted[hook.name]) for f in frozen]
        with torch.inference_mode():
            value = metric(model.run_with_hooks(pair.corrupted, fwd_hooks=hooks))
        return {
            "nats": round(value - m_corrupted, 4),
            "effect": round((value - m_corrupted) / (m_clean - m_corrupted), 4),
        }

    rows = {}
    for layer, head in HEADS:
        rows[f"L{layer}H{head}"] = {
            "all positions": patched(layer, head),
            "first half only (positions < %d)" % half: patched(layer, head, range(half)),
            "second half only": patched(layer, head, range(half, n)),
            "later patterns frozen (layers %d-%d)" % (layer + 1, L - 1): patched(
                layer, head, frozen=range(layer + 1, L)
            ),
            "patterns of layers 16-23 frozen": patched(layer, head, frozen=range(16, L)),
            "patterns of layers %d-15 frozen" % (layer + 1): patched(layer, head, frozen=range(layer + 1, 16)),
        }
        print(f"L{layer}H{head}", json.dumps(rows[f"L{layer}H{head}"]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(
        OUT / "paths.json",
        {
            "model": model.cfg.model_name,
            "pair": {**pair.info, "tokens": list(pair.clean.shape)},
            "clean_metric": m_clean,
            "corrupted_metric": m_corrupted,
            "heads": rows,
            "seconds": round(time.perf_counter() - start, 1),
        },
    )


if __name__ == "__main__":
    main()

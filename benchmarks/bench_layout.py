"""The MLP weight layout (headlens.models.linear_layout) against TransformerLens' own, on the default Qwen.

TransformerLens' GatedMLP multiplies by ``W.T.contiguous()`` and its attention by rearranged copies of W_Q and W_O:
with the weights stored as TL stores them that copies five matrices per block per forward. headlens stores them in
the layout that makes the copies free (headlens.models.linear_layout). One
process, one model, the two layouts alternated (ABAB...): forward time to the final residual stream on a few token
shapes, and the check that the logits are bit-identical. Run it alone: ``flock /tmp/hl/qwen.lock python
benchmarks/bench_layout.py``; writes benchmarks/results/layout.json.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

import headlens
from headlens.io import write_text
from headlens.models import linear_layout

OUT = Path(__file__).resolve().parent / "results" / "layout.json"
SHAPES = [(1, 14), (2, 65), (2, 128), (8, 128)]
REPEATS = 5


def tl_layout(model) -> None:
    """TransformerLens' layout: every weight contiguous in the shape TL gives it."""
    with torch.no_grad():
        for block in model.blocks:
            for module, names in ((block.mlp, ("W_gate", "W_in", "W_out")), (block.attn, ("W_Q", "W_O"))):
                for name in names:
                    w = getattr(module, name)
                    setattr(module, name, torch.nn.Parameter(w.contiguous(), requires_grad=False))


def forward_s(model, tokens) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(tokens, stop_at_layer=model.cfg.n_layers)
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    model = headlens.load_model()
    probe = torch.randint(0, model.cfg.d_vocab, (2, 64))
    with torch.inference_mode():
        ours = model(probe)
        tl_layout(model)
        theirs = model(probe)
    rows = []
    for batch, pos in SHAPES:
        tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos))
        times = {"transformer_lens": [], "headlens": []}
        forward_s(model, tokens)  # warm-up
        for _ in range(REPEATS):
            tl_layout(model)
            times["transformer_lens"].append(forward_s(model, tokens))
            linear_layout(model)
            times["headlens"].append(forward_s(model, tokens))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "batch": batch, "pos": pos,
            "transformer_lens_s": {"median": round(med["transformer_lens"], 4),
                                   "range": [round(min(times["transformer_lens"]), 4), round(max(times["transformer_lens"]), 4)]},
            "headlens_s": {"median": round(med["headlens"], 4),
                           "range": [round(min(times["headlens"]), 4), round(max(times["headlens"]), 4)]},
            "speedup": round(med["transformer_lens"] / med["headlens"], 2),
        })  # fmt: skip
        print(rows[-1], flush=True)
    result = {
        "what": "forward to the final residual stream (no unembedding) of the default Qwen (fp32, CPU), TransformerLens' "
        "weight layout vs headlens' (linear_layout: MLP and W_Q, W_O), alternated in one process, median of "
        f"{REPEATS} per layout",
        "logits_bit_identical": bool(torch.equal(ours, theirs)),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "shapes": rows,
    }
    write_text(OUT, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "shapes"}))


if __name__ == "__main__":
    main()

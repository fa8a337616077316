"""Seed 003, experiment 1: why scale attention scores by sqrt(d_k)?

Part A reproduces the user's toy table with random Gaussian queries and keys (entropy vs d_k, with
and without 1/sqrt(d_k)). Part B measures the same thing on the real Qwen2.5-Coder-0.5B: each head's
queries and keys after RoPE (``hook_rot_q``/``hook_rot_k``) on 8 windows of 128 tokens of the packaged
natural-text corpus (``headlens.data.probes.natural_text``, seed 0),
softmaxed with the model's own scale (T=1), without scaling, and at temperatures 0.5 and 2.

Run: ``flock /tmp/headlens-qwen.lock python analyses/seed003_scaling.py`` (about a minute).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from _harness import study_args, write_summary

from headlens.census.attention_stats import query_entropy, scale_entropy_table
from headlens.io import save_figure, write_csv
from headlens.models import DEFAULT_MODEL

OUT = Path(__file__).parent / "results" / "seed003_scaling"
MODEL = DEFAULT_MODEL
SEED = 0
D_KS = [8, 32, 64, 128, 256, 512]
SEQ_LEN = 20
TRIALS = 200
SEED_TABLE = {
    8: (1.50, 2.65),
    32: (0.51, 2.55),
    64: (0.42, 2.54),
    128: (0.25, 2.51),
    256: (0.13, 2.54),
    512: (0.07, 2.56),
}
QWEN_SEQ = 128
QWEN_BATCH = 8


def toy_entropy(d_k: int, *, seq_len: int = SEQ_LEN, trials: int = TRIALS, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Per-trial mean entropy of a full (unmasked) seq_len x seq_len attention with q, k ~ N(0, I_{d_k})."""
    g = torch.Generator().manual_seed(seed * 1000 + d_k)
    q = torch.randn(trials, seq_len, d_k, generator=g)
    k = torch.randn(trials, seq_len, d_k, generator=g)
    scores = q @ k.transpose(1, 2)
    return {
        "unscaled": query_entropy(scores.softmax(-1)).mean(-1),
        "scaled": query_entropy((scores / math.sqrt(d_k)).softmax(-1)).mean(-1),
        "example_unscaled": scores[0, 0].softmax(-1),
        "example_scaled": (scores[0, 0] / math.sqrt(d_k)).softmax(-1),
    }


def part_a() -> pd.DataFrame:
    rows, examples = [], {}
    for d in D_KS:
        r = toy_entropy(d)
        for kind in ("unscaled", "scaled"):
            per_trial = r[kind]
            seed_value = SEED_TABLE[d][0 if kind == "unscaled" else 1]
            lo, hi = per_trial.quantile(0.05).item(), per_trial.quantile(0.95).item()
            rows.append(
                {
                    "d_k": d,
                    "setting": kind,
                    "mean": per_trial.mean().item(),
                    "std": per_trial.std().item(),
                    "q05": lo,
                    "q95": hi,
                    "seed003": seed_value,
                    "seed003_within_q05_q95": lo <= seed_value <= hi,
                }
            )
        examples[d] = (r["example_unscaled"], r["example_scaled"])
    table = pd.DataFrame(rows)
    write_csv(table, OUT / "toy_entropy.csv", float_format="%.4f")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, color in (("unscaled", "tab:red"), ("scaled", "tab:blue")):
        t = table[table.setting == kind]
        ax1.plot(t.d_k, t["mean"], "o-", color=color, label=f"{kind} (mean of {TRIALS} draws)")
        ax1.fill_between(t.d_k, t.q05, t.q95, color=color, alpha=0.2)
        ax1.plot(t.d_k, t.seed003, "x--", color=color, alpha=0.7, label=f"{kind}, seed 003 table")
    ax1.axhline(math.log(SEQ_LEN), color="gray", lw=0.8, ls=":", label=f"uniform: log {SEQ_LEN}")
    ax1.set(
        xscale="log", xlabel="d_k", ylabel="entropy (nats)", title=f"q, k ~ N(0, I), {SEQ_LEN}x{SEQ_LEN} full attention"
    )
    ax1.set_xticks(D_KS, [str(d) for d in D_KS])
    ax1.legend(fontsize=7)
    un, sc = examples[256]
    x = torch.arange(SEQ_LEN)
    ax2.bar(x - 0.2, un, 0.4, color="tab:red", label="unscaled")
    ax2.bar(x + 0.2, sc, 0.4, color="tab:blue", label="scaled by 1/sqrt(d_k)")
    ax2.set(xlabel="key position", ylabel="attention weight", title="one query's attention at d_k = 256")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, OUT / "toy_entropy.png", dpi=120)
    plt.close(fig)
    return table


def part_b() -> tuple[pd.DataFrame, dict]:
    from headlens import load_model
    from headlens.data.probes import natural_text

    t0 = time.time()
    torch.manual_seed(SEED)
    model = load_model(MODEL)
    tokens = natural_text(model, seq_len=QWEN_SEQ, n_seqs=QWEN_BATCH, seed=SEED).tokens
    t1 = time.time()
    table = scale_entropy_table(model, tokens, temperatures=(0.5, 1.0, 2.0), unscaled=True, batch_size=8)
    t2 = time.time()
    write_csv(table, OUT / "qwen_entropy_per_head.csv", float_format="%.5f")
    by_layer = table.pivot_table(index="layer", columns="setting", values="entropy", aggfunc="mean")
    by_layer = by_layer[["unscaled", "T=0.5", "T=1", "T=2"]]
    write_csv(by_layer, OUT / "qwen_entropy_by_layer.csv", index=True, float_format="%.4f")
    norm_by_layer = table.pivot_table(index="layer", columns="setting", values="norm_entropy", aggfunc="mean")
    norm_by_layer = norm_by_layer[["unscaled", "T=0.5", "T=1", "T=2"]]
    write_csv(norm_by_layer, OUT / "qwen_norm_entropy_by_layer.csv", index=True, float_format="%.4f")
    uniform = torch.arange(2, QWEN_SEQ + 1).float().log().mean().item()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    colors = {"unscaled": "tab:red", "T=0.5": "tab:orange", "T=1": "tab:blue", "T=2": "tab:green"}
    for name, color in colors.items():
        label = "T=1 (model's 1/sqrt(64))" if name == "T=1" else name
        axes[0].plot(by_layer.index, by_layer[name], "o-", ms=3, color=color, label=label)
    axes[0].axhline(uniform, color="gray", ls=":", lw=0.8, label="uniform causal")
    axes[0].set(
        xlabel="layer",
        ylabel="mean entropy over heads (nats)",
        title=f"Qwen2.5-Coder-0.5B, {tokens.shape[0]} x {QWEN_SEQ} tokens of natural text",
    )
    axes[0].legend(fontsize=7)
    for ax, name in zip(axes[1:], ("T=1", "unscaled")):
        grid = table[table.setting == name].pivot(index="layer", columns="head", values="entropy")
        im = ax.imshow(grid.values, aspect="auto", cmap="viridis", vmin=0, vmax=uniform)
        ax.set(xlabel="head", ylabel="layer", title=f"per-head entropy, {name}")
        fig.colorbar(im, ax=ax, label="nats")
    fig.tight_layout()
    save_figure(fig, OUT / "qwen_entropy.png", dpi=120)
    plt.close(fig)

    t1_heads = table[table.setting == "T=1"].set_index(["layer", "head"]).entropy
    un_heads = table[table.setting == "unscaled"].set_index(["layer", "head"]).entropy
    facts = {
        "tokens": list(tokens.shape),
        "uniform_causal_entropy": uniform,
        "mean_entropy": {name: float(table[table.setting == name].entropy.mean()) for name in colors},
        "mean_norm_entropy": {name: float(table[table.setting == name].norm_entropy.mean()) for name in colors},
        "unscaled_over_T1_ratio_median": float((un_heads / t1_heads).median()),
        "heads_T1_entropy_below_0.5": int((t1_heads < 0.5).sum()),
        "heads_unscaled_entropy_below_0.5": int((un_heads < 0.5).sum()),
        "n_heads": int(len(t1_heads)),
        "load_s": round(t1 - t0, 1),
        "measure_s": round(t2 - t1, 1),
    }
    return by_layer, facts


def main() -> None:
    global OUT, SEED, MODEL
    args = study_args(__doc__, out=OUT, seed=SEED)
    OUT, SEED, MODEL = args.out, args.seed, args.model
    OUT.mkdir(parents=True, exist_ok=True)
    toy = part_a()
    by_layer, facts = part_b()
    facts["toy"] = {
        "seq_len": SEQ_LEN,
        "trials": TRIALS,
        "seed": SEED,
        "table": toy.pivot(index="d_k", columns="setting", values="mean").round(3).to_dict(),
    }
    write_summary(OUT / "summary.json", facts)
    print(toy.round(3).to_string(index=False))
    print(by_layer.round(3).to_string())
    print(json.dumps({k: v for k, v in facts.items() if k != "toy"}, indent=2))


if __name__ == "__main__":
    main()

"""Seed 003, experiment 3: how different are the heads of a layer, and do GQA siblings attend alike?

Similarity of two heads = similarity of their attention patterns flattened over every visible
(query, key) pair of every sequence; a layer's diversity = the mean over its distinct head pairs.
Three metrics (``headlens.census.attention_stats.pattern_similarity``): ``cosine`` of the raw weights,
``pearson`` (each head's mean removed) and ``centered`` (cosine of the deviations from uniform causal
attention, about 0 for unrelated heads), each with and without the first key (the attention sink).

Part A: random-init multi-head attention (1/2/4/8 heads over d_model 64, 20 tokens, 200 draws),
against the user's table. Part B: Qwen2.5-Coder-0.5B on 8 x 128 tokens of natural text, per layer,
and within vs across GQA groups (q heads 0-6 read kv head 0, 7-13 kv head 1) with an exact
permutation test over all 3432 relabellings per layer, combined over the 24 layers.

Run: ``flock /tmp/headlens-qwen.lock python analyses/seed003_head_diversity.py`` (about a minute).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from _harness import study_args, write_summary

from headlens.census.attention_stats import (
    attention_mask,
    group_contrast_table,
    head_similarity,
    mean_offdiagonal,
    pattern_similarity,
    softmax_pattern,
)
from headlens.io import save_figure, write_csv
from headlens.models import DEFAULT_MODEL

OUT = Path(__file__).parent / "results" / "seed003_head_diversity"
MODEL = DEFAULT_MODEL
SEED = 0
METRICS = ("cosine", "pearson", "centered")
SEED_TABLE = {1: 1.00, 2: 0.12, 4: 0.17, 8: 0.19}
TOY_D_MODEL, TOY_SEQ, TOY_TRIALS = 64, 20, 200
COMBINED_DRAWS = 20_000


def toy_similarity(n_heads: int, *, causal: bool, seed: int = SEED) -> dict[str, float]:
    """Mean head similarity of one random-init attention layer (x ~ N(0, I), W ~ N(0, 1/d_model)), averaged over draws."""
    g = torch.Generator().manual_seed(seed * 100 + n_heads)
    d_head = TOY_D_MODEL // n_heads
    x = torch.randn(TOY_TRIALS, TOY_SEQ, TOY_D_MODEL, generator=g)
    w_q = torch.randn(n_heads, TOY_D_MODEL, d_head, generator=g) / math.sqrt(TOY_D_MODEL)
    w_k = torch.randn(n_heads, TOY_D_MODEL, d_head, generator=g) / math.sqrt(TOY_D_MODEL)
    q = torch.einsum("bpd,hde->bhpe", x, w_q)
    k = torch.einsum("bpd,hde->bhpe", x, w_k)
    mask = attention_mask(TOY_SEQ, "causal" if causal else "full")
    pattern = softmax_pattern(q @ k.transpose(-1, -2) / math.sqrt(d_head), mask=mask)
    return {
        metric: float(
            np.mean(
                [
                    mean_offdiagonal(pattern_similarity(pattern[t : t + 1], metric=metric, mask=mask))
                    for t in range(TOY_TRIALS)
                ]
            )
        )
        for metric in METRICS
    }


def part_a() -> pd.DataFrame:
    rows = []
    for n_heads, seed_value in SEED_TABLE.items():
        for causal in (False, True):
            sims = toy_similarity(n_heads, causal=causal)
            rows.append({"n_heads": n_heads, "mask": "causal" if causal else "full", **sims, "seed003": seed_value})
    table = pd.DataFrame(rows)
    write_csv(table, OUT / "toy_similarity.csv", float_format="%.4f")
    return table


def part_b() -> tuple[pd.DataFrame, pd.DataFrame, dict, dict, list[int]]:
    from headlens import load_model
    from headlens.data.probes import natural_text
    from headlens.heads import kv_heads

    torch.manual_seed(SEED)
    model = load_model(MODEL)
    tokens = natural_text(model, seq_len=128, n_seqs=8, seed=SEED).tokens
    groups = kv_heads(model)
    sims = {}
    for drop in (0, 1):
        for metric, mats in head_similarity(model, tokens, metrics=METRICS, drop_keys=drop, batch_size=8).items():
            sims[(metric, drop)] = mats
    nulls = {}
    named = {metric + ("_nosink" if drop else ""): mats for (metric, drop), mats in sims.items()}
    table = group_contrast_table(named, groups, keep_null=True)
    for name, part in table.groupby("metric", sort=False):
        nulls[name] = list(part["null"])
    by_layer = table.pivot(index="layer", columns="metric", values="mean_similarity")
    gqa = table.drop(columns=["mean_similarity", "null"])
    combined = {}
    rng = np.random.default_rng(SEED)
    for name, layer_nulls in nulls.items():
        g = gqa[gqa.metric == name]
        observed = g.difference.mean()
        draws = np.mean([null[rng.integers(0, len(null), COMBINED_DRAWS)] for null in layer_nulls], axis=0)
        combined[name] = {
            "mean_within": float(g.within.mean()),
            "mean_across": float(g.across.mean()),
            "mean_difference": float(observed),
            "p_value": float(((draws >= observed - 1e-12).sum() + 1) / (COMBINED_DRAWS + 1)),
            "layers_p_below_0.05": int((g.p_value < 0.05).sum()),
            "layers_within_gt_across": int((g.difference > 0).sum()),
        }
    write_csv(by_layer, OUT / "qwen_similarity_by_layer.csv", index=True, float_format="%.4f")
    write_csv(gqa, OUT / "qwen_gqa_within_across.csv", float_format="%.5f")
    pairs = [
        {
            "metric": metric + ("_nosink" if drop else ""),
            "layer": layer,
            "head_a": a,
            "head_b": b,
            "similarity": float(sims[(metric, drop)][layer, a, b]),
        }
        for metric, drop in (("cosine", 0), ("centered", 1))
        for layer in range(len(sims[(metric, drop)]))
        for a in range(len(groups))
        for b in range(len(groups))
    ]
    write_csv(pd.DataFrame(pairs), OUT / "qwen_similarity_matrices.csv", float_format="%.4f")
    return by_layer, gqa, combined, sims, groups


def plot(by_layer: pd.DataFrame, gqa: pd.DataFrame, sims: dict, groups: list[int]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    for name in by_layer.columns:
        axes[0].plot(by_layer.index, by_layer[name], "o-" if "nosink" not in name else "x--", ms=3, label=name)
    axes[0].set(
        xlabel="layer", ylabel="mean pairwise similarity", title=f"head diversity per layer ({len(groups)} heads)"
    )
    axes[0].axhline(0, color="gray", lw=0.6)
    axes[0].legend(fontsize=7)
    g = gqa[gqa.metric == "centered_nosink"]
    axes[1].plot(g.layer, g.within, "o-", ms=3, color="tab:red", label="within GQA group (same kv head)")
    axes[1].plot(g.layer, g.across, "o-", ms=3, color="tab:blue", label="across groups")
    sig = g[g.p_value < 0.05]
    axes[1].scatter(sig.layer, sig.within, s=70, facecolors="none", edgecolors="k", label="exact permutation p < 0.05")
    axes[1].set(
        xlabel="layer", ylabel="mean similarity (centered, no sink)", title="Do q heads sharing a kv head attend alike?"
    )
    axes[1].legend(fontsize=7)
    layer = int(g.sort_values("difference").iloc[-1].layer)
    mat = sims[("centered", 1)][layer].clone()
    n = mat.shape[0]
    limit = float(mat[~torch.eye(n, dtype=torch.bool)].abs().max())
    im = axes[2].imshow(mat, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for boundary in np.flatnonzero(np.diff(groups)) + 0.5:
        axes[2].axhline(boundary, color="k", lw=0.8)
        axes[2].axvline(boundary, color="k", lw=0.8)
    axes[2].set(
        xlabel="q head",
        ylabel="q head",
        title=f"layer {layer}: largest within - across gap\n(centered, no sink; lines = GQA groups)",
    )
    fig.colorbar(im, ax=axes[2])
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    save_figure(fig, OUT / "qwen_head_diversity.png", dpi=120)
    plt.close(fig)


def main() -> None:
    global OUT, SEED, MODEL
    args = study_args(__doc__, out=OUT, seed=SEED)
    OUT, SEED, MODEL = args.out, args.seed, args.model
    OUT.mkdir(parents=True, exist_ok=True)
    toy = part_a()
    by_layer, gqa, combined, sims, groups = part_b()
    plot(by_layer, gqa, sims, groups)
    summary = {
        "tokens": [8, 128],
        "toy": toy.round(4).to_dict(orient="records"),
        "qwen_mean_similarity": by_layer.mean().round(4).to_dict(),
        "qwen_most_diverse_layer_cosine": int(by_layer["cosine"].idxmin()),
        "qwen_least_diverse_layer_cosine": int(by_layer["cosine"].idxmax()),
        "gqa_combined": combined,
    }
    write_summary(OUT / "summary.json", summary)
    print(toy.round(3).to_string(index=False))
    print(by_layer.round(3).to_string())
    print(gqa[gqa.metric.isin(["cosine", "centered_nosink"])].round(4).to_string(index=False))
    print(json.dumps(combined, indent=2))


if __name__ == "__main__":
    main()

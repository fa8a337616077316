"""Seed 003, experiment 2: full, causal and local (window 3) attention masks as patterns.

Each mask is drawn as the pattern it allows when every score is equal (uniform over the visible
keys): a matplotlib PNG and a CircuitsVis ``AttentionPatterns`` page with the JS bundle inlined (opens
offline). Then the real Qwen2.5-Coder-0.5B (causal, no sliding window) is asked how much of its
attention a causal local window of 3 would keep: per head, the attention mass on keys i-3..i
(``headlens.census.scores.local``) on 8 x 128 tokens of natural text.

Run: ``flock /tmp/headlens-qwen.lock python analyses/seed003_masks.py`` (under a minute).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from _harness import study_args, write_summary

from headlens.census.attention_stats import attention_mask, mask_pattern, query_entropy
from headlens.io import save_figure, write_csv, write_text
from headlens.models import DEFAULT_MODEL
from headlens.render.viz import CircuitsVisView, ViewSet, view_props

OUT = Path(__file__).parent / "results" / "seed003_masks"
MODEL = DEFAULT_MODEL
SEED = 0
WINDOW = 3
WORDS = "The cat sat on the mat because it was tired .".split()
KINDS = {
    "full": "full (bidirectional, BERT)",
    "causal": "causal (GPT, Qwen)",
    "local": f"local |i-j| <= {WINDOW} (Longformer band)",
    "local_causal": f"causal local i-{WINDOW} <= j <= i (sliding window)",
}


def mask_table(n: int) -> pd.DataFrame:
    """Per mask: visible (query, key) pairs, their share of n^2, and the mean entropy of the uniform pattern."""
    rows = []
    for kind in KINDS:
        mask = attention_mask(n, kind, window=WINDOW)
        rows.append(
            {
                "mask": kind,
                "n": n,
                "pairs": int(mask.sum()),
                "share_of_full": float(mask.sum()) / n**2,
                "uniform_entropy_nats": float(query_entropy(mask_pattern(n, kind, window=WINDOW)).mean()),
            }
        )
    return pd.DataFrame(rows)


def render(n: int) -> None:
    fig, axes = plt.subplots(1, len(KINDS), figsize=(4.2 * len(KINDS), 4.9))
    for ax, (kind, title) in zip(axes, KINDS.items()):
        ax.imshow(mask_pattern(n, kind, window=WINDOW), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), WORDS, rotation=90, fontsize=8)
        ax.set_yticks(range(n), WORDS, fontsize=8)
        ax.set(xlabel="key", ylabel="query", title=title)
        ax.title.set_fontsize(9)
    fig.suptitle("Attention masks as patterns (uniform over visible keys)")
    fig.tight_layout()
    save_figure(fig, OUT / "masks.png", dpi=110)
    plt.close(fig)

    patterns = torch.stack([mask_pattern(n, kind, window=WINDOW) for kind in KINDS])
    heads = view_props(WORDS, patterns, component="heads", names=list(KINDS))
    heads["maskUpperTri"] = False
    views = ViewSet(
        [
            CircuitsVisView(
                "AttentionPatterns",
                view_props(WORDS, patterns, component="patterns"),
                title="attention_patterns: heads 0-3 = " + ", ".join(KINDS),
            ),
            CircuitsVisView("AttentionHeads", heads, title="attention_heads: one named pattern per mask"),
        ]
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>seed 003 masks</title></head><body>"
        "<p>Each mask drawn as the pattern it allows when all scores are equal. Hover a token to see what it attends to.</p>"
        f"{views.to_html(prefix='masks')}</body></html>"
    )
    write_text(OUT / "masks_circuitsvis.html", page, encoding="utf-8")


def qwen_locality() -> tuple[pd.DataFrame, dict]:
    from headlens import load_model
    from headlens.census.scores import first_token, local
    from headlens.data.probes import natural_text
    from headlens.engine.capture import stream_patterns
    from headlens.heads import kv_heads

    torch.manual_seed(SEED)
    model = load_model(MODEL)
    tokens = natural_text(model, seq_len=128, n_seqs=8, seed=SEED).tokens
    sums = {}

    def reducer(layer, pattern, rows):
        n = pattern.shape[0]
        for name, value in (("local3", local(pattern, WINDOW)), ("first_token", first_token(pattern))):
            sums[(layer, name)] = sums.get((layer, name), 0) + value.double().cpu() * n

    stream_patterns(model, tokens, reducer, batch_size=8)
    groups = kv_heads(model)
    rows = [
        {
            "layer": layer,
            "head": h,
            "kv_head": groups[h],
            "local3": float(sums[(layer, "local3")][h] / tokens.shape[0]),
            "first_token": float(sums[(layer, "first_token")][h] / tokens.shape[0]),
        }
        for layer in range(model.cfg.n_layers)
        for h in range(model.cfg.n_heads)
    ]
    df = pd.DataFrame(rows)
    write_csv(df, OUT / "qwen_local3_per_head.csv", float_format="%.5f")
    uniform = sum(min(WINDOW + 1, i + 1) / (i + 1) for i in range(WINDOW + 1, 128)) / (128 - WINDOW - 1)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    grid = df.pivot(index="layer", columns="head", values="local3")
    im = ax1.imshow(grid.values, aspect="auto", cmap="magma", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax1, label="mass on keys i-3..i")
    ax1.set(xlabel="head", ylabel="layer", title="Qwen: attention kept by a causal window of 3")
    ax2.hist(df.local3, bins=30, color="tab:purple", alpha=0.8, label="local window 3")
    ax2.hist(df.first_token, bins=30, color="tab:gray", alpha=0.5, label="first token (sink)")
    ax2.axvline(uniform, color="k", ls=":", label=f"uniform causal head: {uniform:.3f}")
    ax2.set(xlabel="mean attention mass", ylabel="heads", title="336 heads, 8 x 128 natural-text tokens")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, OUT / "qwen_local3.png", dpi=120)
    plt.close(fig)
    top = df.sort_values("local3", ascending=False).head(5)
    facts = {
        "tokens": list(tokens.shape),
        "uniform_causal_local3": uniform,
        "median_local3": float(df.local3.median()),
        "mean_local3": float(df.local3.mean()),
        "heads_local3_above_0.9": int((df.local3 > 0.9).sum()),
        "heads_local3_above_0.5": int((df.local3 > 0.5).sum()),
        "median_first_token": float(df.first_token.median()),
        "heads_local3_plus_sink_above_0.9": int((df.local3 + df.first_token > 0.9).sum()),
        "top_local_heads": [f"L{r.layer}H{r.head} {r.local3:.3f}" for r in top.itertuples()],
    }
    return df, facts


def main() -> None:
    global OUT, SEED, MODEL
    args = study_args(__doc__, out=OUT, seed=SEED)
    OUT, SEED, MODEL = args.out, args.seed, args.model
    OUT.mkdir(parents=True, exist_ok=True)
    n = len(WORDS)
    table = mask_table(n)
    write_csv(table, OUT / "masks.csv", float_format="%.4f")
    table_128 = mask_table(128)
    write_csv(table_128, OUT / "masks_n128.csv", float_format="%.4f")
    render(n)
    _, facts = qwen_locality()
    facts["masks_n11"] = table.set_index("mask").round(4).to_dict(orient="index")
    facts["masks_n128"] = table_128.set_index("mask").round(4).to_dict(orient="index")
    write_summary(OUT / "summary.json", facts)
    print(table.round(3).to_string(index=False))
    print(table_128.round(3).to_string(index=False))
    print(json.dumps({k: v for k, v in facts.items() if not k.startswith("masks")}, indent=2))


if __name__ == "__main__":
    main()

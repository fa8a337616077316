"""BertViz-style attention pattern types, found in Qwen2.5-Coder-0.5B.

Vig (2019) and Clark et al. (2019) describe heads in BERT that attend to identical words, to the
next word, to the previous word, to delimiters, to commas/periods, and broadly (bag of words). This
finds the strongest Qwen head of each type, with scores from ``headlens.census.run.probe_scores`` on the
census probes (seed 0) where the census covers the type, and two extra natural-text scores:

- identical word: census ``duplicate_token`` (repeated random tokens [P A A]), and
  ``attention_stats.token_match`` (excess mass on earlier copies of the same token in natural text);
- next word: impossible under a causal mask (query i sees keys 0..i only). Nearest analogues:
  ``previous_token`` (every word is read by the word after it: BERT's "next word" head seen from
  the key side) and ``induction`` (attend to the token that came next after an earlier copy of the
  current token: the next word, as it was last time);
- delimiters: census ``delimiter`` (excess mass on punctuation/newline tokens over their share of keys);
- commas/periods: ``scores.delimiter`` with only ',' and '.' tokens as the delimiter set, natural text;
- broad / bag of words: census ``entropy`` (normalised; 1 = uniform over the prefix);
- sink: census ``first_token`` (the role [CLS]/[SEP] play in BERT; Qwen has no BOS token, yet many heads do it).

Writes ``top_heads.csv`` (top 5 per type), ``scores.csv`` (every head), ``gallery.png`` (pattern
of the top head of each type on one prompt), ``gallery_circuitsvis.html`` (offline, bundle inlined
once) and ``summary.json``.

Run: ``flock /tmp/headlens-qwen.lock python analyses/pattern_types.py`` (about a minute).
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
from matplotlib.colors import PowerNorm

from headlens.census import scores
from headlens.census.attention_stats import token_match
from headlens.io import save_figure, write_csv, write_text
from headlens.models import DEFAULT_MODEL

OUT = Path(__file__).parent / "results" / "pattern_types"
MODEL = DEFAULT_MODEL
SEED = 0
PROMPT = (
    "The river ran low that summer, and the children walked along the river bed. "
    "Maria kept a notebook, and Maria wrote every bird in the notebook.\n"
    "def add(a, b):\n    return a + b\n"
)
TYPES = {
    "identical_word": ("duplicate_token", "attend to an earlier copy of the same token"),
    "next_word_as_previous": ("previous_token", "no 'next' under a causal mask: each word is read by its successor"),
    "next_word_as_induction": ("induction", "the token that came next after an earlier copy"),
    "delimiter": ("delimiter", "excess mass on punctuation / newlines"),
    "comma_period": ("comma_period", "excess mass on ',' and '.' in prose"),
    "broad": ("entropy", "bag of words: normalised entropy"),
    "sink": ("first_token", "first token (no BOS in Qwen)"),
}


def comma_period_mask(model, tokens: torch.Tensor) -> torch.Tensor:
    """Which tokens are a comma or a period (spaces and newlines around them allowed)."""
    unique = sorted(set(tokens.flatten().tolist()))
    hit = {i: model.tokenizer.decode([i]).strip() in {",", "."} for i in unique}
    return torch.tensor([[hit[i] for i in row] for row in tokens.tolist()])


def natural_extras(model, probe) -> dict[str, torch.Tensor]:
    """``token_match`` and comma/period excess on the natural probe, streamed; each [layer, head]."""
    from headlens.engine.capture import stream_patterns

    L, H = model.cfg.n_layers, model.cfg.n_heads
    punct = comma_period_mask(model, probe.tokens)
    sums = {name: torch.zeros(L, H, dtype=torch.float64) for name in ("token_match", "comma_period")}
    weights = {"token_match": 0.0, "comma_period": 0.0}
    n = probe.tokens.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)

    def reducer(layer, pattern, rows):
        tokens = probe.tokens[rows]
        matches = float(((tokens[:, :, None] == tokens[:, None, :]) & earlier).any(-1).sum())
        sums["token_match"][layer] += token_match(pattern, tokens).double().cpu() * matches
        sums["comma_period"][layer] += scores.delimiter(pattern, punct[rows]).double().cpu() * tokens.shape[0]
        if layer == 0:
            weights["token_match"] += matches
            weights["comma_period"] += tokens.shape[0]

    stream_patterns(model, probe.tokens, reducer, batch_size=8, desc="natural extras")
    return {name: sums[name] / weights[name] for name in sums}


def main() -> None:
    global OUT, SEED, MODEL
    args = study_args(__doc__, out=OUT, seed=SEED)
    OUT, SEED, MODEL = args.out, args.seed, args.model
    from headlens import load_model
    from headlens.census.run import probe_scores
    from headlens.data.probes import default_probes
    from headlens.engine.capture import head_patterns
    from headlens.heads import kv_heads
    from headlens.render.viz import CircuitsVisView, ViewSet, view_props

    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = load_model(MODEL)
    probes = default_probes(model, seed=SEED, kinds=["repeated", "natural", "delimiter"])  # the kinds TYPES read
    L, H = model.cfg.n_layers, model.cfg.n_heads
    table = {}
    for probe in probes:  # per-sequence scores [seq, layer*head] -> each head's mean [layer, head]; raw scores only
        for column, per_seq in probe_scores(model, probe).items():
            if not column.startswith("_") and not column.endswith("_nosink"):
                table[column] = per_seq.mean(0).reshape(L, H)
    table.update(natural_extras(model, probes.natural))
    groups = kv_heads(model)
    df = pd.DataFrame(
        [
            {"layer": layer, "head": h, "kv_head": groups[h], **{k: float(v[layer, h]) for k, v in table.items()}}
            for layer in range(L)
            for h in range(H)
        ]
    )
    write_csv(df, OUT / "scores.csv", float_format="%.5f")

    tops = []
    for kind, (score, meaning) in TYPES.items():
        for rank, row in enumerate(
            df.sort_values([score, "layer", "head"], ascending=[False, True, True]).head(5).itertuples()
        ):
            tops.append(
                {
                    "type": kind,
                    "rank": rank + 1,
                    "score_name": score,
                    "layer": row.layer,
                    "head": row.head,
                    "kv_head": row.kv_head,
                    "score": getattr(row, score),
                    "meaning": meaning,
                }
            )
    top = pd.DataFrame(tops)
    write_csv(top, OUT / "top_heads.csv", float_format="%.4f")
    best = top[top["rank"] == 1].reset_index(drop=True)

    heads = list(zip(best.layer.astype(int), best["head"].astype(int)))
    tokens, patterns = head_patterns(model, PROMPT, heads)
    labels = [t.replace("\n", "\\n") for t in tokens]
    ncols = 4
    nrows = -(-len(best) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 5.4 * nrows))
    for ax in axes.flat[len(best) :]:
        ax.axis("off")
    for ax, row, pattern in zip(axes.flat, best.itertuples(), patterns):
        ax.imshow(pattern, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1))
        ax.set_title(
            f"{row.type}: L{row.layer}H{row.head} (kv {row.kv_head})\n{row.score_name} = {row.score:.3f}", fontsize=9
        )
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=4)
        ax.set_yticks(range(len(labels)), labels, fontsize=4)
    fig.suptitle("Top Qwen2.5-Coder-0.5B head per pattern type (colour: sqrt of attention weight)")
    fig.tight_layout()
    save_figure(fig, OUT / "gallery.png", dpi=110)
    plt.close(fig)

    names = [f"{r.type} L{r.layer}H{r.head}" for r in best.itertuples()]
    view = CircuitsVisView(
        "AttentionHeads",
        view_props(tokens, patterns, component="heads", names=names),
        title="Top head per BertViz pattern type",
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>headlens pattern types</title></head><body>"
        "<p>Qwen2.5-Coder-0.5B: the top head of each pattern type (see top_heads.csv). "
        "Causal attention has no 'next word' head: its analogues are previous-token and induction heads.</p>"
        f"{ViewSet([view]).to_html(prefix='types')}</body></html>"
    )
    write_text(OUT / "gallery_circuitsvis.html", page, encoding="utf-8")

    corr = df[["duplicate_token", "token_match"]].corr(method="spearman").iloc[0, 1]
    summary = {
        "probes": {p.kind: list(p.tokens.shape) for p in probes},
        "top": {
            r.type: {"head": f"L{r.layer}H{r.head}", "kv_head": int(r.kv_head), r.score_name: round(float(r.score), 4)}
            for r in best.itertuples()
        },
        "top_by_token_match": df.sort_values("token_match", ascending=False)
        .head(3)[["layer", "head", "token_match", "duplicate_token"]]
        .round(4)
        .to_dict(orient="records"),
        "spearman_duplicate_token_vs_token_match": round(float(corr), 3),
        "heads_first_token_above_0.5": int((df.first_token > 0.5).sum()),
        "heads_previous_token_above_0.4": int((df.previous_token > 0.4).sum()),
        "heads_induction_above_0.3": int((df.induction > 0.3).sum()),
        "heads_duplicate_token_above_0.3": int((df.duplicate_token > 0.3).sum()),
        "heads_delimiter_above_0.3": int((df.delimiter > 0.3).sum()),
        "heads_comma_period_above_0.3": int((df.comma_period > 0.3).sum()),
        "heads_entropy_above_0.7": int((df.entropy > 0.7).sum()),
    }
    write_summary(OUT / "summary.json", summary)
    print(top[top["rank"] <= 3].round(3).to_string(index=False))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

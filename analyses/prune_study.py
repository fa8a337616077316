"""What fraction of Qwen2.5-Coder-0.5B's attention heads can be removed at <= 1% loss increase, and which go last?

Greedy pruning (headlens.interventions.prune.prune_curve): zero-ablate heads in order of least Michel et al. gate-gradient
importance, re-estimated after every step of 21 heads (1/16 of the 336), next-token loss on 2x64 prose tokens; the gap
after the last grid point within tolerance is bisected to the exact count. The pruned set is then checked on held-out
prose and on in-context copying (repeated random tokens).

The count depends on the text it is fitted on, so the study repeats it on five draws per sample size (2 and 8
windows of 64 tokens): draw s fits on block s of the prose ``score`` split and checks on block s of the ``eval``
split (headlens.data.corpus: draws of one size never share a window, the two splits never share a file) and on
repeat probe s. The summary gives the median and range over the draws of each size.

    flock /tmp/headlens-qwen.lock python analyses/prune_study.py    # 2 sizes x 5 draws: 53 min here, sharing 2 cores with tests
    python analyses/prune_study.py --model tiny-qwen2 --seeds 2 --out /tmp/p  # the same code in seconds

Writes under analyses/results/prune_study/: per_seed.csv (one row per draw and size), prune_curve.csv and
prune_order.csv (every draw, columns ``n_seqs`` and ``seed``), summary.json, prune_curve.png (seed 0, largest size),
removal_rank.png (mean over the draws of the largest size).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _harness import study_args, write_summary
from transformer_lens.utilities import lm_cross_entropy_loss

from headlens import load_model
from headlens.data.probes import natural_text
from headlens.interventions.ablation import ablated_metric, clean_metric, custom_metric, repeat_loss_metric
from headlens.interventions.prune import prune_curve
from headlens.io import save_figure, write_csv
from headlens.models import DEFAULT_MODEL
from headlens.render.plots import plot_prune_curve

OUT = Path(__file__).resolve().parent / "results" / "prune_study"
MODEL = DEFAULT_MODEL
SEED, N_DRAWS, SIZES, SEQ_LEN, TOLERANCE, STEPS, N_LAST = 0, 5, (2, 8), 64, 0.01, 16, 10


def removal_rank_figure(orders: pd.DataFrame, n_layers: int, n_heads: int, path: Path) -> None:
    """Mean removal time per head over the draws (0 = pruned first, 1 = last); circles: the last ``N_LAST`` on average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = (orders["rank"] / (n_layers * n_heads)).groupby([orders["layer"], orders["head"]]).mean()
    rank = np.full((n_layers, n_heads), np.nan)
    for (layer, head), value in mean.items():
        rank[layer, head] = value
    last = mean.sort_values().tail(N_LAST).index
    n_draws = orders["seed"].nunique()
    fig, ax = plt.subplots(figsize=(6.2, 7))
    im = ax.imshow(rank, cmap="viridis", aspect="auto")
    ax.scatter(
        [h for _, h in last],
        [lay for lay, _ in last],
        marker="o",
        facecolors="none",
        edgecolors="red",
        s=60,
        label=f"last {N_LAST} to go (mean)",
    )
    ax.set_xlabel("head (kv group = head // 7)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.tick_params(labelsize=7)
    ax.set_title(f"when each head is pruned (fraction removed before it, mean of {n_draws} draws)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.colorbar(im, ax=ax, label="removal time (0 = first, 1 = last)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def prose_metric(model, split: str, n_seqs: int, seed: int, name: str):
    """Next-token loss on block ``seed`` of the prose ``split`` (``n_seqs`` windows of ``SEQ_LEN`` tokens)."""
    probe = natural_text(model, seq_len=SEQ_LEN, n_seqs=n_seqs, seed=seed, split=split)
    return custom_metric(probe.tokens, lambda logits, toks: lm_cross_entropy_loss(logits, toks), name=name), probe


def one_draw(model, n_seqs: int, seed: int):
    """Prune on draw ``seed`` of ``n_seqs`` windows; return its row, the curve and the order (with the draw's columns)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    fit, fit_probe = prose_metric(model, "score", n_seqs, seed, "loss")
    held_out, eval_probe = prose_metric(model, "eval", n_seqs, seed, "loss (held-out)")
    repeat = repeat_loss_metric(model, n_seqs=n_seqs, half_len=SEQ_LEN // 2, seed=seed)
    result = prune_curve(model, fit, tolerance=TOLERANCE, steps=STEPS, order="gradient", reestimate=True, seed=seed)
    pruned = [(int(r.layer), int(r["head"])) for _, r in result.order.head(result.max_removed).iterrows()]
    row = {
        "n_seqs": n_seqs,
        "seed": seed,
        "max_removed": result.max_removed,
        "max_fraction": round(result.max_fraction, 4),
        "fit_clean": result.clean,
    }
    for key, metric in (("held_out", held_out), ("repeat", repeat)):
        clean = clean_metric(model, metric)
        value = ablated_metric(model, metric, pruned) if pruned else clean
        row |= {f"{key}_clean": clean, f"{key}_pruned": value, f"{key}_worsening": metric.worsening(value, clean)}
    row["last_to_go"] = " ".join(f"L{r.layer}H{r.head}" for r in result.last_heads(N_LAST).itertuples())
    row["fit_windows"] = " ".join(fit_probe.sources)
    row["eval_windows"] = " ".join(eval_probe.sources)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{n_seqs} windows, seed {seed}: {result.summary()}", flush=True)
    draw = {"n_seqs": n_seqs, "seed": seed}
    return row, result, result.curve.assign(**draw), result.order.assign(**draw)


def summarize(per_seed: pd.DataFrame, orders: pd.DataFrame, n_heads: int) -> dict:
    """Median and range over the draws of one size, how alike their pruned sets are, and how often each head is among
    the last ``N_LAST`` to go."""
    counts = per_seed["max_removed"]
    last = pd.Series(" ".join(per_seed["last_to_go"]).split()).value_counts()
    pruned = [
        {f"L{r.layer}H{r.head}" for r in orders[orders["seed"] == s].head(n).itertuples()}
        for s, n in zip(per_seed["seed"], counts)
    ]
    pairs = [(a, b) for i, a in enumerate(pruned) for b in pruned[i + 1 :]]
    jaccard = [len(a & b) / len(a | b) for a, b in pairs if a | b]

    def spread(column: str) -> dict:
        values = per_seed[column]
        return {"median": float(values.median()), "min": float(values.min()), "max": float(values.max())}

    return {
        "n_draws": len(per_seed),
        "max_removed": {"per_seed": counts.tolist(), **spread("max_removed")},
        "max_fraction": {k: round(v / n_heads, 4) for k, v in spread("max_removed").items()},
        "held_out_worsening": spread("held_out_worsening"),
        "repeat_clean": spread("repeat_clean"),
        "repeat_pruned": spread("repeat_pruned"),
        "pruned_set_jaccard": {"pairs": len(jaccard), "mean": float(np.mean(jaccard)) if jaccard else None},
        "last_to_go_in_most_draws": [h for h, c in last.items() if c > len(per_seed) / 2],
        "last_to_go_counts": {h: int(c) for h, c in last.items()},
    }


def main() -> None:
    global OUT, SEED, MODEL

    def options(parser):
        parser.add_argument("--seeds", type=int, default=N_DRAWS, help=f"draws per size (default: {N_DRAWS})")
        parser.add_argument("--n-seqs", type=int, nargs="+", default=list(SIZES), help="sample sizes in windows")

    args = study_args(__doc__, out=OUT, seed=SEED, extra=options)
    OUT, SEED, MODEL = args.out, args.seed, args.model
    if args.seeds < 1 or min(args.n_seqs) < 1:
        raise SystemExit(f"--seeds and --n-seqs must be at least 1 (got {args.seeds}, {args.n_seqs})")
    sizes = sorted(set(args.n_seqs))
    t0 = time.perf_counter()
    model = load_model(MODEL)
    seeds = range(SEED, SEED + args.seeds)
    rows, curves, orders, shown = [], [], [], None
    for n_seqs in sizes:
        for seed in seeds:
            row, result, curve, order = one_draw(model, n_seqs, seed)
            rows.append(row)
            curves.append(curve)
            orders.append(order)
            shown = result if seed == SEED else shown
    per_seed, orders = pd.DataFrame(rows), pd.concat(orders, ignore_index=True)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    write_csv(per_seed, OUT / "per_seed.csv")
    write_csv(pd.concat(curves, ignore_index=True), OUT / "prune_curve.csv")
    write_csv(orders, OUT / "prune_order.csv")
    title = f"{MODEL}: greedy pruning, {sizes[-1]}x{SEQ_LEN} tokens, seed {SEED}"
    plot_prune_curve(shown, OUT / "prune_curve.png", title=title)
    removal_rank_figure(orders[orders["n_seqs"] == sizes[-1]], n_layers, n_heads, OUT / "removal_rank.png")
    summary = {
        "question": "fraction of heads removable at <= 1% loss increase; which heads are last to go",
        "model": MODEL,
        "n_heads": n_layers * n_heads,
        "seeds": list(seeds),
        "metric": f"next-token loss on n_seqs x {SEQ_LEN} prose tokens (block s of the score split); held-out: "
        f"block s of the eval split (other files); repeat: n_seqs repeated random sequences of half {SEQ_LEN // 2}",
        "procedure": f"greedy, zero ablation, gradient importance re-estimated every {max(1, n_layers * n_heads // STEPS)} "
        "heads, bisection refine",
        "tolerance": TOLERANCE,
        "by_n_seqs": {
            str(n): summarize(per_seed[per_seed["n_seqs"] == n], orders[orders["n_seqs"] == n], n_layers * n_heads)
            for n in sizes
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_summary(OUT / "summary.json", summary)
    for n, found in summary["by_n_seqs"].items():
        m = found["max_removed"]
        print(
            f"{n}x{SEQ_LEN} tokens: {m['median']:.0f} of {summary['n_heads']} heads removable (median of "
            f"{found['n_draws']} draws; range {m['min']:.0f}-{m['max']:.0f})"
        )
    print(f"wrote {OUT} in {summary['seconds']} s")


if __name__ == "__main__":
    main()

"""The ``headlens`` command line: a thin typer layer over the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from headlens.errors import HeadlensError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find out what the attention heads of Qwen models do.")

MODEL = typer.Option("qwen2.5-coder-0.5b", "--model", "-m", help="model name, local HF directory, .gguf file or cached hub id")
ADAPTER = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory merged into the model")


def _load(model: str, adapter: Path | None = None):
    from headlens.models import load_model

    typer.echo(f"loading {model}" + (f" + adapter {adapter}" if adapter else "") + " ...", err=True)
    return load_model(model, adapter=adapter)


@app.command()
def info(model: str = MODEL, adapter: Path = ADAPTER, as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Print layers, q/kv heads, d_head, kv groups, rope base and vocab of a model."""
    from headlens.models import model_info

    facts = model_info(_load(model, adapter))
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        typer.echo(f"{key:>18}: {value}")


@app.callback()
def _root() -> None:
    """Find out what the attention heads of Qwen models do."""


@app.command()
def patch(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    clean: str = typer.Option(None, "--clean", help="clean prompt (default: the built-in induction pair)"),
    corrupted: str = typer.Option(None, "--corrupted", help="corrupted prompt, same token length as --clean"),
    answer: str = typer.Option(None, "--answer", help="correct next token (default: the clean run's top token)"),
    wrong: str = typer.Option(None, "--wrong", help="wrong next token for a logit-difference metric"),
    out: Path = typer.Option(Path("patch-out"), "--out", "-o", help="directory for the CSV files"),
    activations: str = typer.Option("z", "--activations", help="comma list of z, pattern, q, k, v"),
    by_position: bool = typer.Option(False, "--by-position", help="patch one (head, position) at a time"),
    ungroup_kv: bool = typer.Option(False, "--ungroup-kv", help="patch k/v per q head instead of per kv head (GQA)"),
    attribution: bool = typer.Option(True, "--attribution/--no-attribution", help="also run attribution patching"),
    n_tokens: int = typer.Option(10, "--n-tokens", help="induction pair: length of the repeated half"),
    batch: int = typer.Option(4, "--batch", help="induction pair: number of sequences"),
    seed: int = typer.Option(0, "--seed", help="induction pair: random seed"),
    batch_size: int = typer.Option(32, "--batch-size", help="patched runs per forward pass"),
    top: int = typer.Option(10, "--top", help="how many heads to print"),
):
    """Activation (and attribution) patching of every head from a clean into a corrupted prompt; writes CSVs."""
    import pandas as pd

    from headlens.patching import ACTIVATIONS, activation_patching, attribution_patching, induction_pair, rank_correlation, text_pair

    names = [a.strip() for a in activations.split(",") if a.strip()]
    unknown = [a for a in names if a not in ACTIVATIONS]
    if unknown or not names:
        raise HeadlensError(f"unknown activation(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(ACTIVATIONS)}")
    if (clean is None) != (corrupted is None):
        raise HeadlensError("give both --clean and --corrupted, or neither for the built-in induction pair")
    hooked = _load(model, adapter)
    if clean is None:
        pair = induction_pair(hooked, n_tokens=n_tokens, batch=batch, seed=seed)
    else:
        pair = text_pair(hooked, clean, corrupted, answer=answer, wrong=wrong)
    out.mkdir(parents=True, exist_ok=True)
    attr = attribution_patching(hooked, pair, activations=names, by_position=by_position, ungroup_kv=ungroup_kv) if attribution else None
    if attr is not None:
        attr.to_csv(out / "attribution.csv", index=False)
    typer.echo(f"pair: {pair.name}, tokens {tuple(pair.clean.shape)}, metric: {pair.info.get('metric', 'user metric')}")
    for name in names:
        exact = activation_patching(hooked, pair, activation=name, by_position=by_position, ungroup_kv=ungroup_kv, batch_size=batch_size)
        exact.to_csv(out / f"patch_{name}.csv", index=False)
        if name == names[0]:
            typer.echo(f"clean metric {exact.attrs['clean_metric']:.4f}, corrupted {exact.attrs['corrupted_metric']:.4f}")
        shown = exact.copy()
        if attr is not None:
            shown["attribution"] = attr.loc[attr["activation"] == name, "effect"].to_numpy()
        ranked = shown.reindex(shown["effect"].abs().sort_values(ascending=False).index)
        typer.echo(f"\ntop {min(top, len(ranked))} by exact patching of {name} (effect: 1 = full recovery)")
        for row in ranked.head(top).itertuples():
            unit = f"L{row.layer}KV{row.kv_head}" if pd.isna(row.head) else f"L{row.layer}H{row.head} (kv {row.kv_head})"
            unit += f" pos {row.pos}" if by_position else ""
            extra = f"  attribution {row.attribution:+.3f}" if attr is not None else ""
            typer.echo(f"  {unit:<24} exact {row.effect:+.3f}{extra}")
        if attr is not None and len(exact) > 1:
            typer.echo(f"  spearman(exact, attribution) = {rank_correlation(shown['effect'], shown['attribution']):.3f}")
    typer.echo(f"\nwrote CSVs to {out}")


@app.command()
def report(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    out: Path = typer.Option(..., "--out", "-o", help="report directory (reuses DIR/census.csv when present)"),
    prompt: str = typer.Option(None, "--prompt", help="prompt for the CircuitsVis views (default: a built-in repeated prompt)"),
    heads: str = typer.Option("", "--heads", help="extra heads to view, e.g. '5.3,12.0' (layer.head)"),
    top_k: int = typer.Option(3, "--top-k", help="heads per label in the gallery"),
    seed: int = typer.Option(0, "--seed", help="census probe seed"),
    batch_size: int = typer.Option(8, "--batch-size", help="census batch size"),
):
    """Write a self-contained offline HTML report (DIR/report.html) and PNG figures; runs the census if needed."""
    from headlens.report import read_census, write_report
    from headlens.viz import DEFAULT_PROMPT

    chosen = _parse_heads(heads)
    if out.exists() and not out.is_dir():
        raise HeadlensError(f"{out} is a file: pass a directory for the report")
    hooked = _load(model, adapter)
    csv = out / "census.csv"
    if csv.is_file():
        typer.echo(f"reusing {csv}", err=True)
        table = read_census(csv)
    else:
        from headlens.census import census

        table = census(hooked, seed=seed, batch_size=batch_size)
    path = write_report(out, model=hooked, census=table, prompt=prompt or DEFAULT_PROMPT, heads=chosen or None, top_k=top_k)
    typer.echo(f"wrote {path}")


@app.command("census")
def census_cmd(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    out: Path = typer.Option(..., "--out", "-o", help="directory for census.csv and census.parquet"),
    seed: int = typer.Option(0, "--seed", help="probe seed (same seed, same table)"),
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
):
    """Score and label every head; writes DIR/census.csv and DIR/census.parquet and prints a per-label summary."""
    from headlens.census import census, summary

    hooked = _load(model, adapter)
    table = census(hooked, seed=seed, batch_size=batch_size, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "census.csv", index=False)
    table.to_parquet(out / "census.parquet", index=False)
    _census_report(hooked, table, out)
    typer.echo(f"{len(table)} heads, {hooked.cfg.n_layers} layers x {hooked.cfg.n_heads} heads")
    for row in summary(table).itertuples(index=False):
        typer.echo(f"  {row.label:<16} {row.n_heads:>4}  {row.heads if row.n_heads <= 12 else row.heads[:80] + ' ...'}")
    typer.echo(f"wrote {out / 'census.csv'} and {out / 'census.parquet'}")


def _census_report(model, table, out: Path) -> None:
    """Write DIR/report.html (self-contained, offline) and DIR/figures/*.png next to the census."""
    from headlens.report import write_report

    typer.echo(f"wrote {write_report(out, model=model, census=table)}")


METRIC = typer.Option("loss", "--metric", help="loss (corpus text), repeat (repeated random tokens) or logit-diff")


def _check_ablation_options(metric: str, method: str, unit: str = "head") -> None:
    from headlens.ablation import METHODS, METRICS

    if metric not in METRICS:
        raise HeadlensError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if method not in METHODS:
        raise HeadlensError(f"unknown ablation method {method!r}: use one of {', '.join(METHODS)}")
    if unit not in ("head", "kv-group"):
        raise HeadlensError(f"unknown unit {unit!r}: use head or kv-group")


def _ablation_metric(hooked, metric: str, n_seqs: int, seq_len: int, seed: int, prompt, correct, wrong):
    from headlens.ablation import build_metric

    return build_metric(hooked, metric, n_seqs=n_seqs, seq_len=seq_len, seed=seed, prompt=prompt, correct=correct, wrong=wrong)


def _parse_heads(text: str) -> list[tuple[int, int]]:
    heads = []
    for item in filter(None, (h.strip() for h in text.split(","))):
        try:
            layer, head = (int(x) for x in item.split("."))
        except ValueError:
            raise HeadlensError(f"bad head {item!r} in --heads: write layer.head pairs separated by commas, e.g. '5.3,12.0'") from None
        heads.append((layer, head))
    return heads


@app.command()
def ablate(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    metric: str = METRIC,
    out: Path = typer.Option(..., "--out", "-o", help="directory for ablation.csv and ablation.png"),
    method: str = typer.Option("zero", "--method", help="zero, mean or resample (reference = the metric's tokens)"),
    unit: str = typer.Option("head", "--unit", help="head, or kv-group (all q heads reading one kv head)"),
    heads: str = typer.Option("", "--heads", help="instead of a sweep: ablate these heads together, e.g. '5.3,12.0', vs random heads"),
    n_random: int = typer.Option(20, "--n-random", help="with --heads: random head sets to compare against"),
    n_seqs: int = typer.Option(4, "--n-seqs", help="sequences in the metric batch"),
    seq_len: int = typer.Option(64, "--seq-len", help="tokens per sequence (repeat: full repeated length)"),
    prompt: str = typer.Option(None, "--prompt", help="logit-diff: the prompt"),
    correct: str = typer.Option(None, "--correct", help="logit-diff: the correct next token"),
    wrong: str = typer.Option(None, "--wrong", help="logit-diff: the wrong next token"),
    strategy: str = typer.Option("fast", "--strategy", help="fast (cached residuals, batched) or naive (one forward per head)"),
    batch_size: int = typer.Option(16, "--batch-size", help="max sequences per stacked forward pass"),
    seed: int = typer.Option(0, "--seed", help="seed for random tokens, resampling and random heads"),
    top: int = typer.Option(10, "--top", help="how many heads to print"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
):
    """Ablate each head (or kv group) alone and measure a metric; writes DIR/ablation.csv and a heatmap PNG."""
    from headlens.ablation import ablation_sweep, compare_to_random, plot_sweep

    _check_ablation_options(metric, method, unit)
    chosen = _parse_heads(heads)
    hooked = _load(model, adapter)
    m = _ablation_metric(hooked, metric, n_seqs, seq_len, seed, prompt, correct, wrong)
    if chosen:
        table = compare_to_random(hooked, m, chosen, n_random=n_random, method=method, seed=seed, progress=progress)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "ablation_vs_random.csv", index=False)
        a = table.attrs
        typer.echo(f"{m.name}: clean {a['clean']:.4f}; ablating {len(chosen)} heads ({method}): effect {a['target_effect']:+.4f} "
                   f"({a['target_worsening']:+.2%}); {n_random} random sets: {a['random_mean']:+.2%} ± {a['random_std']:.2%}, "
                   f"z = {a['z']:.2f}, share of random sets as bad: {a['p_random_ge']:.2f}")
        typer.echo(f"wrote {out / 'ablation_vs_random.csv'}")
        return
    table = ablation_sweep(hooked, m, method=method, unit=unit.replace("-", "_"), strategy=strategy, batch_size=batch_size,
                           seed=seed, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "ablation.csv", index=False)
    plot_sweep(table, out / "ablation.png")
    typer.echo(f"{m.name}: clean {table.attrs['clean']:.4f}, tokens {tuple(m.tokens.shape)}, {method} ablation of each {unit}")
    typer.echo(f"top {min(top, len(table))} by worsening:")
    for row in table.sort_values("worsening", ascending=False).head(top).itertuples():
        name = f"L{row.layer}H{row.head} (kv {row.kv_head})" if unit == "head" else f"L{row.layer}KV{row.kv_head} (heads {row.heads})"
        typer.echo(f"  {name:<22} {row.metric:.4f}  {row.effect:+.4f}  ({row.worsening:+.2%})")
    typer.echo(f"wrote {out / 'ablation.csv'} and {out / 'ablation.png'}")


@app.command()
def prune(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    metric: str = METRIC,
    out: Path = typer.Option(..., "--out", "-o", help="directory for prune_curve.csv, prune_order.csv and prune_curve.png"),
    tolerance: float = typer.Option(0.01, "--tolerance", help="largest allowed relative worsening, e.g. 0.01 = 1% more loss"),
    steps: int = typer.Option(24, "--steps", help="grid steps from 0 to all heads"),
    order: str = typer.Option("gradient", "--order", help="gradient (Michel et al. importance) or ablation (single-head effects)"),
    reestimate: bool = typer.Option(True, "--reestimate/--no-reestimate", help="gradient order: re-rank after every step"),
    method: str = typer.Option("zero", "--method", help="how a removed head is ablated: zero, mean or resample"),
    n_seqs: int = typer.Option(4, "--n-seqs", help="sequences in the metric batch"),
    seq_len: int = typer.Option(64, "--seq-len", help="tokens per sequence (repeat: full repeated length)"),
    prompt: str = typer.Option(None, "--prompt", help="logit-diff: the prompt"),
    correct: str = typer.Option(None, "--correct", help="logit-diff: the correct next token"),
    wrong: str = typer.Option(None, "--wrong", help="logit-diff: the wrong next token"),
    seed: int = typer.Option(0, "--seed", help="seed for random tokens and resampling"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
):
    """Prune heads greedily, least important first; writes the curve (CSV + PNG) and the removal order."""
    from headlens.prune import prune_curve

    _check_ablation_options(metric, method)
    hooked = _load(model, adapter)
    m = _ablation_metric(hooked, metric, n_seqs, seq_len, seed, prompt, correct, wrong)
    result = prune_curve(hooked, m, tolerance=tolerance, steps=steps, order=order, reestimate=reestimate, method=method,
                         seed=seed, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    result.curve.to_csv(out / "prune_curve.csv", index=False)
    result.order.to_csv(out / "prune_order.csv", index=False)
    result.plot(out / "prune_curve.png")
    typer.echo(result.summary())
    for row in result.curve[~result.curve.refined].itertuples():
        typer.echo(f"  {row.fraction_removed:6.1%} removed  {m.name} {row.metric:.4f}  ({row.worsening:+.2%})")
    typer.echo(f"wrote {out / 'prune_curve.csv'}, {out / 'prune_order.csv'} and {out / 'prune_curve.png'}")


@app.command("compare")
def compare_cmd(
    base: str = typer.Option(..., "--base", help="base model: name, local HF directory, .gguf file or cached hub id"),
    tuned: str = typer.Option(..., "--tuned", help="PEFT LoRA adapter directory (merged into --base) or a full fine-tuned model"),
    out: Path = typer.Option(..., "--out", help="directory for compare.csv and compare.png"),
    census: bool = typer.Option(True, "--census/--no-census", help="also compare census scores and labels"),
    seed: int = typer.Option(0, "--seed", help="probe seed"),
    top: int = typer.Option(10, "--top", help="how many most-changed heads to print"),
):
    """Compare a fine-tune with its base head by head: attention change (JSD), weight change, census deltas."""
    from headlens.compare import compare_models, load_tuned, plot_comparison, top_changed

    base_model = _load(base)
    typer.echo(f"loading tuned {tuned} ...", err=True)
    tuned_model = load_tuned(base_model, tuned, base_source=base)
    df = compare_models(base_model, tuned_model, seed=seed, census=census)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "compare.csv", index=False)
    plot_comparison(df).savefig(out / "compare.png", dpi=110)
    cols = [c for c in ("layer", "head", "jsd", "dW_Q", "dW_K", "dW_V", "dW_O", "label_base", "label_tuned") if c in df.columns]
    typer.echo(top_changed(df, top)[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    typer.echo(f"wrote {out / 'compare.csv'} and {out / 'compare.png'}")


@app.command()
def stats(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    out: Path = typer.Option(..., "--out", "-o", help="directory for entropy.csv and similarity.csv"),
    temperatures: str = typer.Option("0.5,1,2", "--temperatures", help="comma list; T=1 is the model's own 1/sqrt(d_head) scaling"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per natural-text window"),
    batch: int = typer.Option(8, "--batch", help="natural-text windows"),
    seed: int = typer.Option(0, "--seed", help="window seed (same seed, same tables)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
):
    """Attention entropy with and without sqrt(d_k) scaling, and head similarity within vs across GQA groups."""
    import pandas as pd

    from headlens.attention_stats import group_contrast, head_similarity, mean_offdiagonal, scale_entropy_table, scale_settings
    from headlens.models import kv_heads
    from headlens.probes import natural_text

    try:
        temps = tuple(float(t) for t in temperatures.split(",") if t.strip())
    except ValueError:
        raise HeadlensError(f"--temperatures must be a comma list of numbers, e.g. 0.5,1,2 (got {temperatures!r})") from None
    scale_settings(1.0, temperatures=temps)
    hooked = _load(model, adapter)
    tokens = natural_text(hooked, seq_len=seq_len, batch=batch, seed=seed).tokens
    entropy = scale_entropy_table(hooked, tokens, temperatures=temps, progress=progress)
    sims = head_similarity(hooked, tokens, metrics=("cosine", "centered"), progress=progress)
    groups = kv_heads(hooked)
    rows = []
    for metric, mats in sims.items():
        for layer, sim in enumerate(mats):
            test = group_contrast(sim, groups) if len(set(groups)) > 1 else {}
            test.pop("null", None)
            rows.append({"layer": layer, "metric": metric, "mean_similarity": mean_offdiagonal(sim), **test})
    similarity = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    entropy.to_csv(out / "entropy.csv", index=False)
    similarity.to_csv(out / "similarity.csv", index=False)
    by_layer = entropy.pivot_table(index="layer", columns="setting", values="entropy")[list(dict.fromkeys(entropy.setting))]
    typer.echo(f"mean attention entropy (nats) per layer, {batch} x {seq_len} tokens of natural text:")
    typer.echo(by_layer.round(3).to_string())
    typer.echo(f"wrote {out / 'entropy.csv'} and {out / 'similarity.csv'}")


def main() -> None:
    """Entry point: run the app, turning a HeadlensError into one clear line and exit status 1."""
    try:
        app()
    except HeadlensError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Atlas: the head census of several models side by side, by relative depth.

``atlas(["qwen", "smollm2", "toy"])`` runs the census of every model at several probe seeds (one
shard per (model, seed), so a :class:`~headlens.executor.RayExecutor` runs them in parallel, each
worker loading the models itself) and compares:

- ``depth_shares``: the share of each label among the heads of each relative-depth bin
  (relative depth of layer l = (l + 0.5) / n_layers, so models of any depth line up);
- ``positions``: where induction, previous-token and first-token (sink) heads sit: how many, their
  mean / min / max relative depth, and the heads themselves;
- ``counts``: heads per label at seed 0, with the min-max over the probe seeds (each seed draws
  new probe tokens: the interval says how much a count depends on the probe sample).

Sources: any :func:`headlens.load_model` source (``qwen``, ``smollm2``, ``tiny-qwen2``, a local HF
directory, a ``.gguf`` file), ``SOURCE+ADAPTER_DIR`` for a PEFT LoRA adapter merged into SOURCE,
and ``toy`` for the trained toy induction model (census on :func:`headlens.toy.toy_probes`).
:func:`write_atlas` writes the tables and one offline HTML page (figures inlined, no CDN).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from headlens.errors import HeadlensError

WHERE = ("induction", "previous_token", "first_token")
"""Labels whose positions the atlas reports."""
N_BINS = 5


@dataclass(frozen=True)
class AtlasShard:
    """One census of an atlas: a model source at one probe seed."""

    source: str
    seed: int
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class Atlas:
    """Census tables per model (seed 0, with a ``relative_depth`` column) and the comparison tables."""

    census: dict[str, pd.DataFrame]
    counts: pd.DataFrame
    depth_shares: pd.DataFrame
    positions: pd.DataFrame
    settings: dict = field(default_factory=dict)


def parse_sources(text: str | list[str]) -> list[str]:
    """``"qwen,smollm2,toy"`` -> a checked list of sources (adapters and local paths must exist)."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s and s.strip()]
    if not items:
        raise HeadlensError("no models given: pass --models A,B,... (e.g. qwen,smollm2,toy)")
    if len(set(items)) != len(items):
        raise HeadlensError(f"a model is listed twice in {', '.join(items)}")
    for item in items:
        base, _, adapter = item.partition("+")
        if adapter and not Path(adapter).expanduser().is_dir():
            raise HeadlensError(f"{item!r}: adapter directory {adapter} does not exist (write SOURCE+ADAPTER_DIR)")
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().exists():
            raise HeadlensError(f"{item!r}: no such model file or directory {base}")
    return items


@lru_cache(maxsize=1)
def _model(source: str, device: str, dtype: str):
    """Load one atlas source (kept while its seeds run; one model per process at a time)."""
    from headlens.models import load_model

    if source == "toy":
        from headlens.toy import load_induction_model

        model = load_induction_model()
        if (device, dtype) != ("cpu", "float32"):
            from headlens.models import _placed, resolve_device, resolve_dtype

            model = _placed(model, resolve_device(device), resolve_dtype(dtype))
        return model
    base, _, adapter = source.partition("+")
    return load_model(base, adapter=adapter or None, device=device, dtype=dtype)


def census_shard(_model_unused, shard: AtlasShard) -> pd.DataFrame:
    """The census of ``shard.source`` at ``shard.seed`` (loads the model in this process; an executor shard function)."""
    from headlens.census import census

    model = _model(shard.source, shard.device, shard.dtype)
    probes = None
    if shard.source == "toy":
        from headlens.toy import toy_probes

        probes = toy_probes(model, seed=shard.seed)
    table = census(model, probes, seed=shard.seed, batch_size=shard.batch_size, progress=False)
    table.insert(0, "model", shard.source)
    table.insert(1, "seed", shard.seed)
    table.insert(4, "n_layers", model.cfg.n_layers)
    return table


def atlas(
    sources: str | list[str],
    *,
    seeds: int = 3,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    bins: int = N_BINS,
    executor=None,
    progress: bool = True,
) -> Atlas:
    """Census of every source at probe seeds 0..seeds-1 (on ``executor``) and the comparison tables (module docstring)."""
    from headlens.executor import resolve
    from headlens.models import resolve_device, resolve_dtype

    sources = parse_sources(sources)
    if int(seeds) < 1 or int(bins) < 1:
        raise HeadlensError(f"seeds and bins must be >= 1 (got {seeds}, {bins})")
    resolve_device(device)
    dtype = str(resolve_dtype(dtype)).removeprefix("torch.")
    shards = [AtlasShard(s, seed, int(batch_size), device, dtype) for s in sources for seed in range(int(seeds))]
    try:
        tables = resolve(executor).map(
            census_shard, None, shards, key="headlens.atlas.census_shard", desc="atlas", progress=progress
        )
    finally:
        _model.cache_clear()
    every = pd.concat(tables, ignore_index=True)
    every["relative_depth"] = (every["layer"] + 0.5) / every["n_layers"]
    first = every[every.seed == 0]
    census = {s: first[first.model == s].reset_index(drop=True) for s in sources}
    settings = dict(
        models=sources, seeds=int(seeds), batch_size=int(batch_size), device=device, dtype=dtype, bins=int(bins)
    )
    return Atlas(census, label_counts(every), depth_shares(first, bins), positions(first), settings)


def label_counts(every: pd.DataFrame) -> pd.DataFrame:
    """Heads per (model, label) at seed 0 with min / max over seeds and the share of the model's heads."""
    from headlens.census import LABELS

    per_seed = every.groupby(["model", "seed", "label"]).size().unstack("label", fill_value=0)
    per_seed = per_seed.reindex(columns=list(LABELS), fill_value=0)
    rows = []
    for model in dict.fromkeys(every.model):
        counts = per_seed.loc[model]
        n_heads = int((every.model == model).sum() / every[every.model == model].seed.nunique())
        for label in LABELS:
            col = counts[label]
            rows.append(
                {
                    "model": model,
                    "label": label,
                    "n_heads": int(col.loc[0]),
                    "min": int(col.min()),
                    "max": int(col.max()),
                    "share": float(col.loc[0]) / n_heads,
                    "of": n_heads,
                    "n_seeds": len(col),
                }
            )
    return pd.DataFrame(rows)


def depth_shares(first: pd.DataFrame, bins: int = N_BINS) -> pd.DataFrame:
    """Share of each label among the heads of each relative-depth bin, per model (seed 0)."""
    from headlens.census import LABELS

    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for model, part in first.groupby("model", sort=False):
        which = np.minimum(np.digitize(part.relative_depth, edges) - 1, bins - 1)
        for b in range(bins):
            heads = part[which == b]
            for label in LABELS:
                n = int((heads.label == label).sum())
                rows.append(
                    {
                        "model": model,
                        "depth_bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}",
                        "bin": b,
                        "label": label,
                        "n": n,
                        "of": len(heads),
                        "share": n / len(heads) if len(heads) else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def positions(first: pd.DataFrame) -> pd.DataFrame:
    """Per model and label in :data:`WHERE`: count and relative depth (mean, min, max) of its heads, and the heads."""
    rows = []
    for model, part in first.groupby("model", sort=False):
        for label in WHERE:
            heads = part[part.label == label]
            depth = heads.relative_depth
            rows.append(
                {
                    "model": model,
                    "label": label,
                    "n_heads": len(heads),
                    "mean_depth": float(depth.mean()) if len(heads) else float("nan"),
                    "min_depth": float(depth.min()) if len(heads) else float("nan"),
                    "max_depth": float(depth.max()) if len(heads) else float("nan"),
                    "heads": " ".join(f"L{l}H{h}" for l, h in zip(heads["layer"], heads["head"])),
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- output


def write_atlas(result: Atlas, out_dir: str | os.PathLike) -> Path:
    """Write census_<model>.csv, counts.csv, depth_shares.csv, positions.csv, settings.json and atlas.html (offline)."""
    from headlens.io import write_csv, write_json, write_text

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HeadlensError(f"{out} is a file: pass a directory for the atlas")
    out.mkdir(parents=True, exist_ok=True)
    for model, table in result.census.items():
        write_csv(table, out / f"census_{_slug(model)}.csv")
    write_csv(result.counts, out / "counts.csv")
    write_csv(result.depth_shares, out / "depth_shares.csv")
    write_csv(result.positions, out / "positions.csv")
    write_json(out / "settings.json", result.settings)
    return write_text(out / "atlas.html", atlas_html(result))


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name.replace("+", "_")).name or name)
    return keep.strip("._") or "model"


def _figures(result: Atlas) -> tuple[str, str]:
    from matplotlib.figure import Figure  # plain Figures: the user's matplotlib backend is left alone

    from headlens.census import LABELS
    from headlens.viz import LABEL_COLORS, figure_img

    models = list(result.census)
    shares = result.depth_shares
    fig = Figure(figsize=(2.6 * len(models) + 1.2, 3.2))
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        part = shares[shares.model == model].pivot(index="bin", columns="label", values="share").fillna(0)
        bottom = np.zeros(len(part))
        for label in LABELS:
            ax.bar(
                part.index,
                part[label],
                bottom=bottom,
                color=LABEL_COLORS.get(label, "#bcbd22"),
                edgecolor="#555",
                linewidth=0.3,
                label=label,
            )
            bottom += part[label].to_numpy()
        n_bins = len(part)
        ax.set_xticks(range(n_bins), [f"{(b + 0.5) / n_bins:.1f}" for b in range(n_bins)], fontsize=7)
        ax.set_title(model if len(model) < 28 else "…" + model[-27:], fontsize=8)
        ax.set_xlabel("relative depth", fontsize=8)
    axes[0][0].set_ylabel("share of heads", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    shares_img = figure_img(fig, alt="label shares by relative depth")

    fig = Figure(figsize=(7, 0.6 + 0.55 * len(models)))
    ax = fig.subplots()
    offsets = {"induction": 0.18, "previous_token": 0.0, "first_token": -0.18}
    for y, model in enumerate(models):
        table = result.census[model]
        for label in WHERE:
            heads = table[table.label == label]
            n_heads = len(table) // int(table.n_layers.iloc[0])
            spread = (heads["head"] / max(n_heads - 1, 1) - 0.5) * 0.8 / heads.n_layers  # heads of a layer side by side
            ax.scatter(
                heads.relative_depth + spread,
                np.full(len(heads), y + offsets[label]),
                s=14,
                color=LABEL_COLORS[label],
                label=label if y == 0 else None,
                edgecolor="#333",
                linewidth=0.3,
            )
    ax.set_yticks(range(len(models)), models, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative depth (layer + 0.5) / n_layers", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    where_img = figure_img(fig, alt="where induction, previous-token and sink heads sit")
    return shares_img, where_img


def atlas_html(result: Atlas) -> str:
    """One self-contained page: figures as inline PNGs, tables as HTML; every string escaped; no script, no URL."""
    shares_img, where_img = _figures(result)
    counts = result.counts
    models = list(result.census)
    labels = list(dict.fromkeys(counts.label))
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = []
    for label in labels:
        cells = []
        for model in models:
            r = counts[(counts.model == model) & (counts.label == label)].iloc[0]
            interval = f" [{r['min']}–{r['max']}]" if r["n_seeds"] > 1 else ""
            cells.append(f"<td>{r['n_heads']}{interval} <small>({r['share']:.0%})</small></td>")
        body.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    sizes = "".join(
        f"<td>{int(result.census[m].n_layers.iloc[0])} × {len(result.census[m]) // int(result.census[m].n_layers.iloc[0])}</td>"
        for m in models
    )
    pos = result.positions
    pos_rows = "".join(
        f"<tr><td>{html.escape(r.model)}</td><td>{html.escape(r.label)}</td><td>{r.n_heads}</td>"
        f"<td>{_fmt(r.mean_depth)}</td><td>{_fmt(r.min_depth) + '–' + _fmt(r.max_depth) if r.n_heads else '–'}</td><td><small>{html.escape(r.heads)}</small></td></tr>"
        for r in pos.itertuples()
    )
    s = result.settings
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>headlens atlas: {html.escape(", ".join(models))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}} img{{max-width:100%}}</style></head>
<body><h1>Head atlas</h1>
<p>Census of {len(models)} models (probe seeds 0–{s.get("seeds", 1) - 1}, batch size {s.get("batch_size")},
{html.escape(str(s.get("device")))}, {html.escape(str(s.get("dtype")))}). Counts are at seed 0; [min–max] over the probe seeds.</p>
<h2>Heads per label</h2>
<table><tr><th>label</th>{head}</tr><tr><th>layers × heads</th>{sizes}</tr>{"".join(body)}</table>
<h2>Label shares by relative depth</h2>{shares_img}
<h2>Where induction, previous-token and sink heads sit</h2>{where_img}
<table><tr><th>model</th><th>label</th><th>heads</th><th>mean depth</th><th>range</th><th>heads</th></tr>{pos_rows}</table>
</body></html>
"""


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"

"""The atlas on disk: its tables as CSV and one offline HTML page with its figures inlined (no CDN)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # plain Figures: the user's matplotlib backend is left alone

from headlens.analysis.atlas import WHERE, Atlas
from headlens.census import LABELS
from headlens.errors import HeadlensError
from headlens.io import output_set, write_csv, write_json, write_text
from headlens.render.viz import escape, figure_img, label_colors, label_glyphs, label_legend_html


def write_atlas(result: Atlas, out_dir: str | os.PathLike) -> Path:
    """Write census_<model>.csv, counts.csv, depth_shares.csv, positions.csv, settings.json and atlas.html (offline),
    and atlas_files.json, their list."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HeadlensError(f"{out} is a file: pass a directory for the atlas")
    out.mkdir(parents=True, exist_ok=True)
    names = census_files(result.census)
    with output_set(out, "atlas") as written:  # a census file of an earlier atlas's model is removed (io.output_set)
        written += [write_csv(table, out / names[model]) for model, table in result.census.items()]
        written.append(write_csv(result.counts, out / "counts.csv"))
        written.append(write_csv(result.depth_shares, out / "depth_shares.csv"))
        written.append(write_csv(result.positions, out / "positions.csv"))
        written.append(write_json(out / "settings.json", result.settings))
        page = write_text(out / "atlas.html", atlas_html(result))
        written.append(page)
    return page


def census_files(sources) -> dict[str, str]:
    """The census file of each source, one per source: ``census_<model>[_<adapter folder>].csv``; sources that would
    share a name (two adapters in folders of one name) get a digest of their full source string too."""
    slugs = {source: _slug(source) for source in sources}
    counts = Counter(slugs.values())
    names = {
        source: slug if counts[slug] == 1 else f"{slug}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
        for source, slug in slugs.items()
    }
    return {source: f"census_{name}.csv" for source, name in names.items()}


def _slug(source: str) -> str:
    base, _, adapter = source.partition("+")
    parts = [Path(base).name or base] + ([Path(adapter.rstrip("/")).name or adapter] if adapter else [])
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in "_".join(parts))
    return keep.strip("._") or "model"


def _figures(result: Atlas) -> tuple[str, str]:
    models = list(result.census)
    shares = result.depth_shares
    colors, glyphs = label_colors(), label_glyphs(LABELS)
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
                color=colors.get(label, "#888888"),
                edgecolor="#555",
                linewidth=0.3,
                label=f"{glyphs.get(label) or '·'}  {label}",
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
                s=40,
                marker=f"${glyphs[label]}$",
                color=colors[label],
                label=label if y == 0 else None,
                linewidth=0,
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
    head = "".join(f"<th>{escape(m)}</th>" for m in models)
    body = []
    for label in labels:
        cells = []
        for model in models:
            r = counts[(counts.model == model) & (counts.label == label)].iloc[0]
            interval = f" [{r['min']}–{r['max']}]" if r["n_seeds"] > 1 else ""
            cells.append(f"<td>{r['n_heads']}{interval} <small>({r['share']:.0%})</small></td>")
        body.append(f"<tr><th>{label_legend_html(labels=[label])}</th>{''.join(cells)}</tr>")
    sizes = "".join(
        f"<td>{int(result.census[m].n_layers.iloc[0])} × {len(result.census[m]) // int(result.census[m].n_layers.iloc[0])}</td>"
        for m in models
    )
    pos = result.positions
    pos_rows = "".join(
        f"<tr><td>{escape(r.model)}</td><td>{escape(r.label)}</td><td>{r.n_heads}</td>"
        f"<td>{_fmt(r.mean_depth)}</td><td>{_fmt(r.min_depth) + '–' + _fmt(r.max_depth) if r.n_heads else '–'}</td><td><small>{escape(r.heads)}</small></td></tr>"
        for r in pos.itertuples()
    )
    s = result.settings
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>headlens atlas: {escape(", ".join(models))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}} img{{max-width:100%}}
.legend{{margin:0}} .key{{margin-right:12px;white-space:nowrap}}
.swatch{{display:inline-block;min-width:20px;height:18px;margin-right:4px;text-align:center;font:bold 11px/18px system-ui;
border:1px solid #555;vertical-align:middle}}</style></head>
<body><h1>Head atlas</h1>
<p>Census of {len(models)} models (probe seeds 0–{s.get("seeds", 1) - 1}, batch size {s.get("batch_size")},
{escape(str(s.get("device")))}, {escape(str(s.get("dtype")))}). Counts are at seed 0; [min–max] over the probe seeds.</p>
<h2>Heads per label</h2>
<table><tr><th>label</th>{head}</tr><tr><th>layers × heads</th>{sizes}</tr>{"".join(body)}</table>
<h2>Label shares by relative depth</h2>{shares_img}
<h2>Where induction, previous-token and sink heads sit</h2>{where_img}
<table><tr><th>model</th><th>label</th><th>heads</th><th>mean depth</th><th>range</th><th>heads</th></tr>{pos_rows}</table>
</body></html>
"""


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"

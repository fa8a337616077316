"""One self-contained HTML page that shows what a model's heads do, plus the figures as PNG for papers.

The page inlines the CircuitsVis bundle once and renders every component with
``CircuitsVis.render(id, CircuitsVis.<Name>, props)``; heatmaps are inline base64 PNGs; the census table
sorts with a few lines of inline JS. A Content-Security-Policy forbids every fetch, so the page opens
offline, from a file, anywhere, and cannot phone home.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from transformer_lens import HookedTransformer

from headlens import viz
from headlens.errors import HeadlensError
from headlens.io import write_bytes, write_csv, write_text
from headlens.models import model_info
from headlens.progress import tqdm

CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"
INDEX_COLUMNS = ("layer", "head", "kv_head")
MAX_TABLE_ROWS = 50

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px; padding: 0 24px 48px; color: #222; }
header { border-bottom: 1px solid #ddd; margin-bottom: 8px; }
nav a { margin-right: 14px; }
h2 { margin-top: 36px; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, th.text, td.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; background: #f6f6f6; position: sticky; top: 0; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
.scroll { max-height: 520px; overflow: auto; border: 1px solid #eee; display: inline-block; }
img { max-width: 100%; height: auto; }
pre.prompt { background: #f6f6f6; padding: 8px; white-space: pre-wrap; }
.circuitsvis { margin: 12px 0 24px; min-height: 40px; }
.muted { color: #777; }
"""

SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      Array.prototype.forEach.call(heads, function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
        return dir * ((isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
document.querySelectorAll("select[data-filter]").forEach(function (select) {
  var table = document.getElementById(select.dataset.filter), col = parseInt(select.dataset.col, 10);
  select.addEventListener("change", function () {
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      row.hidden = select.value !== "" && row.cells[col].dataset.v !== select.value;
    });
  });
});
"""


def _version() -> str:
    try:
        return version("headlens")
    except PackageNotFoundError:
        return "unknown"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _cell(value) -> tuple[str, str, bool]:
    """(display text, sort key, is text) of one table value."""
    if value is None or value is pd.NA:
        return "", "", True
    if isinstance(value, (bool, np.bool_)):
        return str(value), str(value), True
    if isinstance(value, (int, np.integer)):
        return str(int(value)), str(int(value)), False
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "", "NaN", False
        return f"{value:.3f}", repr(float(value)), False
    return str(value), str(value), True


def table_html(df: pd.DataFrame, *, table_id: str = "", sortable: bool = False, max_rows: int | None = None) -> str:
    """An HTML table of ``df`` (every string escaped); ``sortable`` tables sort by column on click."""
    shown = df if max_rows is None else df.head(max_rows)
    attrs = (f' id="{_e(table_id)}"' if table_id else "") + (' class="sortable"' if sortable else "")
    head = "".join(
        f"<th>{_e(c)}</th>"
        if pd.api.types.is_numeric_dtype(shown[c]) and not pd.api.types.is_bool_dtype(shown[c])
        else f'<th class="text">{_e(c)}</th>'
        for c in shown.columns
    )
    rows = []
    for values in shown.itertuples(index=False):
        cells = []
        for value in values:
            text, key, is_text = _cell(value)
            cells.append(f'<td data-v="{_e(key)}"' + (' class="text"' if is_text else "") + f">{_e(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="muted">first {len(shown)} of {len(df)} rows</p>' if len(shown) < len(df) else ""
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>" + "\n".join(rows) + "</tbody></table>" + more


def read_census(path: str | os.PathLike) -> pd.DataFrame:
    """A census CSV written by :func:`write_report` or ``headlens census``, checked for the census columns."""
    path = Path(path)
    if not path.is_file():
        raise HeadlensError(f"no census table at {path}: run `headlens census` or let `headlens report` compute it")
    return viz.check_census(pd.read_csv(path))


class _Page:
    """Collects sections, CircuitsVis views and figures; emits the page with one bundle."""

    def __init__(self, figures_dir: Path | None, dpi: int):
        self.sections: list[tuple[str, str, str]] = []
        self.calls: list[str] = []
        self.figures_dir, self.dpi = figures_dir, dpi

    def section(self, key: str, title: str, body: str) -> None:
        self.sections.append((key, title, body))

    def view(self, view: viz.CircuitsVisView) -> str:
        div_id = f"cv-{len(self.calls)}"
        self.calls.append(viz.render_call(div_id, view.name, view.props))
        title = f"<h3>{_e(view.title)}</h3>" if view.title else ""
        return title + view.div(div_id)

    def figure(self, fig: Figure, name: str, alt: str) -> str:
        png = viz.figure_png(fig, dpi=self.dpi)
        if self.figures_dir is not None:
            write_bytes(self.figures_dir / f"{name}.png", png)
        return viz.figure_img(fig, alt=alt, png=png)

    def html(self, title: str, subtitle: str) -> str:
        nav = "".join(f'<a href="#{_e(key)}">{_e(name)}</a>' for key, name, _ in self.sections)
        body = "\n".join(
            f'<section id="{_e(key)}"><h2>{_e(name)}</h2>\n{content}\n</section>'
            for key, name, content in self.sections
        )
        scripts = ""
        if self.calls:
            scripts = f"<script>{viz.bundle_js()}</script>\n<script>\n" + "\n".join(self.calls) + "\n</script>\n"
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f'<header><h1>{_e(title)}</h1><p class="muted">{_e(subtitle)}</p><nav>{nav}</nav></header>\n'
            f"{body}\n{scripts}<script>{SORT_JS}</script>\n</body>\n</html>\n"
        )


def _model_section(page: _Page, info: dict) -> None:
    rows = []
    for key, value in info.items():
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        elif isinstance(value, int) and key == "n_params":
            value = f"{value:,}"
        rows.append({"": key, "value": "" if value is None else str(value)})
    page.section("model", "Model", table_html(pd.DataFrame(rows)))


def label_counts(census: pd.DataFrame, *, k: int = 3) -> pd.DataFrame:
    """Heads per label (``LABELS`` order, then any other label) with their share and top heads."""
    counts = census["label"].value_counts()
    order = [lb for lb in viz.LABELS if lb in counts.index] + sorted(set(counts.index) - set(viz.LABELS))
    top = viz.top_heads(census, k=k, labels=[lb for lb in order if lb in viz.LABEL_SCORE])
    rows = []
    for label in order:
        names = top.loc[top["label"] == label]
        rows.append(
            {
                "label": label,
                "heads": int(counts[label]),
                "share": float(counts[label] / len(census)),
                "top heads": " ".join(f"{viz.head_name(r.layer, r.head)} ({r.score:.2f})" for r in names.itertuples()),
            }
        )
    return pd.DataFrame(rows, columns=["label", "heads", "share", "top heads"])


def _frames(key: str, results) -> list[pd.DataFrame]:
    frames = (
        [results]
        if isinstance(results, pd.DataFrame)
        else list(results)
        if isinstance(results, (list, tuple))
        else None
    )
    if not frames or not all(isinstance(f, pd.DataFrame) for f in frames):
        raise HeadlensError(
            f"{key} must be a pandas DataFrame (e.g. with layer, head and value columns) or a list of them, "
            f"got {type(results).__name__}"
        )
    if any(f.empty for f in frames):
        raise HeadlensError(f"the {key} table is empty")
    return frames


def _results_section(
    page: _Page, key: str, title: str, frames: list[pd.DataFrame], *, n_layers: int, n_heads: int
) -> None:
    """Figures and a sortable table for each result frame: distance curves when it has a distance column,
    layer x head heatmaps when it has one row per head (per probe / activation), else the table alone."""
    parts = []
    for i, df in enumerate(frames):
        name = key if i == 0 else f"{key}_{i}"
        if "distance" in df.columns:
            value = "attention" if "attention" in df.columns else (viz.value_columns(df) or [None])[0]
            if value is None:
                raise HeadlensError(
                    f"the {key} table has no numeric value column next to 'distance': add a 'value' column"
                )
            parts.append(
                page.figure(viz.distance_plot(df, value), f"{name}_{value}_by_distance", f"{key} {value} by distance")
            )
            parts.append(
                f'<p class="muted">{len(df)} rows (layer, head, distance); the figure shows the mean over each layer\'s heads.</p>'
            )
            continue
        if viz.is_per_head(df) and viz.value_columns(df):
            values = viz.value_columns(df)
            fig = viz.head_heatmaps(df, values, n_layers=n_layers, n_heads=n_heads)
            parts.append(page.figure(fig, name, f"{key} by layer and head"))
            df = df.reindex(df[values[0]].abs().sort_values(ascending=False, na_position="last").index)
            parts.append(f"<p>Largest |{_e(values[0])}| first; click a column to sort.</p>")
        parts.append(table_html(df, sortable=True, max_rows=MAX_TABLE_ROWS))
    page.section(key, title, "\n".join(parts))


def write_report(
    out_dir: str | os.PathLike,
    *,
    model: HookedTransformer,
    census: pd.DataFrame,
    prompt: str = viz.DEFAULT_PROMPT,
    heads: Sequence[tuple[int, int]] | None = None,
    ablation: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    patching: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    compare: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    rope: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    top_k: int = 3,
    max_tokens: int = 128,
    title: str | None = None,
    dpi: int = 150,
    figures: bool = True,
    seed: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained, offline) and return its path.

    Sections: model summary, label counts and label map, census score heatmaps, sortable census table,
    a CircuitsVis gallery of the ``top_k`` heads of each label on ``prompt``, the chosen ``heads``, and
    ablation / patching / compare / rope when given: DataFrames (or lists of them, e.g. ``rope_profile``'s
    pair) as headlens returns them. Per-head tables become layer x head heatmaps of their numeric columns
    (``value`` alone when present), tables with a ``distance`` column become distance curves. Also writes
    ``census.csv`` and, with ``figures``, ``figures/*.png``.
    """
    viz.check_census(census, model)
    sections = [
        (key, heading, _frames(key, results))
        for key, heading, results in (
            ("ablation", "Ablation", ablation),
            ("patching", "Activation patching", patching),
            ("compare", "Fine-tune comparison", compare),
            ("rope", "Position (RoPE)", rope),
        )
        if results is not None
    ]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HeadlensError(f"{out} is a file: pass a directory for the report")
    figures_dir = out / "figures" if figures else None
    (figures_dir or out).mkdir(parents=True, exist_ok=True)
    census = census.sort_values(["layer", "head"]).reset_index(drop=True)
    info = model_info(model)
    n_layers, n_heads = info["n_layers"], info["n_heads"]
    page = _Page(figures_dir, dpi)
    bar = tqdm(total=5 + len(sections), desc="report", unit="part", disable=not progress, leave=False)

    _model_section(page, info)
    counts = label_counts(census, k=top_k)
    page.section(
        "labels",
        "Head labels",
        table_html(counts) + "\n" + page.figure(viz.label_map(census), "head_labels", "head labels by layer and head"),
    )
    bar.update(1)
    page.section(
        "scores",
        "Census scores",
        "<p>One panel per score; dashed lines separate heads that share a kv head (GQA).</p>\n"
        + page.figure(viz.score_heatmaps(census), "census_scores", "census scores by layer and head"),
    )
    options = "".join(f'<option value="{_e(lb)}">{_e(lb)}</option>' for lb in counts["label"])
    label_col = list(census.columns).index("label")
    page.section(
        "census",
        "Census table",
        f'<p>Click a column to sort. Label: <select data-filter="census-table" data-col="{label_col}"><option value="">all</option>{options}</select></p>\n'
        f'<div class="scroll">{table_html(census, table_id="census-table", sortable=True)}</div>',
    )

    bar.update(1)
    shown_prompt = f'<p>Prompt:</p><pre class="prompt">{_e(prompt)}</pre>'
    views = viz.gallery(model, census, prompt, k=top_k, max_tokens=max_tokens)
    gallery_body = "\n".join(page.view(v) for v in views) or '<p class="muted">No labelled heads to show.</p>'
    page.section("gallery", "Gallery: top heads of each label", shown_prompt + "\n" + gallery_body)
    bar.update(1)
    if heads:
        view = viz.attention_view(model, prompt, heads, component="patterns", max_tokens=max_tokens)
        page.section("heads", "Chosen heads", f"<p>{_e(view.title)} on the prompt above.</p>\n" + page.view(view))

    for key, heading, frames in sections:
        _results_section(page, key, heading, frames, n_layers=n_layers, n_heads=n_heads)
        bar.update(1)

    write_csv(census, out / "census.csv", provenance=census.attrs.get("provenance"))
    path = out / "report.html"
    subtitle = (
        f"{info['model']}: {n_layers} layers x {n_heads} heads ({info['n_kv_heads']} kv heads); headlens {_version()}"
    )
    write_text(path, page.html(title or f"headlens report: {info['model']}", subtitle))
    bar.update(bar.total - bar.n)
    bar.close()
    return path

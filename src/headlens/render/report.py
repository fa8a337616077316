"""One self-contained HTML page that shows what a model's heads do, plus the figures as PNG for papers.

The page inlines the CircuitsVis bundle once and renders every component with
``CircuitsVis.render(id, CircuitsVis.<Name>, props)``; heatmaps are inline base64 PNGs; the census table
sorts with a few lines of inline JS. A Content-Security-Policy forbids every fetch, so the page opens
offline, from a file, anywhere, and cannot phone home.
"""

from __future__ import annotations

import base64
import os
import platform
import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from transformer_lens import HookedTransformer

from headlens.analysis import cards
from headlens.analysis.evidence import verdict_table
from headlens.census import CensusResult
from headlens.census.registry import head_types as registered
from headlens.engine.capture import VIEW_TOKENS, head_patterns
from headlens.errors import HeadlensError, check_model
from headlens.heads import check_head, parse_heads, unit_name
from headlens.io import headlens_version, output_set, weights_sha256, write_bytes, write_text
from headlens.models import DEFAULT_MODEL, QWEN_SHA256, model_info
from headlens.progress import tqdm
from headlens.render import viz

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
table.heatmap { border-collapse: separate; border-spacing: 1px; font-size: 10px; }
table.heatmap th { padding: 0 3px; font-weight: normal; color: #777; border: 0; }
table.heatmap td { width: 14px; height: 12px; padding: 0; border: 0; cursor: pointer; text-align: center; }
table.heatmap td.kv { box-shadow: -1px 0 0 #444; }
table.heatmap td.na { background: #fafafa; cursor: default; }
table.heatmap td:hover { outline: 2px solid #000; }
table.labels td { width: 26px; height: 22px; font: 600 11px/22px system-ui, sans-serif; }
.legend .swatch { width: auto; min-width: 20px; height: 18px; text-align: center; font: 600 11px/18px system-ui, sans-serif; border: 1px solid #555; }
#head-card { max-width: 900px; }
#head-scores tr.decides td { font-weight: 700; background: #fff3c4; }
.verdict-supported { color: #117733; font-weight: 600; }
.verdict-not { color: #882255; font-weight: 600; }
figure.grid { display: inline-block; margin: 4px 12px 12px 0; vertical-align: top; }
figure.grid figcaption { font-weight: 600; }
.scale { display: flex; align-items: center; gap: 4px; font-size: 10px; color: #555; }
.scale .bar { display: inline-block; width: 90px; height: 8px; }
.scale .seq { background: linear-gradient(90deg, #440154, #3b528b, #21918c, #5ec962, #fde725); }
.scale .div { background: linear-gradient(90deg, #053061, #4393c3, #f7f7f7, #d6604d, #67001f); }
.key { margin-right: 12px; white-space: nowrap; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 3px; vertical-align: middle; }
a[data-head] { font-family: ui-monospace, monospace; }
#head-view { border: 1px solid #ddd; padding: 8px 12px; background: #fcfcfc; }
#head-view h3 { margin: 4px 0; }
.evidence { display: flex; flex-wrap: wrap; gap: 24px; }
dl.methods { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; }
dl.methods dt { font-weight: 600; }
dl.methods dd { margin: 0; }
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


HEAD_JS = """
(function () {
  var data = JSON.parse(document.getElementById("head-data").textContent);
  var select = document.getElementById("head-select");
  function el(tag, text) { var e = document.createElement(tag); if (text !== undefined) e.textContent = text; return e; }
  function table(columns, rows) {
    var t = el("table"), head = t.createTHead().insertRow(), body = t.createTBody();
    columns.forEach(function (c) { head.appendChild(el("th", c)); });
    rows.forEach(function (r) { var tr = body.insertRow(); r.forEach(function (v) { tr.insertCell().textContent = v; }); });
    return t;
  }
  function pattern(b64, n) {
    var raw = atob(b64.replace(/-/g, "+").replace(/_/g, "/")), m = [], i = 0;
    for (var q = 0; q < n; q++) { var row = []; for (var k = 0; k < n; k++) row.push(k <= q ? raw.charCodeAt(i++) / 255 : 0); m.push(row); }
    return m;
  }
  function show(name, scroll) {
    var h = data.heads[name];
    if (!h) return;
    select.value = name;
    document.getElementById("head-title").textContent = name + ": " + h.label + " (kv head " + h.kv_head + ")";
    document.getElementById("head-card").textContent = h.card || "";
    var verdict = document.getElementById("head-verdict");
    verdict.textContent = h.verdict ? "Causal verdict of its label: " + h.verdict : "";
    verdict.className = h.verdict === "supported" ? "verdict-supported" : (h.verdict === "no evidence" ? "verdict-not" : "muted");
    var scores = document.getElementById("head-scores"), st = table(data.score_columns, h.scores);
    if (h.decides >= 0) st.tBodies[0].rows[h.decides].className = "decides";
    scores.replaceChildren(st);
    var old = document.getElementById("head-pattern"), div = el("div");
    div.id = "head-pattern"; div.className = "cv-head"; old.replaceWith(div);
    try {
      CircuitsVis.render("head-pattern", CircuitsVis.AttentionHeads,
        {tokens: data.tokens, attention: [pattern(h.pattern, data.tokens.length)], attentionHeadNames: [name], maskUpperTri: true});
    } catch (e) { div.textContent = "CircuitsVis failed: " + e; }
    var ev = document.getElementById("head-evidence");
    ev.replaceChildren();
    Object.keys(h.evidence).forEach(function (key) {
      var box = el("div"); box.className = "evidence-" + key;
      box.appendChild(el("h4", data.sections[key] || key));
      box.appendChild(table(h.evidence[key].columns, h.evidence[key].rows));
      ev.appendChild(box);
    });
    if (!Object.keys(h.evidence).length) ev.appendChild(el("p", "No single-head effect, task role, ablation, patching, comparison or RoPE result for this head in this report (headlens census measures the top heads of each label; headlens report --clean/--corrupted adds a task, --with adds sections)."));
    if (scroll) {
      document.getElementById("head").scrollIntoView();
      try { history.replaceState(null, "", "#head=" + name); } catch (e) {}  // a link to this head
    }
  }
  window.headlensShowHead = show;
  select.addEventListener("change", function () { show(select.value, false); });
  document.addEventListener("click", function (e) {
    var t = e.target.closest("[data-head]");
    if (t && data.heads[t.dataset.head]) { e.preventDefault(); show(t.dataset.head, true); }
  });
  var linked = /^#head=(L[0-9]+H[0-9]+)$/.exec(location.hash);  // report.html#head=L9H8 opens that head
  if (linked && data.heads[linked[1]]) show(linked[1], true); else show(data.first, false);
})();
"""

DEFINITIONS = {
    "previous_token": "mean attention from position i to i-1 (i >= 1), on natural text",
    "duplicate_token": "on [P, A1..An, A1..An], attention from the second Ai to the first Ai",
    "induction": "on the same repeated tokens, attention from the second Ai to the token after the first Ai (prefix matching, Olsson et al. 2022)",
    "copying": "sum of eigenvalues / sum of their absolute values of the OV circuit W_E W_V W_O W_U (computed factored)",
    "first_token": "attention to position 0 (the sink: Qwen prepends no BOS)",
    "delimiter": "attention on delimiter tokens minus the delimiters' share of keys 1..i (0 = a uniform head)",
    "local": "attention on the query and the 3 keys before it",
    "entropy": "per-query attention entropy / log(number of keys), averaged (a score only: untrained heads are broadest)",
}
"""What each census score measures (the report's methods section prints these)."""


def _e(value) -> str:
    return viz.escape(value)


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


def _with_names(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a first column ``name`` (L5H3, or L5KV1 for a kv-head row) when it has layer and head columns."""
    if not {"layer", "head"} <= set(df.columns) or "name" in df.columns:
        return df
    names = [
        unit_name(r.layer, r.head, r.kv_head)
        if pd.isna(r.head) and "kv_head" in df.columns and pd.notna(r.kv_head)
        else ("" if pd.isna(r.head) or pd.isna(r.layer) else viz.head_name(r.layer, r.head))
        for r in df[["layer", "head", *(["kv_head"] if "kv_head" in df.columns else [])]].itertuples(index=False)
    ]
    return df.assign(name=names)[["name", *df.columns]]


def table_html(
    df: pd.DataFrame,
    *,
    table_id: str = "",
    sortable: bool = False,
    max_rows: int | None = None,
    head_links: bool = True,
) -> str:
    """An HTML table of ``df`` (every string escaped); ``sortable`` tables sort by column on click. With ``head_links``
    a table with layer and head columns gets a first column of head names (L5H3) that open the head's view."""
    if head_links:
        df = _with_names(df)
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
        for col, value in zip(shown.columns, values):
            text, key, is_text = _cell(value)
            inner = _e(text)
            if head_links and col == "name" and re.fullmatch(r"L\d+H\d+", text):
                inner = f'<a href="#head" data-head="{_e(text)}">{inner}</a>'
            cells.append(f'<td data-v="{_e(key)}"' + (' class="text"' if is_text else "") + f">{inner}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="muted">first {len(shown)} of {len(df)} rows</p>' if len(shown) < len(df) else ""
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>" + "\n".join(rows) + "</tbody></table>" + more


def read_census(path: str | os.PathLike) -> pd.DataFrame:
    """A census CSV written by :func:`write_report` or ``headlens census``, checked for the census columns."""
    path = Path(path)
    if not path.is_file():
        raise HeadlensError(f"no census table at {path}: run `headlens census` or let `headlens report` compute it")
    try:
        table = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
        raise HeadlensError(
            f"{path} is not a census CSV ({str(err).strip().splitlines()[0]}); rerun `headlens census`"
        ) from None
    table = viz.check_census(table)
    for column in ("layer", "head"):
        if not pd.api.types.is_integer_dtype(table[column]) or (table[column] < 0).any():
            raise HeadlensError(f"{path}: column {column!r} must hold non-negative integers; rerun `headlens census`")
    if table["label"].isna().any() or not table["label"].map(lambda v: isinstance(v, str)).all():
        raise HeadlensError(f"{path}: some heads have no label (empty or NaN); rerun `headlens census`")
    return table


class _Page:
    """Collects sections, CircuitsVis views and figures; emits the page with one bundle."""

    def __init__(self, figures_dir: Path | None, dpi: int):
        self.sections: list[tuple[str, str, str]] = []
        self.calls: list[str] = []
        self.head_data: dict | None = None
        self.figures_dir, self.dpi = figures_dir, dpi
        self.written: list[Path] = []

    def section(self, key: str, title: str, body: str) -> None:
        self.sections.append((key, title, body))

    def view(self, view: viz.CircuitsVisView) -> str:
        div_id = f"cv-{len(self.calls)}"
        self.calls.append(viz.render_call(div_id, view.name, view.props))
        title = f"<h3>{_e(view.title)}</h3>" if view.title else ""
        return title + view.div(div_id)

    def save(self, fig: Figure, name: str) -> bytes:
        """Write ``fig`` as figures/NAME.png (for papers) and return the PNG."""
        png = viz.figure_png(fig, dpi=self.dpi)
        if self.figures_dir is not None:
            self.written.append(write_bytes(self.figures_dir / f"{name}.png", png))
        return png

    def figure(self, fig: Figure, name: str, alt: str) -> str:
        return viz.figure_img(fig, alt=alt, png=self.save(fig, name))

    def html(self, title: str, subtitle: str) -> str:
        nav = "".join(f'<a href="#{_e(key)}">{_e(name)}</a>' for key, name, _ in self.sections)
        body = "\n".join(
            f'<section id="{_e(key)}"><h2>{_e(name)}</h2>\n{content}\n</section>'
            for key, name, content in self.sections
        )
        scripts = ""
        if self.calls or self.head_data:
            scripts = f"<script>{viz.bundle_js()}</script>\n"
        if self.calls:
            scripts += "<script>\n" + "\n".join(self.calls) + "\n</script>\n"
        if self.head_data:
            scripts += (
                f'<script type="application/json" id="head-data">{viz.script_json(self.head_data)}</script>\n'
                f"<script>{HEAD_JS}</script>\n"
            )
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


def head_types() -> list[dict]:
    """Name, description, threshold, score column, tier, colour and whether it labels, of every registered head type
    (``headlens.census.registry``): the report's thresholds, definitions and label colours all come from here."""

    return [
        {
            "name": t.name,
            "description": t.description,
            "threshold": t.threshold,
            "score": t.column,
            "tier": t.tier,
            "color": t.color,
            "label": t.label,
        }
        for t in registered().values()
    ]


def _versions() -> str:
    parts = [f"headlens {headlens_version()}", f"python {platform.python_version()}"]
    for pkg in ("torch", "transformer-lens", "transformers", "circuitsvis"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


def _methods_section(page: _Page, model: HookedTransformer, info: dict, census: CensusResult, prompt: str) -> None:
    """What a reader needs to interpret the numbers: weights, seed, probes, thresholds, definitions, versions."""

    source = (
        f"GGUF sha256 {QWEN_SHA256} (checked at first load)" if info["model"] == DEFAULT_MODEL else "see weights hash"
    )
    dtype = str(model.cfg.dtype).removeprefix("torch.")
    items = [
        (
            "model",
            f"{info['model']} ({info['architecture']}), {info['n_layers']} layers x {info['n_heads']} q heads, "
            f"{info['n_kv_heads']} kv heads, {dtype} on {model.cfg.device}",
        ),
        ("source", source),
        ("weights sha256", weights_sha256(model) + " (processed state dict)"),
    ]
    settings = (census.provenance or {}).get("settings") or {}
    if census.probes is None and settings.get("probes") == "default" and "seed" in settings:
        items += [("seed", str(settings["seed"])), ("probes", "the default census probes (as its provenance records)")]
    elif census.probes is None:
        items.append(
            ("seed / probes", "not recorded: the census was read from a table; its seed and probes are the caller's")
        )
    else:
        sizes = "; ".join(
            f"{p.kind} {p.n_seqs} x {p.tokens.shape[1]} tokens"
            + (f" (repeat n={int(p.n_per_seq.min())}..{int(p.n_per_seq.max())})" if p.n is not None else "")
            for p in census.probes.values()
        )
        items += [("seed", str(census.seed)), ("probes", sizes)]
    types = [t for t in head_types() if t["label"]]
    items.append(("thresholds", "; ".join(f"{t['name']}: {t['score']} >= {t['threshold']}" for t in types)))
    tiers = sorted({t["tier"] for t in types})
    order = " then ".join("(" + ", ".join(t["name"] for t in types if t["tier"] == tier) + ")" for tier in tiers)
    items.append(
        (
            "labelling",
            f"a head is a candidate for every label whose score reaches its threshold; tiers {order} are tried in "
            "order, and within the first tier with a candidate the highest score/threshold ratio wins; no candidate "
            "gives 'other'",
        )
    )
    described = {t["name"]: t["description"] for t in head_types() if t["description"]}
    table = census.table
    items += [(f"score: {name}", text) for name, text in described.items() if name in table.columns]
    items += [
        (f"score: {name}", text)
        for name, text in DEFINITIONS.items()
        if name in table.columns and name not in described
    ]
    if any(c.endswith("_lo") for c in table.columns):
        items.append(
            (
                "intervals",
                "<score>_lo / _hi: 95 % percentile bootstrap intervals over the probe sequences; confidence: the share "
                "of bootstrap resamples that give the head the same label; label counts carry the same intervals",
            )
        )
    extra = [c for c in table.columns if c not in viz.CENSUS_COLUMNS and not c.endswith(("_lo", "_hi"))]
    if extra:
        items.append(("more census columns", ", ".join(extra)))
    items += [
        (
            "attention prompt",
            f"{len(prompt)} {'characters' if isinstance(prompt, str) else 'tokens'}, shown in the gallery section",
        ),
        ("software", _versions()),
    ]
    body = '<dl class="methods">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"
    page.section("methods", "Methods", body)


def label_rows(census: CensusResult, *, top_k: int = 3, evidence=None) -> pd.DataFrame:
    """Heads per label (``LABELS`` order, then any other label) with their 95 % interval, share, top heads (by the
    deciding score, :func:`headlens.render.viz.top_heads_by_label`) and causal verdict (``evidence``, from
    :func:`headlens.analysis.evidence.label_evidence`; "not run" without it)."""
    table = census.table
    counts = table["label"].value_counts()
    order = [lb for lb in viz.LABELS if lb in counts.index] + sorted(set(counts.index) - set(viz.LABELS))
    top = viz.top_heads_by_label(table, top_k=top_k, labels=[lb for lb in order if lb in viz.LABEL_SCORE])
    bounds = {r.label: (r.lo, r.hi) for r in census.label_counts.itertuples()}
    rows = []
    for label in order:
        names = top.loc[top["label"] == label]
        rows.append(
            {
                "label": label,
                "heads": int(counts[label]),
                "heads 95% interval": f"{bounds[label][0]}-{bounds[label][1]}" if label in bounds else "",
                "share": float(counts[label] / len(table)),
                "top heads": " ".join(f"{viz.head_name(r.layer, r.head)} ({r.score:.2f})" for r in names.itertuples()),
                "causal verdict": ""
                if label == "other"
                else (evidence.verdict(label) if evidence is not None else "not run"),
            }
        )
    return pd.DataFrame(rows, columns=["label", "heads", "heads 95% interval", "share", "top heads", "causal verdict"])


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
    layer x head heatmaps (hover for values, click for the head) when it has one row per head, else the table alone."""
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
            page.save(viz.head_heatmaps(df, values, n_layers=n_layers, n_heads=n_heads), name)
            parts.append("<p>Hover a cell for its value, click it for the head's view.</p>")
            grids = []
            for group_name, group in viz._groups(df, None):
                kv_only = group_name.endswith("(kv heads)")
                for value in values[:6]:
                    grid = viz.head_grid(group, value, n_layers=n_layers, n_heads=None if kv_only else n_heads)
                    finite = grid[np.isfinite(grid)]
                    center = 0.0 if finite.size and finite.min() < 0 < finite.max() else None
                    label = f"{group_name}: {value}" if group_name else value
                    unit = (lambda layer, kv: unit_name(layer, None, kv)) if kv_only else viz.head_name
                    grids.append(viz.grid_html(grid, title=label, center=center, unit_name=unit, link=not kv_only))
            parts.append("".join(grids))
            df = df.reindex(df[values[0]].abs().sort_values(ascending=False, na_position="last").index)
            parts.append(f"<p>Largest |{_e(values[0])}| first; click a column to sort, a head name for its view.</p>")
        parts.append(f'<div class="scroll">{table_html(df, sortable=True, max_rows=MAX_TABLE_ROWS)}</div>')
    page.section(key, title, "\n".join(parts))


SECTION_TITLES = {
    "single": "Single-head effect on its label's task",
    "roles": "Task roles",
    "ablation": "Ablation",
    "patching": "Activation patching",
    "compare": "Fine-tune comparison",
    "rope": "Position (RoPE)",
}
MAX_EVIDENCE_ROWS = 8


def head_evidence(frames: dict[str, list[pd.DataFrame]], layer: int, head: int) -> dict:
    """Rows about one head from each result section (per-head tables only): ``{section: {columns, rows}}``."""
    out = {}
    for key, dfs in frames.items():
        columns, rows = None, []
        for df in dfs:
            if not {"layer", "head"} <= set(df.columns) or "distance" in df.columns:
                continue
            part = df[(df["layer"] == layer) & (df["head"] == head)]
            if part.empty:
                continue
            cols = [c for c in part.columns if c not in ("layer", "head", "kv_head", "removed")]
            values = viz.value_columns(df)
            if values:
                part = part.reindex(part[values[0]].abs().sort_values(ascending=False).index)
            columns = columns or cols
            for r in part.head(MAX_EVIDENCE_ROWS).itertuples(index=False):
                rows.append([_cell(getattr(r, c))[0] if c in part.columns else "" for c in columns])
        if rows:
            out[key] = {"columns": columns, "rows": rows}
    return out


def _quantized_tril(pattern: np.ndarray) -> str:
    """The lower triangle of a [q, k] pattern as URL-safe base64 bytes 0..255 (row by row): compact page data."""
    rows, cols = np.tril_indices(pattern.shape[0])
    data = np.clip(np.round(pattern[rows, cols] * 255), 0, 255).astype(np.uint8)
    return base64.urlsafe_b64encode(data.tobytes()).decode("ascii")


SCORE_COLUMNS = ["score", "raw [95% interval]", "sink-corrected [95% interval]", "threshold", "read / threshold", ""]


def _interval(value: float, lo: float, hi: float) -> str:
    if not np.isfinite(value):
        return ""
    return f"{value:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else "")


def head_scores(census: pd.DataFrame, layer: int, head: int, *, tables=None) -> tuple[list[list[str]], int]:
    """The head view's score rows (every registered score, raw and sink-corrected, against its threshold; the value
    the label rule read in bold by its row) and the index of the row that decided the label (-1: none); ``tables``:
    :func:`headlens.analysis.cards.score_tables` of ``census``, made once for every head."""
    rows, decides = [], -1
    table = (tables or cards.score_tables(census))(layer, head)
    for i, r in enumerate(table.itertuples(index=False)):
        read = r.nosink if r.read == "nosink" else r.raw
        mark = ("decides the label, " if r.decides else "") + ("sink-corrected read" if r.read == "nosink" else "")
        rows.append(
            [
                r.score,
                _interval(r.raw, r.raw_lo, r.raw_hi),
                _interval(r.nosink, r.nosink_lo, r.nosink_hi),
                "" if not np.isfinite(r.threshold) else f"{r.threshold:g}",
                "" if not np.isfinite(r.ratio) else f"{read:.3f} / {r.threshold:g} = {r.ratio:.2f}",
                mark.strip(", "),
            ]
        )
        if r.decides:
            decides = i
    return rows, decides


def _head_view(
    page: _Page, census: pd.DataFrame, tokens: list[str], patterns, frames: dict, first: str, evidence
) -> None:
    """The per-head view: a picker, the head's card, its causal verdict, every score against its threshold (the deciding
    one marked), the pattern on the prompt, and its rows of each evidence section.

    ``patterns``: every head's pattern on the prompt, in the table's (layer, head) order."""
    heads = list(zip(census["layer"].astype(int), census["head"].astype(int)))
    data_heads = {}
    tables = cards.score_tables(census)
    for (layer, head), (_, row), pattern in zip(heads, census.iterrows(), patterns.numpy()):
        name = viz.head_name(layer, head)
        scores, decides = head_scores(census, layer, head, tables=tables)
        label = str(row["label"])
        title = label
        if "confidence" in census.columns and pd.notna(row["confidence"]):
            title += f", confidence {row['confidence']:.2f}"
        data_heads[name] = {
            "label": title,
            "kv_head": int(row["kv_head"]),
            "card": str(row["card"]) if "card" in census.columns and isinstance(row["card"], str) else "",
            "verdict": "" if label == "other" else (evidence.verdict(label) if evidence is not None else "not run"),
            "scores": scores,
            "decides": decides,
            "pattern": _quantized_tril(pattern),
            "evidence": head_evidence(frames, layer, head),
        }
    page.head_data = {
        "tokens": [str(t) for t in tokens],
        "heads": data_heads,
        "first": first,
        "score_columns": SCORE_COLUMNS,
        "sections": {k: SECTION_TITLES.get(k, k) for k in frames},
    }
    options = "".join(f'<option value="{n}">{n} {_e(h["label"].split(",")[0])}</option>' for n, h in data_heads.items())
    body = (
        f'<p>Pick a head <select id="head-select">{options}</select> or click one in the label map, a heatmap or a table. '
        "Its card (generated from the numbers below), the causal verdict of its label, every census score against its "
        "label threshold (raw and sink-corrected; the row that decided the label is highlighted, and the label rule "
        "reads the sink-corrected score where the head parks at least 30 % of its attention on the first token), the "
        "pattern on the report's prompt (rounded to 1/255), and the head's rows from the other sections.</p>"
        '<div id="head-view"><h3 id="head-title"></h3><p id="head-card"></p><p id="head-verdict"></p>'
        '<div class="evidence"><div id="head-scores"></div>'
        '<div id="head-evidence" class="evidence"></div></div><div id="head-pattern" class="cv-head"></div></div>'
    )
    page.section("head", "Head view", body)


def _causal_section(page: _Page, evidence, labels: list[str]) -> None:
    """Each label's causal verdict, and the single-head effects of its top heads."""
    verdicts = verdict_table(evidence, labels)
    parts = [table_html(verdicts, head_links=False)]
    if evidence is None:
        parts.insert(0, '<p class="muted">Not run: <code>headlens census</code> tests each label by default '
                        "(<code>--no-causal</code> skips it).</p>")  # fmt: skip
    else:
        s = evidence.settings
        parts.insert(
            0,
            f"<p>Each label's heads are mean-ablated together on the label's task and compared with {s.get('n_random')} "
            f"layer-matched random head sets ({s.get('n_seqs')} sequences per task; ratio = target effect / mean random "
            "effect, 95 % interval over the random draws; p = share of random sets at least as strong). Verdict: "
            "<b>supported</b> when the effect has the expected sign and no random set is as strong (p = 0; with "
            f"{s.get('n_random')} sets a label no different from random passes 1 time in {s.get('n_random', 0) + 1}); "
            "labels no task tests are "
            "<b>descriptive</b> (they say what a head attends to on a probe, not what it does).</p>",
        )
        if len(evidence.heads):
            parts.append("<h3>Single-head effects (top heads of each tested label, ablated alone)</h3>")
            parts.append(table_html(evidence.heads, sortable=True))
    page.section("causal", "Causal evidence", "\n".join(parts))


def write_report(
    out_dir: str | os.PathLike,
    *,
    model: HookedTransformer,
    census: CensusResult | pd.DataFrame,
    prompt: str = viz.DEFAULT_PROMPT,
    heads: Sequence[tuple[int, int]] | None = None,
    ablation: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    patching: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    compare: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    rope: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    roles: pd.DataFrame | None = None,
    evidence=None,
    top_k: int = 3,
    max_tokens: int = VIEW_TOKENS,
    title: str | None = None,
    dpi: int = 150,
    figures: bool = True,
    progress: bool = True,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained, offline) and, with ``figures``, ``figures/*.png``; return its path.
    ``report_files.json`` lists them; figures an earlier report there drew and this one does not are removed.

    ``census`` is the :class:`~headlens.census.CensusResult` of :func:`headlens.run_census` (a bare census table, e.g.
    read back with :func:`read_census`, works too; its seed and probes are then not recorded); a census whose provenance
    records other weights than ``model``'s is refused before anything is written. Sections: methods
    (weights hash, dtype and device, seed and probe sizes, thresholds, score definitions, versions), model, label counts
    and a clickable label map, census score heatmaps (values on hover), the census table, a per-head view (pattern on
    ``prompt``, scores, evidence), a CircuitsVis gallery of the ``top_k`` heads of each label, the chosen ``heads``, and
    ablation / patching / compare / rope when given: DataFrames (or lists of them, e.g. ``rope_profile``'s pair) as
    headlens returns them. Per-head tables become layer x head heatmaps, tables with a ``distance`` column distance
    curves. One forward over ``prompt`` gives every pattern the page shows.
    """
    check_model(model)
    if not isinstance(census, CensusResult):
        census = CensusResult.from_table(viz.check_census(census))
    viz.check_census(census.table, model)
    made_on, weights = (census.provenance or {}).get("weights"), weights_sha256(model)
    if made_on and made_on != weights:
        raise HeadlensError(
            f"the census was computed on other weights ({census.provenance.get('model')}, sha256 {made_on[:12]}...) than "
            f"this model's ({model.cfg.model_name}, sha256 {weights[:12]}...): pass this model's census, or rerun "
            "headlens.run_census(model)"
        )
    chosen = [] if heads is None else parse_heads(heads)
    for layer, head in chosen:
        check_head(model, layer, head)
    sections = [
        (key, SECTION_TITLES[key], _frames(key, results))
        for key, results in (
            ("roles", roles),
            ("ablation", ablation),
            ("patching", patching),
            ("compare", compare),
            ("rope", rope),
        )
        if results is not None
    ]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HeadlensError(f"{out} is a file: pass a directory for the report")
    table = census.table.sort_values(["layer", "head"]).reset_index(drop=True)
    all_heads = list(zip(table["layer"].astype(int), table["head"].astype(int)))
    tokens, patterns = head_patterns(model, prompt, all_heads, max_tokens=max_tokens)
    figures_dir = out / "figures" if figures else None
    (figures_dir or out).mkdir(parents=True, exist_ok=True)
    info = model_info(model)
    n_layers, n_heads = info["n_layers"], info["n_heads"]
    page = _Page(figures_dir, dpi)
    bar = tqdm(total=6 + len(sections), desc="report", unit="part", disable=not progress, leave=False)

    _methods_section(page, model, info, census, prompt)
    _model_section(page, info)
    bar.update(1)
    counts = label_rows(census, top_k=top_k, evidence=evidence)
    page.save(viz.label_map(table), "head_labels")
    page.section(
        "labels",
        "Head labels",
        table_html(counts)
        + "\n<p>Top heads by the score that decided their label (sink-corrected where the head sinks). Hover a head "
        "for its label and that score; click it for its view.</p>\n" + viz.label_grid_html(table),
    )
    _causal_section(page, evidence, list(counts["label"]))
    bar.update(1)
    page.save(viz.score_heatmaps(table), "census_scores")
    kv_group = n_heads // info["n_kv_heads"] if info["n_kv_heads"] and info["n_kv_heads"] < n_heads else None
    grids = "".join(
        viz.grid_html(viz.head_grid(table, s, n_layers=n_layers, n_heads=n_heads), title=s, kv_group=kv_group)
        for s in viz.SCORES
        if s in table.columns
    )
    page.section(
        "scores",
        "Census scores",
        "<p>One map per score (a row per layer, a column per head); hover a cell for its value, "
        "click it for the head's view; a dark left edge starts a new kv group (GQA).</p>\n" + grids,
    )
    options = "".join(f'<option value="{_e(lb)}">{_e(lb)}</option>' for lb in counts["label"])
    shown = table.drop(columns=[c for c in ("card",) if c in table.columns])  # cards are in the head view
    label_col = list(_with_names(shown).columns).index("label")
    page.section(
        "census",
        "Census table",
        f'<p>Click a column to sort, a head name for its view. Label: <select data-filter="census-table" data-col="{label_col}">'
        f'<option value="">all</option>{options}</select></p>\n'
        f'<div class="scroll">{table_html(shown, table_id="census-table", sortable=True)}</div>',
    )
    bar.update(1)

    frames = {key: fs for key, _, fs in sections}
    if evidence is not None and len(evidence.heads):
        frames = {"single": [evidence.heads.drop(columns=["label_score"])], **frames}
    top = viz.top_heads_by_label(table, top_k=1)
    first = (
        viz.head_name(*chosen[0])
        if chosen
        else (viz.head_name(top.iloc[0]["layer"], top.iloc[0]["head"]) if len(top) else "L0H0")
    )
    _head_view(page, table, tokens, patterns, frames, first, evidence)
    bar.update(1)

    text = prompt if isinstance(prompt, str) else " ".join(tokens)
    shown_prompt = f'<p>Prompt:</p><pre class="prompt">{_e(text)}</pre>'
    index = {head: i for i, head in enumerate(all_heads)}
    views = viz.gallery_views(table, tokens, lambda lh: patterns[index[lh]], top_k=top_k)
    gallery_body = "\n".join(page.view(v) for v in views) or '<p class="muted">No labelled heads to show.</p>'
    page.section("gallery", "Gallery: top heads of each label", shown_prompt + "\n" + gallery_body)
    if chosen:
        view = viz.heads_view(tokens, torch.stack([patterns[index[lh]] for lh in chosen]), chosen)
        page.section("heads", "Chosen heads", f"<p>{_e(view.title)} on the prompt above.</p>\n" + page.view(view))
    bar.update(1)

    for key, heading, frames_ in sections:
        _results_section(page, key, heading, frames_, n_layers=n_layers, n_heads=n_heads)
        bar.update(1)

    path = out / "report.html"
    subtitle = f"{info['model']}: {n_layers} layers x {n_heads} heads ({info['n_kv_heads']} kv heads); headlens {headlens_version()}"
    with output_set(out, "report") as written:  # a figure an earlier report drew and this one did not is removed
        written += [*page.written, write_text(path, page.html(title or f"headlens report: {info['model']}", subtitle))]
    bar.update(bar.total - bar.n)
    bar.close()
    return path

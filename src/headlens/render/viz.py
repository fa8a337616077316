"""See heads: CircuitsVis attention views that work offline, a gallery of top heads, layer x head heatmaps.

CircuitsVis' own ``str()`` pulls its JavaScript from a CDN and its ``_repr_html_`` probes the network
first. Here every view carries its component name and props and renders against the
bundle ``circuitsvis/dist/cdn/iife.js`` inlined in the page, so a notebook cell or a report opens
anywhere with no network. CircuitsVis' ``AttentionPatterns`` writes token strings into the page as HTML,
so its tokens are escaped (:func:`escape`, which also writes out bidirectional controls) before they go into
props, and all props JSON is made safe to sit inside ``<script>`` (``<``, ``>``, ``&`` as ``\u003c`` ...).
Heatmaps are plain matplotlib ``Figure`` objects (no pyplot state), exported as PNG, data URI or SVG.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.census.registry import head_types
from headlens.census.run import LABEL_SCORE, LABELS, SCORES, check_census_table
from headlens.engine.capture import VIEW_TOKENS, head_patterns
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import head_name, parse_head

CENSUS_COLUMNS = ("layer", "head", "kv_head", *SCORES, "label")  # the columns every census table has
PALETTE = {
    "previous_token": "#332288",  # Tol indigo
    "duplicate_token": "#CC79A7",  # Okabe-Ito reddish purple
    "induction": "#882255",  # Tol wine
    "copy_suppression": "#000000",  # Okabe-Ito black
    "first_token": "#BBBBBB",  # Tol grey: the bulk sink
    "delimiter": "#117733",  # Tol green
    "local": "#88CCEE",  # Tol cyan
    "successor": "#F0E442",  # Okabe-Ito yellow
    "bracket_matching": "#009E73",  # Okabe-Ito bluish green
    "closer_to_opener": "#442200",  # dark brown: the colour farthest from all the others in every vision (a search)
    "identifier": "#999933",  # Tol olive
    "positional": "#AA4499",  # Tol purple
    "other": "#F2F2F2",
}
"""Label colours from the Okabe-Ito and Paul Tol (muted) palettes, chosen so that every pair stays apart (CAM02-UCS
distance >= 13) in normal vision and in simulated deuteranopia, protanopia and tritanopia (tests/test_cards.py checks
it with colorspacious). A label registered later takes its head type's own colour."""
GLYPHS = {
    "previous_token": "P",
    "duplicate_token": "D",
    "induction": "I",
    "copy_suppression": "C",
    "first_token": "F",
    "delimiter": "Dl",
    "local": "L",
    "successor": "Sc",
    "bracket_matching": "B",
    "closer_to_opener": "Cl",
    "identifier": "Id",
    "positional": "Ps",
    "other": "",
}
"""One distinct glyph per label (the colour is a second cue, never the only one)."""


def label_colors() -> dict[str, str]:
    """Colour of every label: :data:`PALETTE` for the built-in ones, the head type's own colour for a label added later."""
    return {t.name: PALETTE.get(t.name, t.color) for t in head_types().values() if t.label} | {
        "other": PALETTE["other"]
    }


def label_glyphs(labels: Iterable[str] = ()) -> dict[str, str]:
    """A distinct glyph per label: :data:`GLYPHS`, and for a label added later the shortest unused prefix of its name."""
    glyphs = dict(GLYPHS)
    used = set(glyphs.values())
    for label in [t.name for t in head_types().values() if t.label] + list(labels):
        if label in glyphs:
            continue
        words = label.split("_")
        options = [words[0][:n].capitalize() for n in range(1, len(words[0]) + 1)] + [
            "".join(w[0] for w in words).upper()
        ]
        glyph = next((o for o in options if o not in used), label)
        glyphs[label] = glyph
        used.add(glyph)
    return glyphs


def _ink_hex(color: str) -> str:
    """Black or white glyph ink, whichever reads on ``color`` (a #rrggbb string)."""
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#fff"


DEFAULT_PROMPT = (
    "The cat sat on the mat, and the dog sat on the log. The cat sat on the mat, and the dog sat on the log.\n"
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n"
)
SPLIT_COLUMNS = ("probe", "activation", "method")
NON_VALUES = ("layer", "head", "kv_head", "pos", "n", "distance")
HEADLINE = ("effect", "exact", "attribution", "jsd", "gradient")
Component = Literal["heads", "patterns"]
_COMPONENTS = {"heads": "AttentionHeads", "patterns": "AttentionPatterns"}
_HTML_TOKENS = {"patterns"}  # components that insert token strings as HTML


# ---------------------------------------------------------------- script-safe HTML pieces


@lru_cache(maxsize=1)
def bundle_js() -> str:
    """The CircuitsVis browser bundle (defines the global ``CircuitsVis``), safe to inline in one ``<script>``."""
    source = (files("circuitsvis") / "dist" / "cdn" / "iife.js").read_text(encoding="utf-8")
    return re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE)


def script_json(value) -> str:
    """JSON for a ``<script>`` body: ``<``, ``>`` and ``&`` become ``\\u003c`` etc., so no ``</script>`` can close it."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_call(div_id: str, name: str, props: dict) -> str:
    """One JS statement rendering CircuitsVis component ``name`` into ``#div_id``; errors are shown in the div."""
    if not name.isidentifier():
        raise HeadlensError(f"{name!r} is not a CircuitsVis component name (e.g. 'AttentionHeads')")
    target = script_json(div_id)
    return (
        f"try {{ CircuitsVis.render({target}, CircuitsVis.{name}, {script_json(props)}); }} "
        f"catch (e) {{ document.getElementById({target}).textContent = 'CircuitsVis failed: ' + e; }}"
    )


DIRECTION_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Unicode bidirectional controls: one in a prompt or token would reorder the text after it on the page."""


def visible(text) -> str:
    """``text`` with each bidirectional control written out as ``<U+202E>`` (for canvas labels and plain text)."""
    return DIRECTION_CONTROLS.sub(lambda m: f"<U+{ord(m.group()):04X}>", str(text))


def escape(text) -> str:
    """``text`` safe in HTML, quotes included, with bidirectional controls written out (:func:`visible`)."""
    return html.escape(visible(text), quote=True)


@dataclass
class CircuitsVisView:
    """A CircuitsVis component and its props; renders offline against the inlined bundle.

    In a notebook the view displays itself through ``_repr_html_`` (bundle inlined, no network probe).
    """

    name: str
    props: dict
    title: str = ""

    def div(self, div_id: str) -> str:
        return f'<div id="{escape(div_id)}" class="circuitsvis"></div>'

    def to_html(self, prefix: str | None = None) -> str:
        """A self-contained HTML fragment: the component's div, the bundle, and the render call."""
        return ViewSet([self]).to_html(prefix=prefix)

    def _repr_html_(self) -> str:
        return ViewSet([self])._repr_html_()


_BUNDLE_SHOWN = False
"""Whether this process (a notebook kernel) has already emitted the CircuitsVis bundle in a ``_repr_html_``."""


def reset_notebook_bundle() -> None:
    """Make the next notebook view inline the CircuitsVis bundle again (e.g. after clearing that cell's output)."""
    global _BUNDLE_SHOWN
    _BUNDLE_SHOWN = False


MISSING_BUNDLE = (
    "This CircuitsVis view needs the bundle that an earlier output of this notebook inlined, and this page does not "
    "have it (cleared output, a view shown alone, an exported cell). Run "
    "headlens.render.viz.reset_notebook_bundle() and display the view again: it then carries the bundle itself."
)


def _wait_for_bundle(calls: list[str], ids: list[str]) -> str:
    """Render calls that wait until the bundle (inlined by an earlier cell's output) has defined ``CircuitsVis``; after
    3 s without it each view's div says so and names the one call that fixes it (:data:`MISSING_BUNDLE`)."""
    body = "\n".join(calls)
    missing = script_json(MISSING_BUNDLE)
    return (
        f"(function go(tries) {{ if (!window.CircuitsVis) {{ if (tries > 60) {{ {script_json(ids)}.forEach(function (id) "
        f"{{ var d = document.getElementById(id); if (d) d.textContent = {missing}; }}); return; }} "
        f"setTimeout(function () {{ go(tries + 1); }}, 50); return; }}\n{body}\n}})(0);"
    )


@dataclass
class ViewSet:
    """Several views shown together with ONE copy of the bundle (a gallery); displays itself in notebooks."""

    views: list[CircuitsVisView] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self):
        return iter(self.views)

    def to_html(self, prefix: str | None = None, *, bundle: bool = True) -> str:
        """Titles and divs (ids ``{prefix}-{i}``, random prefix by default), then the bundle once (unless ``bundle``
        is False: the page already has it), then the render calls."""
        prefix = prefix or f"headlens-cv-{uuid.uuid4().hex[:12]}"
        parts, calls, ids = [], [], []
        for i, view in enumerate(self.views):
            div_id = f"{prefix}-{i}"
            if view.title:
                parts.append(f"<h4>{escape(view.title)}</h4>")
            parts.append(view.div(div_id))
            calls.append(render_call(div_id, view.name, view.props))
            ids.append(div_id)
        scripts = [f"<script>{bundle_js()}</script>"] if bundle else []
        return "\n".join([*parts, *scripts, "<script>" + _wait_for_bundle(calls, ids) + "</script>"])

    def _repr_html_(self) -> str:
        """Notebook display: the first view of a kernel inlines the bundle, later ones reuse it (one copy per notebook)."""
        global _BUNDLE_SHOWN
        first = not _BUNDLE_SHOWN
        _BUNDLE_SHOWN = True
        return self.to_html(bundle=first)


# ---------------------------------------------------------------- attention views


def view_props(
    tokens: Sequence[str],
    patterns: Float[Tensor, "head q k"],
    *,
    component: Component = "heads",
    names: Sequence[str] | None = None,
    decimals: int = 4,
) -> dict:
    """CircuitsVis props for ``patterns``, values rounded to ``decimals``.

    ``attention_patterns`` writes each token into the page as HTML (``dangerouslySetInnerHTML``), so its tokens
    are escaped (:func:`escape`); ``attention_heads`` only draws tokens as canvas text (chart.js labels and
    tooltips), so it gets them unescaped (:func:`visible`), or ``a < b`` would read ``a &lt; b`` on its axes.
    """
    if component not in _COMPONENTS:
        raise HeadlensError(
            f"unknown component {component!r}: choose 'heads' (attention_heads) or 'patterns' (attention_patterns)"
        )
    attention = np.round(patterns.float().numpy().astype(np.float64), decimals).tolist()
    tokens = [escape(t) for t in tokens] if component in _HTML_TOKENS else [visible(t) for t in tokens]
    props = {"tokens": tokens, "attention": attention}
    if component == "heads":
        props["maskUpperTri"] = True
        if names is not None:
            props["attentionHeadNames"] = [str(n) for n in names]
    return props


def attention_view(
    model: HookedTransformer,
    prompt: str,
    heads: Sequence[tuple[int, int]],
    *,
    component: Component = "heads",
    title: str = "",
    max_tokens: int = VIEW_TOKENS,
) -> CircuitsVisView:
    """An offline CircuitsVis view of chosen heads on ``prompt``.

    ``component="heads"`` is ``circuitsvis.attention.attention_heads`` (named thumbnails + one big pattern),
    ``"patterns"`` is ``attention_patterns`` (tokens coloured by attention).
    """
    check_model(model)
    heads = [parse_head(h) for h in heads]  # "L9H8", (9, 8) or Head(9, 8), in the order given
    tokens, patterns = head_patterns(model, prompt, heads, max_tokens=max_tokens)
    return heads_view(tokens, patterns, heads, component=component, title=title)


def heads_view(
    tokens: Sequence[str],
    patterns: Float[Tensor, "head q k"],
    heads: Sequence[tuple[int, int]],
    *,
    component: Component = "heads",
    title: str = "",
) -> CircuitsVisView:
    """The view of :func:`attention_view` from patterns already captured (``patterns[i]`` is ``heads[i]``'s)."""
    names = [head_name(*lh) for lh in heads]
    props = view_props(tokens, patterns, component=component, names=names)
    return CircuitsVisView(_COMPONENTS[component], props, title=title or ", ".join(names))


def check_census(census: pd.DataFrame, model: HookedTransformer | None = None) -> pd.DataFrame:
    """Raise a clear HeadlensError unless ``census`` has the census columns (and fits ``model``'s heads)."""
    if not isinstance(census, pd.DataFrame):
        raise HeadlensError(
            f"census must be a pandas DataFrame (from headlens.census.run), got {type(census).__name__}"
        )
    missing = [c for c in CENSUS_COLUMNS if c not in census.columns]
    if missing:
        raise HeadlensError(
            f"the census table lacks columns {missing}: pass the DataFrame returned by headlens.census.run "
            "(or its CSV read back with pandas)"
        )
    if census.empty:
        raise HeadlensError("the census table is empty: run headlens.census.run on the model first")
    check_census_table(census)
    if model is not None:
        L, H = model.cfg.n_layers, model.cfg.n_heads
        if census["layer"].max() >= L or census["head"].max() >= H or len(census) != L * H:
            raise HeadlensError(
                f"the census table does not match this model ({L} layers x {H} heads): "
                "it was computed on another model; rerun the census"
            )
    return census


def top_heads_by_label(census: pd.DataFrame, *, top_k: int = 3, labels: Iterable[str] | None = None) -> pd.DataFrame:
    """The ``top_k`` highest-scoring heads of each label, by the score that decided their label (``label_score``: the
    sink-corrected score where the head sinks); the label's own score column for a table without ``label_score``.

    Columns ``label, layer, head, score``, labels in ``LABELS`` order; 'other' and empty labels are left out. The
    console, the report, the gallery and the head cards all rank by this one score.
    """
    check_census(census)
    top_k = check_count("top_k", top_k, why="heads per label")
    wanted = [label for label in (LABELS if labels is None else labels)]
    unknown = [label for label in wanted if label not in LABEL_SCORE and label != "other"]
    if unknown:
        raise HeadlensError(f"unknown labels {unknown}: choose from {list(LABEL_SCORE)}")
    rows = []
    for label in wanted:
        if label not in LABEL_SCORE:
            continue
        score = "label_score" if "label_score" in census.columns else LABEL_SCORE[label]
        group = census[census["label"] == label]
        if group.empty or score not in census.columns:  # a registered type this table was not scored with
            continue
        group = group.sort_values([score, "layer", "head"], ascending=[False, True, True])
        for row in group.head(top_k).itertuples(index=False):
            rows.append(
                {"label": label, "layer": int(row.layer), "head": int(row.head), "score": float(getattr(row, score))}
            )
    return pd.DataFrame(rows, columns=["label", "layer", "head", "score"])


def gallery(
    model: HookedTransformer,
    census: pd.DataFrame,
    prompt: str = DEFAULT_PROMPT,
    *,
    top_k: int = 3,
    labels: Iterable[str] | None = None,
    max_tokens: int = VIEW_TOKENS,
) -> ViewSet:
    """One CircuitsVis ``AttentionHeads`` view per label, showing its ``top_k`` top heads on ``prompt`` (one forward)."""
    check_model(model)
    check_census(census, model)
    labels = None if labels is None else list(labels)  # read twice below: ``labels`` may be a one-pass iterator
    top = top_heads_by_label(census, top_k=top_k, labels=labels)
    if top.empty:
        return ViewSet([])
    heads = list(zip(top["layer"].astype(int), top["head"].astype(int)))
    tokens, patterns = head_patterns(model, prompt, heads, max_tokens=max_tokens)
    index = {head: i for i, head in enumerate(heads)}
    return gallery_views(census, tokens, lambda lh: patterns[index[lh]], top_k=top_k, labels=labels)


def gallery_views(
    census: pd.DataFrame,
    tokens: Sequence[str],
    pattern_of,
    *,
    top_k: int = 3,
    labels: Iterable[str] | None = None,
) -> ViewSet:
    """The views of :func:`gallery` from patterns already captured: ``pattern_of((layer, head))`` is a ``[q, k]`` tensor."""
    top = top_heads_by_label(census, top_k=top_k, labels=labels)
    views = []
    for label, rows in top.groupby("label", sort=False):
        heads = [(int(r.layer), int(r.head)) for r in rows.itertuples()]
        names = [f"{head_name(r.layer, r.head)} {r.score:.2f}" for r in rows.itertuples()]
        props = view_props(tokens, torch.stack([pattern_of(lh) for lh in heads]), component="heads", names=names)
        views.append(
            CircuitsVisView("AttentionHeads", props, title=f"{label}: " + ", ".join(head_name(*lh) for lh in heads))
        )
    return ViewSet(views)


# ---------------------------------------------------------------- layer x head heatmaps


def head_grid(
    df: pd.DataFrame, value: str = "value", *, n_layers: int | None = None, n_heads: int | None = None
) -> np.ndarray:
    """``df[value]`` laid out as a (layer, head) array; NaN where a head has no row."""
    if not isinstance(df, pd.DataFrame):
        raise HeadlensError(
            f"expected a pandas DataFrame with layer, head and {value!r} columns, got {type(df).__name__}"
        )
    missing = [c for c in ("layer", "head", value) if c not in df.columns]
    if missing:
        raise HeadlensError(
            f"the table lacks columns {missing}: heatmaps need one row per head with layer, head and {value!r}"
        )
    if df.duplicated(["layer", "head"]).any():
        raise HeadlensError(f"the table lists some (layer, head) more than once: heatmaps need one {value!r} per head")
    if not pd.api.types.is_numeric_dtype(df[value]):
        raise HeadlensError(f"column {value!r} is not numeric")
    layers, heads = df["layer"].to_numpy(int), df["head"].to_numpy(int)
    if len(df) and (layers.min() < 0 or heads.min() < 0):
        raise HeadlensError("layer and head indices must be >= 0")
    L = int(n_layers if n_layers is not None else (layers.max() + 1 if len(df) else 0))
    H = int(n_heads if n_heads is not None else (heads.max() + 1 if len(df) else 0))
    if len(df) and (layers.max() >= L or heads.max() >= H):
        raise HeadlensError(f"the table has heads outside {L} layers x {H} heads: was it computed on another model?")
    grid = np.full((L, H), np.nan)
    grid[layers, heads] = df[value].to_numpy(float)
    return grid


def value_columns(df: pd.DataFrame) -> list[str]:
    """Columns worth a heatmap: ``value`` if present, else every non-constant numeric column that is not an index,
    the usual headline columns (effect, exact, attribution, jsd, gradient) first."""
    if "value" in df.columns:
        return ["value"]
    numeric = [
        c
        for c in df.columns
        if c not in NON_VALUES
        and pd.api.types.is_numeric_dtype(df[c])
        and not pd.api.types.is_bool_dtype(df[c])
        and df[c].nunique(dropna=True) > 1
    ]
    return sorted(numeric, key=lambda c: HEADLINE.index(c) if c in HEADLINE else len(HEADLINE))


def _groups(df: pd.DataFrame, by: Sequence[str] | None) -> list[tuple[str, pd.DataFrame]]:
    """Split ``df`` by ``by`` (default: whichever of probe / activation / method it has); per-kv-head groups use kv_head as head."""
    by = [c for c in SPLIT_COLUMNS if c in df.columns] if by is None else list(by)
    groups = (
        [((), df)] if not by else [((k,) if not isinstance(k, tuple) else k, g) for k, g in df.groupby(by, sort=False)]
    )
    out = []
    for key, group in groups:
        name = " ".join(str(k) for k in key)
        if group["head"].isna().all() and "kv_head" in group.columns:
            group, name = group.assign(head=group["kv_head"]), f"{name} (kv heads)".strip()
        out.append((name, group.dropna(subset=["layer", "head"])))
    return out


def is_per_head(df: pd.DataFrame, by: Sequence[str] | None = None) -> bool:
    """Whether ``df`` has layer and head columns and one row per head within each group (so it can be a heatmap)."""
    if not isinstance(df, pd.DataFrame) or not {"layer", "head"} <= set(df.columns) or df.empty:
        return False
    return not any(g.duplicated(["layer", "head"]).any() for _, g in _groups(df, by))


def _heatmap_axes(ax, grid: np.ndarray, *, title: str, center: float | None, kv_group: int | None, scale: str):
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if center is not None:
        span = max(abs(lo - center), abs(hi - center)) or 1.0
        kwargs = dict(cmap="RdBu_r", vmin=center - span, vmax=center + span)
    else:
        kwargs = dict(cmap="viridis", vmin=min(lo, 0.0), vmax=1.0 if hi <= 1.0 and scale == "unit" else hi)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    L, H = grid.shape
    ax.set_xticks(range(0, H, max(1, H // 8)))
    ax.set_yticks(range(0, L, max(1, L // 12)))
    if kv_group and 1 < kv_group < H:
        for x in range(kv_group, H, kv_group):
            ax.axvline(x - 0.5, color="white", lw=1.0, ls="--")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return image


def _kv_group(df: pd.DataFrame) -> int | None:
    if "kv_head" not in df.columns or df.empty:
        return None
    sizes = df.groupby("kv_head")["head"].nunique()
    return int(sizes.iloc[0]) if sizes.nunique() == 1 else None


def _panel_size(L: int, H: int) -> tuple[float, float]:
    return 1.6 + 0.2 * max(H, 4), 1.2 + 0.16 * max(L, 4)


def _panels_figure(
    panels: list[tuple[str, np.ndarray, float | None, int | None]], ncols: int, scale: str = "unit"
) -> Figure:
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    L = max(grid.shape[0] for _, grid, _, _ in panels)
    H = max(grid.shape[1] for _, grid, _, _ in panels)
    width, height = _panel_size(L, H)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    for i, (title, grid, center, kv_group) in enumerate(panels):
        _heatmap_axes(
            fig.add_subplot(nrows, ncols, i + 1), grid, title=title, center=center, kv_group=kv_group, scale=scale
        )
    return fig


def head_heatmaps(
    df: pd.DataFrame,
    values: str | Sequence[str] | None = None,
    *,
    by: Sequence[str] | None = None,
    center: float | Literal["auto"] | None = "auto",
    ncols: int = 4,
    max_panels: int = 16,
    n_layers: int | None = None,
    n_heads: int | None = None,
    scale: Literal["unit", "data"] = "unit",
    title: str | None = None,
) -> Figure:
    """Layer x head heatmaps of per-head results (ablation / patching / fine-tune deltas), one panel per value column.

    THE layer x head heatmap of headlens (ablation sweeps, patching, census scores and fine-tune comparisons all
    draw through it). ``df`` needs layer, head and the ``values`` columns (default :func:`value_columns`); rows
    are split into panels by ``by`` (default: probe / activation / method when present); kv-group rows
    (``head`` = <NA>) are drawn per kv head. ``center="auto"`` draws columns with both signs diverging around 0
    and the others sequential (``scale="unit"``: 0..1 unless the data exceed 1; ``"data"``: the data's range);
    dashed lines separate GQA kv groups. ``title`` goes above all panels.
    """
    if not isinstance(df, pd.DataFrame):
        raise HeadlensError(f"expected a pandas DataFrame with layer, head and value columns, got {type(df).__name__}")
    if not {"layer", "head"} <= set(df.columns):
        raise HeadlensError(
            "the table lacks layer/head columns: heatmaps need one row per head with layer, head and a value column"
        )
    values = [values] if isinstance(values, str) else (value_columns(df) if values is None else list(values))
    if not values:
        raise HeadlensError("the table has no numeric value column to plot: add a 'value' column or pass values=")
    panels = []
    for name, group in _groups(df, by):
        kv_heads_only = name.endswith("(kv heads)")
        for value in values:
            grid = head_grid(group, value, n_layers=n_layers, n_heads=None if kv_heads_only else n_heads)
            finite = grid[np.isfinite(grid)]
            mid = (0.0 if finite.size and finite.min() < 0 < finite.max() else None) if center == "auto" else center
            panels.append(
                (f"{name}: {value}" if name else value, grid, mid, None if kv_heads_only else _kv_group(group))
            )
    fig = _panels_figure(panels[:max_panels], ncols, scale)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def score_heatmaps(census: pd.DataFrame, *, scores: Sequence[str] | None = None, ncols: int = 4) -> Figure:
    """One layer x head heatmap per census score, in a grid of ``ncols`` panels."""
    check_census(census)
    scores = list(SCORES if scores is None else scores)
    unknown = [s for s in scores if s not in census.columns]
    if unknown:
        raise HeadlensError(f"the census has no score columns {unknown}: choose from {list(SCORES)}")
    n_layers, n_heads = int(census["layer"].max()) + 1, int(census["head"].max()) + 1
    kv_group = _kv_group(census)
    panels = [(s, head_grid(census, s, n_layers=n_layers, n_heads=n_heads), None, kv_group) for s in scores]
    return _panels_figure(panels, ncols)


def distance_plot(
    df: pd.DataFrame, value: str = "attention", *, by: str | None = "probe", max_distance: int | None = None
) -> Figure:
    """Mean ``value`` against relative distance, one line per layer (mean over its heads), one panel per ``by`` group."""
    missing = [c for c in ("distance", value) if c not in df.columns]
    if missing:
        raise HeadlensError(f"the table lacks columns {missing}: a distance plot needs distance and {value!r} columns")
    if max_distance is not None:
        df = df[df["distance"] <= max_distance]
    groups = list(df.groupby(by, sort=False)) if by in df.columns else [("", df)]
    fig = Figure(figsize=(4.2 * len(groups), 3.6), layout="constrained")
    for i, (name, group) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        if "layer" in group.columns:
            means = group.groupby(["layer", "distance"])[value].mean().unstack("layer")
            for j, layer in enumerate(means.columns):
                ax.plot(
                    means.index,
                    means[layer],
                    color=colormaps["viridis"](j / max(1, len(means.columns) - 1)),
                    lw=1,
                    label=f"L{layer}",
                )
            if len(means.columns) <= 8:
                ax.legend(fontsize=7)
        else:
            means = group.groupby("distance")[value].mean()
            ax.plot(means.index, means.to_numpy(), lw=1.5)
        if (group["distance"] > 0).all() and group["distance"].max() > 50:
            ax.set_xscale("log")
        ax.set_xlabel("distance (query - key)")
        ax.set_ylabel(value)
        ax.set_title(f"{name}: {value}" if name != "" else value, fontsize=10)
    return fig


def _known_labels(census: pd.DataFrame) -> list[str]:
    return list(LABELS) + sorted(set(census["label"]) - set(LABELS))


def label_map(census: pd.DataFrame) -> Figure:
    """Layer x head map coloured by census label, each cell marked with the label's glyph (:func:`label_glyphs`), with a
    legend of glyph, colour, label and head count."""
    check_census(census)
    n_layers, n_heads = int(census["layer"].max()) + 1, int(census["head"].max()) + 1
    known = _known_labels(census)
    glyphs, palette = label_glyphs(known), label_colors()
    codes = {label: i for i, label in enumerate(known)}
    grid = np.full((n_layers, n_heads), np.nan)
    grid[census["layer"].to_numpy(int), census["head"].to_numpy(int)] = census["label"].map(codes).to_numpy(float)
    colors = [palette.get(label, "#888888") for label in known]
    fig = Figure(figsize=(2.2 + 0.42 * n_heads + 2.4, 1.2 + 0.34 * n_layers), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(
        grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(colors), vmin=-0.5, vmax=len(known) - 0.5
    )
    for row in census.itertuples(index=False):
        glyph = glyphs.get(row.label, "?")
        if glyph:
            color = palette.get(row.label, "#888888")
            ax.text(row.head, row.layer, glyph, ha="center", va="center", fontsize=8, color=_ink_hex(color))
    ax.set_title("head labels", fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, n_heads, max(1, n_heads // 14)))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 24)))
    counts = census["label"].value_counts()
    handles = [
        Patch(
            facecolor=palette.get(lb, "#888888"),
            edgecolor="#555",
            label=f"{glyphs.get(lb) or '·'} {lb} ({counts.get(lb, 0)})",
        )
        for lb in known
        if counts.get(lb, 0)
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------- figure export


def figure_png(fig: Figure, *, dpi: int = 120) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def figure_svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def figure_img(fig: Figure, *, alt: str = "", dpi: int = 120, png: bytes | None = None) -> str:
    """An ``<img>`` tag holding ``fig`` as an inline base64 PNG (no file, no URL)."""
    data = base64.b64encode(png if png is not None else figure_png(fig, dpi=dpi)).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------- interactive HTML grids (values on hover, heads clickable)


def _css_color(rgba) -> str:
    r, g, b = (int(round(255 * c)) for c in rgba[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _ink(rgba) -> str:
    """Black or white text, whichever reads on the background."""
    r, g, b = rgba[:3]
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"


def grid_html(
    grid: np.ndarray,
    *,
    title: str,
    center: float | None = None,
    kv_group: int | None = None,
    unit_name=head_name,
    link: bool = True,
    decimals: int = 3,
) -> str:
    """A layer x head heatmap as an HTML table: each cell's colour is its value, its tooltip (``title``) says
    head name and value, and with ``link`` a click opens that head's view (``data-head``). No image, no script."""
    finite = grid[np.isfinite(grid)]
    if center is not None and finite.size:
        span = float(np.max(np.abs(finite - center))) or 1.0
        lo, hi, cmap = center - span, center + span, colormaps["RdBu_r"]
    else:
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        cmap = colormaps["viridis"]
    scale = (hi - lo) or 1.0
    rows = []
    for layer in range(grid.shape[0]):
        cells = [f'<th scope="row">{layer}</th>']
        for head in range(grid.shape[1]):
            value = grid[layer, head]
            name = unit_name(layer, head)
            if not np.isfinite(value):
                cells.append(f'<td class="na" title="{escape(name)}: no value"></td>')
                continue
            rgba = cmap((value - lo) / scale)
            sep = " kv" if kv_group and head % kv_group == 0 and head else ""
            data = f' data-head="{escape(name)}"' if link else ""
            cells.append(
                f'<td class="v{sep}"{data} title="{escape(name)} {escape(title)} = {value:.{decimals}f}" '
                f'style="background:{_css_color(rgba)}"></td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "<tr><th></th>" + "".join(f"<th>{h}</th>" for h in range(grid.shape[1])) + "</tr>"
    legend = (
        f'<div class="scale"><span>{lo:.{decimals}g}</span><span class="bar {"div" if center is not None else "seq"}"></span>'
        f"<span>{hi:.{decimals}g}</span></div>"
    )
    return (
        f'<figure class="grid"><figcaption>{escape(title)}</figcaption><table class="heatmap"><thead>{header}</thead>'
        f"<tbody>{''.join(rows)}</tbody></table>{legend}</figure>"
    )


def label_legend_html(counts: dict[str, int] | None = None, labels: Iterable[str] | None = None) -> str:
    """The label legend as HTML: glyph on its colour, the label and (with ``counts``) how many heads carry it."""
    labels = list(labels if labels is not None else (counts or {}))
    glyphs, palette = label_glyphs(labels), label_colors()
    keys = []
    for lb in labels:
        color = palette.get(lb, "#888888")
        n = f" ({counts[lb]})" if counts is not None else ""
        keys.append(
            f'<span class="key"><span class="swatch" style="background:{color};color:{_ink_hex(color)}">'
            f"{escape(glyphs.get(lb) or '·')}</span>{escape(lb)}{n}</span>"
        )
    return '<p class="legend">' + "".join(keys) + "</p>"


def label_grid_html(census: pd.DataFrame) -> str:
    """The label map as an HTML table: one cell per head, coloured by label with its glyph inside, tooltip with label
    and deciding score, click opens the head's view; a legend below."""
    check_census(census)
    palette, glyphs = label_colors(), label_glyphs(_known_labels(census))
    n_layers, n_heads = int(census["layer"].max()) + 1, int(census["head"].max()) + 1
    by_head = {(int(r.layer), int(r.head)): r for r in census.itertuples(index=False)}
    rows = []
    for layer in range(n_layers):
        cells = [f'<th scope="row">{layer}</th>']
        for head in range(n_heads):
            r = by_head.get((layer, head))
            if r is None:
                cells.append('<td class="na"></td>')
                continue
            name, label = head_name(layer, head), str(r.label)
            score = "label_score" if "label_score" in census.columns else LABEL_SCORE.get(label)
            value = getattr(r, score) if score in census.columns else None
            tip = f"{name} {label}" + (f" ({value:.2f})" if value is not None and value == value else "")
            bg = palette.get(label, "#888888")
            cells.append(
                f'<td class="lab" data-head="{name}" data-label="{escape(label)}" title="{escape(tip)}" '
                f'style="background:{bg};color:{_ink_hex(bg)}">{escape(glyphs.get(label, "?"))}</td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "<tr><th>layer \\ head</th>" + "".join(f"<th>{h}</th>" for h in range(n_heads)) + "</tr>"
    counts = census["label"].value_counts()
    known = [lb for lb in _known_labels(census) if counts.get(lb, 0)]
    legend = label_legend_html({lb: int(counts[lb]) for lb in known})
    return (
        f'<div class="labelmap"><table class="heatmap labels"><thead>{header}</thead><tbody>{"".join(rows)}</tbody>'
        f"</table>{legend}</div>"
    )

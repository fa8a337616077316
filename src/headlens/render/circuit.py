"""``circuit.html``: a circuit drawn as a graph, offline, beside CircuitsVis views of its heads.

The graph is laid out by networkx (``multipartite_layout``: one row per layer, embed at the bottom, logits at the
top) and drawn by matplotlib into static SVG inlined in the page: no JavaScript, no CDN. Nodes are coloured by census
label, edges by the input they enter (q, k, v, mlp, logits), their width by |score|, dashed where corrupting the edge
raises the metric; hovering a node or an edge shows its numbers (an SVG ``<title>`` on each). The heads' attention
patterns on the first clean prompt are CircuitsVis views rendered against the bundle inlined once
(:mod:`headlens.render.viz`). Every token string and name is HTML-escaped.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch
from transformer_lens import HookedTransformer

from headlens.circuits.graph import node_head
from headlens.engine.capture import head_patterns
from headlens.errors import HeadlensError, check_count, check_model
from headlens.io import write_text
from headlens.render.viz import CircuitsVisView, ViewSet, escape, label_colors, view_props

INPUT_COLORS = {"q": "#e377c2", "k": "#ff7f0e", "v": "#2ca02c", "mlp": "#8c564b", "logits": "#444444"}
NODE_COLORS = {"embed": "#bdbdbd", "mlp": "#d9c3a5", "logits": "#444444", "": "#ffffff"}


def _label_colors() -> dict[str, str]:
    return {**label_colors(), **NODE_COLORS}


def drawn_edges(result, max_edges: int) -> pd.DataFrame:
    """The circuit's ``max_edges`` edges of largest |score| (what the figure shows)."""
    edges = result.circuit_edges()
    return edges.head(check_count("max_edges", max_edges))


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{float(x):+.4f}"


def circuit_svg(result, *, max_edges: int = 40) -> str:
    """The drawn part of the circuit as an SVG string (hover titles on every node and edge)."""
    edges = drawn_edges(result, max_edges)
    if edges.empty:
        raise HeadlensError("the circuit has no edges to draw")
    nodes = result.nodes.set_index("node")
    g = nx.DiGraph()
    for name in dict.fromkeys([*edges.sender, *edges.receiver]):
        g.add_node(name, layer=int(nodes.loc[name, "layer"]))
    for r in edges.itertuples():
        g.add_edge(r.sender, r.receiver)  # parallel q/k/v edges share one layout edge; each is drawn below
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=1.0)
    layers = sorted({d["layer"] for _, d in g.nodes(data=True)})
    widest = max(sum(1 for _, d in g.nodes(data=True) if d["layer"] == layer) for layer in layers)
    fig = Figure(figsize=(max(6.0, 1.1 * widest), max(3.0, 0.9 * len(layers) + 1)))
    ax = fig.add_axes([0.02, 0.02, 0.80, 0.96])
    ax.set_axis_off()
    colors = _label_colors()
    top = float(edges.score.abs().max()) or 1.0
    titles: dict[str, str] = {}
    offsets = {"q": -0.12, "k": 0.0, "v": 0.12, "mlp": 0.0, "logits": 0.0}
    for i, r in enumerate(edges.itertuples()):
        gid = f"hl-edge-{i}"
        arrow = FancyArrowPatch(
            pos[r.sender],
            pos[r.receiver],
            arrowstyle="-|>",
            mutation_scale=10,
            connectionstyle=f"arc3,rad={offsets.get(r.input, 0.0)}",
            color=INPUT_COLORS.get(r.input, "#444444"),
            linewidth=0.6 + 4.0 * abs(r.score) / top,
            linestyle="--" if r.score > 0 else "-",
            alpha=0.85,
            shrinkA=11,
            shrinkB=11,
        )
        arrow.set_gid(gid)
        ax.add_patch(arrow)
        titles[gid] = (
            f"{r.sender} → {r.receiver} [{r.input}]\nscore {_fmt(r.score)}"
            + "".join(f"\n{c} {_fmt(getattr(r, c))}" for c in ("eap", "eap_ig", "exact") if hasattr(r, c))
            + f"\n{r.sender_label} → {r.receiver_label}"
        )
    for i, name in enumerate(g.nodes):
        gid = f"hl-node-{i}"
        row = nodes.loc[name]
        label = str(row["label"])
        dot = ax.scatter(*pos[name], s=520, color=colors.get(label, "#ffffff"), edgecolors="#222222", zorder=3)
        dot.set_gid(gid)
        ax.annotate(
            name,
            pos[name],
            ha="center",
            va="center",
            fontsize=7,
            zorder=4,
            color="#000000" if label != "logits" else "#ffffff",
        )
        card = str(row.get("card", "") or "")
        titles[gid] = f"{name}: {label}" + (f"\n{card}" if card else "") + f"\nnode score {_fmt(row['score'])}"
    xs = np.array([p[0] for p in pos.values()])
    ys = np.array([p[1] for p in pos.values()])
    ax.set_xlim(xs.min() - 0.15, xs.max() + 0.15)
    ax.set_ylim(ys.min() - 0.12, ys.max() + 0.12)
    handles = [
        Line2D([0], [0], color=c, lw=2.5, label=f"into {k}") for k, c in INPUT_COLORS.items() if k in set(edges.input)
    ]
    shown = dict.fromkeys(str(nodes.loc[n, "label"]) for n in g.nodes)
    handles += [
        Line2D(
            [0],
            [0],
            marker="o",
            lw=0,
            markersize=8,
            markerfacecolor=colors.get(lab, "#ffffff"),
            markeredgecolor="#222222",
            label=lab,
        )
        for lab in shown
    ]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    return _with_titles(buf.getvalue(), titles)


def _with_titles(svg: str, titles: dict[str, str]) -> str:
    """Insert an escaped ``<title>`` as the first child of each ``<g id="...">`` named in ``titles``."""
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and doctype: the SVG is inlined in HTML

    def add(match: re.Match) -> str:
        gid = match.group(1)
        text = titles.get(gid)
        return match.group(0) if text is None else f"{match.group(0)}<title>{escape(text)}</title>"

    return re.sub(r'<g id="(hl-(?:node|edge)-\d+)">', add, svg)


def _table(df: pd.DataFrame, floats: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    rows = []
    for r in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, r):
            text = _fmt(v) if c in floats else ("" if v is None or (isinstance(v, float) and v != v) else str(v))
            cells.append(f"<td>{escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def head_views(result, model: HookedTransformer, *, max_views: int = 6):
    """CircuitsVis views (one ``AttentionHeads`` component) of the circuit's heads of largest |node score| on the first
    clean prompt; None when the circuit holds no head."""
    check_model(model)
    nodes = result.nodes[result.nodes.in_circuit & (result.nodes.kind == "head")]
    if nodes.empty:
        return None
    top = nodes.reindex(nodes.abs_score.sort_values(ascending=False).index).head(int(max_views))
    heads = [(node_head(n).layer, node_head(n).head) for n in top.node]
    tokens, patterns = head_patterns(model, result.task.pair.clean[0].cpu(), heads, max_tokens=512)
    names = [f"{n} {lab}" for n, lab in zip(top.node, top.label)]
    props = view_props(tokens, patterns, component="heads", names=names)
    return CircuitsVisView("AttentionHeads", props, title="attention of the circuit's heads on the first clean prompt")


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f4f4f4; }
.note { color: #555; font-size: 0.9em; }
svg { max-width: 100%; height: auto; }
"""


def circuit_html(result, model: HookedTransformer, *, max_edges: int = 40, max_views: int = 6) -> str:
    """The whole page (see the module docstring) as a string."""
    check_model(model)
    info = result.info
    summary = result.summary()
    curves = result.faithfulness.table.pivot_table(index=["k"], columns="method", values="faithfulness").reset_index()
    curves.columns = [str(c) for c in curves.columns]
    drawn = drawn_edges(result, max_edges)
    cols = [
        c
        for c in ("sender", "receiver", "input", "score", "eap", "eap_ig", "exact", "sender_label", "receiver_label")
        if c in drawn
    ]
    views = head_views(result, model, max_views=max_views)
    title = f"headlens circuit: {info['task']}"
    chosen = info.get("circuit_method")
    made = (
        f"the top {info['circuit_edges']} edges ({info['circuit_k']:g} % of {info['n_edges']}) of the {chosen} ranking, "
        "the smallest circuit of any ranking with faithfulness ≥ 0.8"
        if chosen
        else f"no ranking reached faithfulness 0.8 on the grid; shown: the top {info['circuit_edges']} edges of {info['primary']}"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        "<p>"
        + escape(
            f"metric: {info['task_info'].get('metric', '')}; clean {info['clean_metric']:.4f}, every edge ablated "
            f"({info['ablation']}) {info['ablated_metric']:.4f}; {info['n_edges']} edges in the graph."
        )
        + "</p>",
        f"<p>Circuit: {escape(made)}.</p>",
        "<h2>Faithfulness</h2>",
        _table(summary, floats=("cpr", "cmd")),
        _table(curves, floats=tuple(c for c in curves.columns if c != "k")),
        f"<h2>Graph (top {len(drawn)} edges of the circuit)</h2>",
        "<p class='note'>Nodes coloured by census label; edges by the input they enter, width ∝ |score|, dashed where "
        "corrupting the edge raises the metric. Hover a node or an edge for its numbers.</p>",
        circuit_svg(result, max_edges=max_edges),
        "<h2>Edges shown</h2>",
        _table(drawn[cols], floats=("score", "eap", "eap_ig", "exact")),
    ]
    if views is not None:
        parts += ["<h2>Heads</h2>", ViewSet([views]).to_html(prefix="headlens-circuit")]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_circuit_html(result, model: HookedTransformer, path: str | Path, **kwargs) -> Path:
    check_model(model)
    return write_text(Path(path), circuit_html(result, model, **kwargs))

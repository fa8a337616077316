import json
import re
import socket
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from headlens import HeadlensError
from headlens.render import viz

PROMPT = "The cat sat on the mat. The cat sat on the mat."


def fake_census(n_layers=2, n_heads=4, n_kv_heads=2, *, seed=0, labels=None):
    """A census-shaped table with random scores; ``labels`` maps (layer, head) -> label (others: 'other')."""
    rng = np.random.default_rng(seed)
    group = n_heads // n_kv_heads
    rows = [
        {
            "layer": l,
            "head": h,
            "kv_head": h // group,
            **{s: float(rng.random()) for s in viz.SCORES},
            "label": (labels or {}).get((l, h), "other"),
        }
        for l in range(n_layers)
        for h in range(n_heads)
    ]
    return pd.DataFrame(rows, columns=list(viz.CENSUS_COLUMNS))


def planted_census():
    """Tiny-model census with known winners: induction L1H2 (0.9) > L1H3 (0.7) > L0H1 (0.5); first_token L0H3 > L0H2."""
    census = fake_census(
        labels={
            (1, 2): "induction",
            (1, 3): "induction",
            (0, 1): "induction",
            (0, 0): "previous_token",
            (0, 2): "first_token",
            (0, 3): "first_token",
        }
    )
    census = census.set_index(["layer", "head"])
    census.loc[(1, 2), "induction"], census.loc[(1, 3), "induction"], census.loc[(0, 1), "induction"] = 0.9, 0.7, 0.5
    census.loc[(0, 2), "first_token"], census.loc[(0, 3), "first_token"] = 0.6, 0.8
    return census.reset_index()[list(viz.CENSUS_COLUMNS)]


# ---------------------------------------------------------------- script safety


def test_script_json_cannot_close_a_script_tag():
    value = {"tokens": ["</script><script>alert(1)</script>", "a & b", "<!--"], "x": [0.5, 1]}
    text = viz.script_json(value)
    assert not re.search(r"[<>&]", text)
    assert json.loads(text) == value


def test_bundle_is_inlinable_once():
    js = viz.bundle_js()
    assert "var CircuitsVis=" in js
    assert not re.search(r"</script", js, flags=re.IGNORECASE)
    assert "<\\/script>" in js  # the one literal in the bundle, escaped the JS way


def test_render_call_escapes_div_id_and_props():
    call = viz.render_call('x"</script>', "AttentionHeads", {"tokens": ["</script>"]})
    assert "</" not in call
    assert call.startswith('try { CircuitsVis.render("x\\"\\u003c/script\\u003e", CircuitsVis.AttentionHeads, ')


# ---------------------------------------------------------------- patterns and views


def test_head_patterns_match_run_with_cache(tiny_qwen):
    heads = [(1, 2), (0, 1), (1, 0)]
    tokens, patterns = viz.head_patterns(tiny_qwen, PROMPT, heads)
    _, cache = tiny_qwen.run_with_cache(PROMPT, names_filter=lambda name: name.endswith("hook_pattern"))
    assert tokens == tiny_qwen.to_str_tokens(PROMPT)
    assert patterns.shape == (3, len(tokens), len(tokens))
    for i, (layer, head) in enumerate(heads):
        torch.testing.assert_close(patterns[i], cache["pattern", layer][0, head], rtol=0, atol=0)


def test_head_patterns_bad_input(tiny_qwen):
    with pytest.raises(HeadlensError, match="no heads given"):
        viz.head_patterns(tiny_qwen, PROMPT, [])
    with pytest.raises(HeadlensError, match="head L2H0 is out of range"):
        viz.head_patterns(tiny_qwen, PROMPT, [(2, 0)])
    with pytest.raises(HeadlensError, match="prompt is empty"):
        viz.head_patterns(tiny_qwen, "", [(0, 0)])
    with pytest.raises(HeadlensError, match="max_tokens=4"):
        viz.head_patterns(tiny_qwen, PROMPT, [(0, 0)], max_tokens=4)


def test_view_props_escape_tokens_only_where_circuitsvis_writes_html():
    patterns = torch.tensor([[[1.0, 0.0], [0.123456, 0.876544]]])
    props = viz.view_props(["<b>", "a&b"], patterns, component="patterns")
    assert props == {"tokens": ["&lt;b&gt;", "a&amp;b"], "attention": [[[1.0, 0.0], [0.1235, 0.8765]]]}
    heads = viz.view_props(["<b>", "a&b"], patterns, names=["L0H0"])  # drawn on canvas: verbatim
    assert heads == {
        "tokens": ["<b>", "a&b"],
        "attention": [[[1.0, 0.0], [0.1235, 0.8765]]],
        "maskUpperTri": True,
        "attentionHeadNames": ["L0H0"],
    }
    with pytest.raises(HeadlensError, match="unknown component 'pie'"):
        viz.view_props(["a", "b"], patterns, component="pie")


def test_attention_view_components(tiny_qwen):
    heads = [(0, 3), (1, 1)]
    _, patterns = viz.head_patterns(tiny_qwen, PROMPT, heads)
    view = viz.attention_view(tiny_qwen, PROMPT, heads)
    assert view.name == "AttentionHeads" and view.title == "L0H3, L1H1"
    assert view.props["attentionHeadNames"] == ["L0H3", "L1H1"]
    np.testing.assert_allclose(np.array(view.props["attention"]), patterns.numpy(), atol=5e-5)
    patterns_view = viz.attention_view(tiny_qwen, PROMPT, heads, component="patterns")
    assert patterns_view.name == "AttentionPatterns" and "attentionHeadNames" not in patterns_view.props


def test_notebook_html_is_offline_and_inlines_bundle_once(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was probed")

    import circuitsvis.utils.render as cv_render

    monkeypatch.setattr(cv_render, "internet_on", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    patterns = torch.eye(3).unsqueeze(0)
    views = viz.ViewSet(
        [
            viz.CircuitsVisView(
                "AttentionHeads", viz.view_props(["a", "b", "c"], patterns, names=[f"n{i}"]), title=f"t{i}"
            )
            for i in range(3)
        ]
    )
    viz.reset_notebook_bundle()
    page = views._repr_html_()
    marker = viz.bundle_js()[:300]
    assert page.count(marker) == 1
    ids = re.findall(r'<div id="(headlens-cv-[0-9a-f]{12}-\d)" class="circuitsvis"></div>', page)
    assert len(ids) == 3 and len(set(ids)) == 3
    for div_id in ids:
        assert f'CircuitsVis.render("{div_id}", CircuitsVis.AttentionHeads, ' in page
    single = views.views[0]._repr_html_()  # a later cell of the same notebook: no second copy of the bundle
    assert single.count(marker) == 0 and single.count("CircuitsVis.render(") == 1 and "window.CircuitsVis" in single
    standalone = views.views[0].to_html()
    assert standalone.count(marker) == 1
    assert "unpkg" not in page and "https://" not in page.replace(viz.bundle_js(), "")


# ---------------------------------------------------------------- census, top heads, gallery


def test_check_census_rejects_bad_tables(tiny_qwen):
    census = fake_census()
    assert viz.check_census(census, tiny_qwen) is census
    with pytest.raises(HeadlensError, match="must be a pandas DataFrame"):
        viz.check_census(census.to_dict())
    with pytest.raises(HeadlensError, match=r"lacks columns \['induction'\]"):
        viz.check_census(census.drop(columns="induction"))
    with pytest.raises(HeadlensError, match="more than once"):
        viz.check_census(pd.concat([census, census.head(1)]))
    with pytest.raises(HeadlensError, match="empty"):
        viz.check_census(census.head(0))
    with pytest.raises(HeadlensError, match=r"does not match this model \(2 layers x 4 heads\)"):
        viz.check_census(fake_census(24, 14, 2), tiny_qwen)


def test_top_heads_ranks_by_the_label_score():
    top = viz.top_heads_by_label(planted_census(), top_k=2)
    assert top.to_dict("records") == [
        {"label": "previous_token", "layer": 0, "head": 0, "score": top.loc[0, "score"]},
        {"label": "induction", "layer": 1, "head": 2, "score": 0.9},
        {"label": "induction", "layer": 1, "head": 3, "score": 0.7},
        {"label": "first_token", "layer": 0, "head": 3, "score": 0.8},
        {"label": "first_token", "layer": 0, "head": 2, "score": 0.6},
    ]
    assert viz.top_heads_by_label(planted_census(), top_k=5, labels=["induction"])[
        ["layer", "head"]
    ].values.tolist() == [
        [1, 2],
        [1, 3],
        [0, 1],
    ]
    with pytest.raises(HeadlensError, match="k must be an integer >= 1"):
        viz.top_heads_by_label(planted_census(), top_k=0)
    with pytest.raises(HeadlensError, match=r"unknown labels \['inductoin'\]"):
        viz.top_heads_by_label(planted_census(), labels=["inductoin"])


def test_gallery_shows_each_labels_top_heads(tiny_qwen):
    views = viz.gallery(tiny_qwen, planted_census(), PROMPT, top_k=2)
    assert [v.title for v in views] == ["previous_token: L0H0", "induction: L1H2, L1H3", "first_token: L0H3, L0H2"]
    induction = views.views[1]
    assert induction.name == "AttentionHeads"
    assert induction.props["attentionHeadNames"] == ["L1H2 0.90", "L1H3 0.70"]
    _, expected = viz.head_patterns(tiny_qwen, PROMPT, [(1, 2), (1, 3)])
    np.testing.assert_allclose(np.array(induction.props["attention"]), expected.numpy(), atol=5e-5)
    assert len(viz.gallery(tiny_qwen, fake_census(), PROMPT)) == 0  # all 'other'
    chosen = viz.gallery(tiny_qwen, planted_census(), PROMPT, top_k=2, labels=iter(["induction"]))  # one pass
    assert [v.title for v in chosen] == ["induction: L1H2, L1H3"]


# ---------------------------------------------------------------- heatmaps


def test_head_grid_places_values():
    df = pd.DataFrame({"layer": [0, 1, 1], "head": [2, 0, 3], "value": [0.5, -1.0, 2.0]})
    grid = viz.head_grid(df, n_layers=3)
    assert grid.shape == (3, 4)
    assert grid[0, 2] == 0.5 and grid[1, 0] == -1.0 and grid[1, 3] == 2.0
    assert np.isnan(grid).sum() == 9
    with pytest.raises(HeadlensError, match="more than once"):
        viz.head_grid(pd.concat([df, df]))
    with pytest.raises(HeadlensError, match=r"lacks columns \['value'\]"):
        viz.head_grid(df.rename(columns={"value": "effect"}))
    with pytest.raises(HeadlensError, match="outside 1 layers x 4 heads"):
        viz.head_grid(df, n_layers=1)
    with pytest.raises(HeadlensError, match="not numeric"):
        viz.head_grid(df.assign(value=["a", "b", "c"]))


def test_score_heatmaps_panels_hold_the_scores():
    census = fake_census(3, 4, 2)
    fig = viz.score_heatmaps(census)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == list(viz.SCORES)
    for ax, score in zip(panels, viz.SCORES):
        np.testing.assert_array_equal(ax.images[0].get_array(), viz.head_grid(census, score))
        assert ax.images[0].get_clim() == (0.0, 1.0)
        assert len(ax.lines) == 1  # the dashed kv-group boundary between heads 1 and 2
    with pytest.raises(HeadlensError, match=r"no score columns \['nope'\]"):
        viz.score_heatmaps(census, scores=["nope"])


def test_head_heatmaps_split_by_activation_and_center_mixed_signs():
    z = pd.DataFrame(
        {
            "activation": "z",
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "kv_head": 0,
            "effect": [0.5, -0.25, 0.1, 0.0],
            "jsd": [0.1, 0.2, 0.3, 0.4],
        }
    )
    k = pd.DataFrame(
        {
            "activation": "k",
            "layer": [0, 1],
            "head": pd.array([pd.NA, pd.NA], dtype="Int64"),
            "kv_head": [0, 0],
            "effect": [0.2, 0.3],
            "jsd": [0.0, 0.1],
        }
    )
    fig = viz.head_heatmaps(pd.concat([z, k], ignore_index=True))
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["z: effect", "z: jsd", "k (kv heads): effect", "k (kv heads): jsd"]
    assert panels[0].images[0].get_clim() == (-0.5, 0.5)  # both signs -> diverging around 0
    assert panels[1].images[0].get_clim() == (0.0, 1.0)  # non-negative -> sequential
    np.testing.assert_array_equal(panels[2].images[0].get_array(), [[0.2], [0.3]])
    assert viz.is_per_head(pd.concat([z, k])) and not viz.is_per_head(pd.concat([z, z]))
    with pytest.raises(HeadlensError, match="no numeric value column"):
        viz.head_heatmaps(z[["layer", "head"]])
    with pytest.raises(HeadlensError, match="lacks layer/head"):
        viz.head_heatmaps(z.drop(columns="head"))


def test_value_columns_prefers_headline_columns():
    df = pd.DataFrame(
        {
            "layer": [0, 1],
            "head": [0, 0],
            "kv_head": [0, 0],
            "metric": [1.0, 2.0],
            "clean": [3.0, 3.0],
            "effect": [0.1, 0.2],
            "flag": [True, False],
            "name": ["a", "b"],
        }
    )
    assert viz.value_columns(df) == ["effect", "metric"]
    assert viz.value_columns(df.assign(value=1.0)) == ["value"]


def test_label_map_colours_each_head_by_label():
    census = planted_census()
    fig = viz.label_map(census)
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    codes = {label: i for i, label in enumerate(viz.LABELS)}
    for row in census.itertuples():
        assert grid[row.layer, row.head] == codes[row.label]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["P previous_token (1)", "I induction (3)", "F first_token (2)", "· other (2)"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["P", "I", "I", "I", "F", "F"])


def test_distance_plot_lines_are_layer_means():
    df = pd.DataFrame(
        [
            {"probe": p, "layer": l, "head": h, "distance": d, "attention": (l + 1) * (h + 1) / (d + 1) + (p == "b")}
            for p in ("a", "b")
            for l in range(2)
            for h in range(2)
            for d in range(1, 6)
        ]
    )
    fig = viz.distance_plot(df)
    assert [ax.get_title() for ax in fig.axes] == ["a: attention", "b: attention"]
    line = fig.axes[1].lines[1]  # probe b, layer 1: mean over heads of 2 (h + 1) / (d + 1) + 1
    np.testing.assert_allclose(line.get_ydata(), [3 / (d + 1) + 1 for d in range(1, 6)])
    with pytest.raises(HeadlensError, match=r"lacks columns \['distance'\]"):
        viz.distance_plot(df.drop(columns="distance"))


def test_figure_exports():
    fig = viz.score_heatmaps(fake_census(), scores=["induction"])
    png = viz.figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == viz.figure_png(viz.score_heatmaps(fake_census(), scores=["induction"]))  # same table, same bytes
    assert "<svg" in viz.figure_svg(fig)
    assert viz.figure_img(fig, alt='a "b"', png=png).startswith(
        '<img alt="a &quot;b&quot;" src="data:image/png;base64,iVBORw0KGgo'
    )


def test_direction_controls_are_written_out():
    """A right-to-left override in a prompt or token would reverse the text after it on the page ("Trojan Source")."""
    evil = "x = 1 \u202e# )gnirts(tnirp\u202c and \u2066<b>\u2069"
    assert (
        viz.escape(evil)
        == "x = 1 &lt;U+202E&gt;# )gnirts(tnirp&lt;U+202C&gt; and &lt;U+2066&gt;&lt;b&gt;&lt;U+2069&gt;"
    )
    assert viz.visible("a\u200fb") == "a<U+200F>b"
    patterns = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    for component in ("patterns", "heads"):
        tokens = viz.view_props(["\u202eab", "c"], patterns, component=component)["tokens"]
        assert not any(viz.DIRECTION_CONTROLS.search(t) for t in tokens) and "U+202E" in tokens[0]

"""Head cards, one truth across views, causal evidence by default, task roles, the label palette, `headlens head`."""

import itertools
import json
import re

import numpy as np
import pandas as pd
import pytest
from test_report import Chromium, needs_chromium, open_head
from typer.testing import CliRunner

from headlens import HeadlensError, io
from headlens.analysis import cards, evidence, roles
from headlens.census import LABEL_SCORE, CensusResult, heads_with_label
from headlens.census.registry import WEIGHTS, head_types
from headlens.census.run import label_heads, score_columns, table_scores
from headlens.cli import _census_settings, app, label_summary
from headlens.render import viz
from headlens.render.report import label_rows, read_census, write_report


def sink_census() -> pd.DataFrame:
    """A census of tiny-qwen2's shape (2 x 4) whose three delimiter heads rank in opposite orders by raw score and by
    the score that decided their label: L0H1 and L0H2 sink on the delimiter probe, so their sink-corrected scores
    decide; L1H0 is an induction head. Labels and label_score come from the census's own rule (label_heads)."""
    kinds = sorted({t.probe for t in head_types().values()} - {WEIGHTS})
    rows = []
    for layer, head in itertools.product(range(2), range(4)):
        row = {"layer": layer, "head": head, "kv_head": head // 2, **dict.fromkeys(score_columns(), 0.01)}
        row.update(copying=0.5, entropy=0.5, positional_offset=-1.0, **{f"sink_{k}": 0.05 for k in kinds})
        rows.append(row)
    t = pd.DataFrame(rows)
    planted = {
        (0, 1): dict(delimiter=0.11, delimiter_nosink=0.35, sink_delimiter=0.7),
        (1, 2): dict(delimiter=0.31, delimiter_nosink=0.32),
        (0, 2): dict(delimiter=0.5, delimiter_nosink=0.304, sink_delimiter=0.6),
        (1, 0): dict(induction=0.6, induction_nosink=0.6),
    }
    for (layer, head), values in planted.items():
        for column, value in values.items():
            t.loc[(t.layer == layer) & (t["head"] == head), column] = value
    t["label"] = label_heads(t)
    eff = table_scores(t)
    t["confidence"] = 1.0
    t["label_score"] = [eff[LABEL_SCORE[lb]][i] if lb in LABEL_SCORE else np.nan for i, lb in enumerate(t.label)]
    for c in [*score_columns(), "label_score"]:
        t[f"{c}_lo"], t[f"{c}_hi"] = t[c] - 0.02, t[c] + 0.02
    return t


RAW_ORDER, DECIDING_ORDER = ["L0H2", "L1H2", "L0H1"], ["L0H1", "L1H2", "L0H2"]


def test_the_planted_census_ranks_differently_by_raw_and_deciding_score():
    t = sink_census()
    delims = t[t.label == "delimiter"]
    assert set(t.label) == {"delimiter", "induction", "other"} and len(delims) == 3
    raw = [viz.head_name(r.layer, r.head) for r in delims.sort_values("delimiter", ascending=False).itertuples()]
    assert raw == RAW_ORDER
    why = cards.explain(t).set_index(["layer", "head"])
    assert why.loc[(0, 1), "column"] == why.loc[(0, 2), "column"] == "delimiter_nosink"
    assert why.loc[(1, 2), "column"] == "delimiter" and why.loc[(0, 1), "score"] == pytest.approx(0.35)


def test_console_csv_report_and_card_agree(tiny_qwen, tmp_path):
    t = sink_census()
    result = CensusResult.from_table(t)
    # console: the top heads of the label in deciding-score order
    console = label_summary(result, top_k=3, causal=False).set_index("label")
    assert console.loc["delimiter", "top heads (deciding score)"] == "L0H1 0.35 L1H2 0.31 L0H2 0.30"
    # CSV: written and read back, the same labels, deciding scores, and the same labels again from the rule
    io.write_csv(t, tmp_path / "census.csv")
    back = read_census(tmp_path / "census.csv")
    assert back["label"].tolist() == t["label"].tolist() == label_heads(back)
    np.testing.assert_allclose(back["label_score"], t["label_score"])
    assert cards.explain(back)["column"].tolist() == cards.explain(t)["column"].tolist()
    # gallery and report tables: the same order
    top = viz.top_heads_by_label(back, top_k=3)
    assert [viz.head_name(r.layer, r.head) for r in top[top.label == "delimiter"].itertuples()] == DECIDING_ORDER
    rows = label_rows(CensusResult.from_table(back), top_k=3).set_index("label")
    assert rows.loc["delimiter", "top heads"] == "L0H1 (0.35) L1H2 (0.31) L0H2 (0.30)"
    path = write_report(tmp_path, model=tiny_qwen, census=back, figures=False, progress=False)
    text = path.read_text(encoding="utf-8")
    assert "delimiter: L0H1, L1H2, L0H2" in text  # the gallery view's title
    data = json.loads(re.search(r'<script type="application/json" id="head-data">(.*?)</script>', text).group(1))
    l0h1 = data["heads"]["L0H1"]
    decided = l0h1["scores"][l0h1["decides"]]
    assert decided[0] == "delimiter" and decided[1].startswith("0.110") and decided[2].startswith("0.350")
    assert "decides the label" in decided[-1] and "0.350 / 0.3" in decided[4]
    assert data["first"] == "L1H0"  # the top head of the first label (induction), by the same score
    # every registered score is in the head view, raw and sink-corrected
    assert [s[0].split(" ")[0] for s in l0h1["scores"]] == [n for n, t in head_types().items() if t.column in back]
    # the card: the deciding score, its interval and threshold
    card = cards.head_cards(tiny_qwen, back).iloc[1]
    assert card.startswith("L0H1 is a delimiter head, confidence 1.00: its sink-corrected delimiter score 0.350 ")
    assert "[0.330, 0.370] reaches the threshold 0.3" in card
    assert cards.head_cards(tiny_qwen, back).iloc[4].startswith("L1H0 is an induction head")


def test_explain_names_the_runner_up_and_why_it_lost():
    t = sink_census()
    t.loc[(t.layer == 1) & (t["head"] == 0), "local"] = 0.9  # a tier-2 candidate beside the induction head
    t.loc[(t.layer == 1) & (t["head"] == 0), "previous_token"] = 0.5  # a tier-1 candidate with a smaller ratio
    why = cards.explain(t).set_index(["layer", "head"]).loc[(1, 0)]
    assert why["label"] == "induction" and why["runner_up"] == "local"  # the best ratio among the other candidates
    assert "tier 1 labels come before tier 2" in why["why"]
    t.loc[(t.layer == 1) & (t["head"] == 0), "local"] = 0.01
    why = cards.explain(t).set_index(["layer", "head"]).loc[(1, 0)]
    assert why["runner_up"] == "previous_token" and "smaller score/threshold ratio (1.25x)" in why["why"]
    other = cards.explain(t).set_index(["layer", "head"]).loc[(0, 0)]
    assert other["label"] == "other" and "below 1" in other["why"]
    with pytest.raises(HeadlensError, match="no head L5H0"):
        cards.score_table(t, 5, 0)


def evidence_census() -> pd.DataFrame:
    """The planted census with L1H2 relabelled ``positional``, a label with no causal claim."""
    t = sink_census()
    t.loc[(t.layer == 1) & (t["head"] == 2), "label"] = "positional"
    return t


@pytest.fixture(scope="module")
def tiny_evidence(tiny_qwen):
    """Real causal evidence on tiny-qwen2 for the planted census: induction and delimiter are tested (on their tasks
    of ``validate.LABEL_TASKS``), positional is descriptive."""
    return evidence.label_evidence(tiny_qwen, evidence_census(), n_random=3, n_seqs=2, top_k=2, progress=False)


def test_label_evidence_tests_labels_with_a_task_and_calls_the_others_descriptive(tiny_evidence):
    labels = tiny_evidence.labels.set_index("label")
    assert labels.loc["positional", "verdict"] == evidence.DESCRIPTIVE
    assert labels.loc["induction", "verdict"] in ("supported", "no evidence")
    assert labels.loc["induction", "task"] == "repeat_loss" and labels.loc["induction", "n_heads"] == 1
    assert labels.loc["delimiter", "task"] == "code_loss" and labels.loc["delimiter", "n_heads"] == 2
    single = tiny_evidence.heads
    assert single[["label", "layer", "head"]].values.tolist() == [
        ["delimiter", 0, 1],
        ["delimiter", 0, 2],
        ["induction", 1, 0],
    ]
    verdict, alone = tiny_evidence.sentences("induction", 1, 0)
    assert verdict.startswith(f"Causal: {labels.loc['induction', 'verdict']}") and alone.startswith("Ablating L1H0")
    assert tiny_evidence.sentences("positional", 1, 2) == (
        f"Causal: {evidence.DESCRIPTIVE}; no task tests the positional label",
        None,
    )


def test_label_evidence_gives_causal_validations_numbers_in_one_batched_pass(tiny_qwen, tiny_evidence):
    from headlens.census.validate import causal_validation

    tested = ["induction", "delimiter"]
    slow = causal_validation(tiny_qwen, evidence_census(), labels=tested, n_random=3, n_seqs=2, progress=False)
    slow = slow.set_index("label")
    fast = tiny_evidence.labels.set_index("label").loc[slow.index, slow.columns]
    pd.testing.assert_frame_equal(fast, slow, check_exact=False, rtol=1e-4, atol=1e-5, check_dtype=False)


@needs_chromium
def test_head_view_shows_the_deciding_score_and_the_verdict(tiny_qwen, tiny_evidence, tmp_path):
    t = sink_census()
    t["card"] = cards.head_cards(tiny_qwen, t, evidence=tiny_evidence)
    path = write_report(
        tmp_path, model=tiny_qwen, census=CensusResult.from_table(t), evidence=tiny_evidence, figures=False
    )
    browser = Chromium()
    try:
        browser.open(path)
        browser.wait_for("document.querySelector('#head-pattern canvas') !== null", timeout=120)
        open_head(browser, "L0H1", via=".labelmap td")
        row = browser.eval(
            "Array.from(document.querySelectorAll('#head-scores tr.decides td')).map(c => c.textContent)"
        )
        assert row[0] == "delimiter" and row[2] == "0.350 [0.330, 0.370]" and row[5].startswith("decides the label")
        assert browser.eval("document.getElementById('head-verdict').textContent").endswith(
            tiny_evidence.verdict("delimiter")
        )
        assert "sink-corrected delimiter score 0.350" in browser.eval(
            "document.getElementById('head-card').textContent"
        )
        open_head(browser, "L1H0", via="#census-table a")
        verdict = tiny_evidence.verdict("induction")
        assert browser.eval("document.getElementById('head-verdict').textContent").endswith(verdict)
        shown = browser.eval("document.getElementById('head-evidence').innerText")
        assert "Single-head effect on its label's task" in shown
        alone = tiny_evidence.heads.set_index("label").loc["induction", "effect"]
        assert f"{alone:.3f}" in shown
        assert browser.eval("document.getElementById('causal').innerText").count(verdict) >= 1
        assert browser.problems() == [] and browser.dialogs() == []
    finally:
        browser.close()


# ---------------------------------------------------------------- task roles on the toy model's induction circuit


def test_task_roles_find_the_induction_head_on_the_toy_model():
    from headlens.analysis.toy import circuit_heads, load_induction_model
    from headlens.interventions.patching import induction_pair

    model = load_induction_model()
    pair = induction_pair(model, n_tokens=12, n_seqs=4, prefix=1, seed=0)
    table = roles.task_roles(model, pair).set_index(["layer", "head"])
    assert len(table) == model.cfg.n_layers * model.cfg.n_heads and table.attn_answer.notna().all()
    # layer 1 reads the answer where it first occurred and writes it; layer 0 (previous-token heads) writes nothing
    assert (table.loc[1].attn_answer > 0.7).all() and (table.loc[1].dla > 0.5).all()
    assert (table.loc[0].attn_answer < 0.05).all() and (table.loc[0].dla.abs() < 0.05).all()
    induction = circuit_heads()["induction"]
    assert table.loc[induction, "patching"] == table.patching.max() > 0.2  # the induction head restores most
    sentence = cards.role_sentence(table.reset_index(), *induction)
    rank = 1 + int((table.patching.abs() > table.patching.max()).sum())  # ranks go by |effect|
    assert f"rank {rank} of 8 heads" in sentence and "of its attention on the answer token" in sentence
    only = roles.task_roles(model, pair, heads=[induction]).set_index(["layer", "head"])
    assert only.patching.notna().sum() == 1 and only.loc[induction, "patching"] == pytest.approx(table.patching.max())
    once = roles.task_roles(model, pair, heads=iter([induction])).set_index(["layer", "head"])  # a one-pass iterator
    pd.testing.assert_frame_equal(once, only)


# ---------------------------------------------------------------- label glyphs and colours


def test_every_label_has_its_own_glyph_and_a_colour_blind_safe_colour():
    colorspacious = pytest.importorskip("colorspacious")
    labels = [t.name for t in head_types().values() if t.label] + ["other"]
    glyphs, colors = viz.label_glyphs(labels), viz.label_colors()
    shown = [glyphs[lb] for lb in labels if lb != "other"]
    assert len(set(shown)) == len(shown) and all(shown)
    hexes = [colors[lb] for lb in labels]
    assert len(set(hexes)) == len(hexes)

    def ucs(color, cvd):
        rgb = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        if cvd:
            space = {"name": "sRGB1+CVD", "cvd_type": cvd, "severity": 100}
            rgb = np.clip(colorspacious.cspace_convert(rgb, space, "sRGB1"), 0, 1)
        return colorspacious.cspace_convert(rgb, "sRGB1", "CAM02-UCS")

    for cvd in (None, "deuteranomaly", "protanomaly", "tritanomaly"):
        points = [ucs(c, cvd) for c in hexes]
        closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(points, 2))
        assert closest > 13, (cvd, closest)


def test_a_label_registered_later_gets_a_fresh_glyph():
    glyphs = viz.label_glyphs(["delimiter_run", "loop"])
    assert glyphs["loop"] not in viz.GLYPHS.values() and glyphs["delimiter_run"] not in viz.GLYPHS.values()


def test_label_map_cells_carry_glyph_colour_and_legend():
    t = sink_census()
    html = viz.label_grid_html(t)
    cell = re.search(
        r'<td class="lab" data-head="L0H1" data-label="delimiter" title="([^"]*)" style="([^"]*)">([^<]*)<', html
    )
    assert cell.group(1) == "L0H1 delimiter (0.35)" and viz.PALETTE["delimiter"] in cell.group(2)
    assert cell.group(3) == "Dl"
    assert 'class="legend"' in html and "delimiter (3)" in html and "induction (1)" in html


@needs_chromium
def test_a_notebook_view_without_the_bundle_says_how_to_fix_it(tmp_path):
    view = viz.CircuitsVisView("AttentionHeads", {"tokens": ["a", "b"], "attention": [[[1.0, 0.0], [0.5, 0.5]]]})
    viz.reset_notebook_bundle()
    first, second = view._repr_html_(), view._repr_html_()
    assert "var CircuitsVis=" in first and "var CircuitsVis=" not in second
    page = tmp_path / "alone.html"  # the second output shown alone (cleared output, separate iframe, exported cell)
    page.write_text(f'<!DOCTYPE html><meta charset="utf-8"><body>{second}</body>', encoding="utf-8")
    browser = Chromium()
    try:
        browser.open(page)
        browser.wait_for("document.querySelector('div.circuitsvis').textContent.includes('reset_notebook_bundle()')")
        viz.reset_notebook_bundle()  # the fix: the next display carries the bundle
        page.write_text(f'<!DOCTYPE html><meta charset="utf-8"><body>{view._repr_html_()}</body>', encoding="utf-8")
        browser.open(page)
        browser.wait_for("document.querySelector('div.circuitsvis canvas') !== null")
    finally:
        browser.close()


# ---------------------------------------------------------------- `headlens head`


@pytest.fixture
def census_dir(tmp_path, monkeypatch):
    """DIR/census.csv with provenance for tiny-qwen2 (the planted census), and an empty shared cache."""
    from headlens import load_model

    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path / "cache"))
    prov = io.provenance(load_model("tiny-qwen2"), **_census_settings(0))
    io.write_csv(sink_census(), tmp_path / "out" / "census.csv", provenance=prov)
    return tmp_path / "out"


def test_head_command_explains_a_head_from_the_saved_census(census_dir, monkeypatch):
    import importlib

    def no_census(*args, **kwargs):
        raise AssertionError("the census ran although census.csv exists")

    monkeypatch.setattr(importlib.import_module("headlens.census"), "run_census", no_census)
    result = CliRunner().invoke(
        app, ["head", "L0H1", "--model", "tiny-qwen2", "--out", str(census_dir), "--no-progress", "--no-causal"]
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "L0H1 is a delimiter head, confidence 1.00: its sink-corrected delimiter score 0.350 [0.330, 0.370]" in out
    assert re.search(r"delimiter 0\.110 .* 0\.350 .* nosink .* 1\.167 yes <- label", out)
    assert "not run (--no-causal)" in out


def test_head_command_measures_the_head_in_a_task(census_dir):
    result = CliRunner().invoke(
        app,
        ["head", "1.0", "--model", "tiny-qwen2", "--out", str(census_dir), "--no-progress", "--task", "induction"],
    )
    assert result.exit_code == 0, result.output
    assert "role in the task (induction:" in result.output and "patching effect" in result.output
    assert "Causal: " in " ".join(result.output.split())  # its induction label was tested (no saved evidence)


def test_circuit_sentence_names_what_a_head_feeds_and_what_feeds_it_strongest_exact_first():
    from headlens.analysis.cards import circuit_sentence

    edges = pd.DataFrame(
        {
            "sender": ["L0H2", "L0H2", "embed", "L0H2", "L0H1"],
            "receiver": ["L1H2", "L1H3", "L0H2", "L1H0", "L1H1"],
            "input": ["k", "v", "v", "q", "k"],
            "score": [-0.5, 0.9, 0.2, 0.05, 0.3],
            "exact": [-1.2, np.nan, 0.1, np.nan, 0.3],
            "in_circuit": [True, True, True, False, False],
        }
    )
    text = circuit_sentence(edges, 0, 2)
    # the exact change ranks L1H2's k (|-1.2|) above the unchecked score of L1H3's v (0.9); edges cut off are left out
    assert text == (
        "In the circuit: L0H2 feeds L1H2 [k] (exact -1.200), L1H3 [v] (score +0.900); it is fed by embed [v] (exact +0.100)"
    )
    assert circuit_sentence(edges, 0, 1) == "In the circuit: L0H1 is not part of it (its edges rank below the cut)"
    assert circuit_sentence(edges, 1, 5) is None
    with pytest.raises(HeadlensError, match="lacks column"):
        circuit_sentence(edges.drop(columns="input"), 0, 2)


def test_head_command_places_the_head_in_the_circuit_of_the_same_model(census_dir, tmp_path):
    circuit = tmp_path / "circuit"
    args = ["--task", "induction", "--out", str(circuit), "--census", str(census_dir / "census.csv"), "--no-progress"]
    made = CliRunner().invoke(app, ["circuit", "--model", "tiny-qwen2", *args])
    assert made.exit_code == 0, made.output
    edges = pd.read_csv(circuit / "edges.csv")
    kept = edges[edges["in_circuit"]]
    head = next(n for n in kept["receiver"] if n.startswith("L"))
    result = CliRunner().invoke(
        app,
        ["head", head, "--model", "tiny-qwen2", "--out", str(census_dir), "--circuit", str(circuit), "--no-causal"],
    )
    assert result.exit_code == 0, result.output
    assert f"In the circuit: {head} " in " ".join(result.output.split())
    other = CliRunner().invoke(app, ["head", head, "--model", "tiny-llama", "--circuit", str(circuit), "--no-causal"])
    assert other.exit_code != 0 and "made with model 'tiny-qwen2', not 'tiny-llama'" in str(other.exception)
    missing = CliRunner().invoke(app, ["head", head, "--model", "tiny-qwen2", "--circuit", str(tmp_path)])
    assert missing.exit_code != 0 and "give --circuit the --out directory" in str(missing.exception)


@pytest.mark.parametrize(
    "args, message",
    [
        (["L0H1,L1H2"], "give one head"),
        (["L9H0"], "is out of range"),
        (["L0H1", "--answer", " x"], "--answer and --wrong belong to a prompt pair"),
        (["L0H1", "--clean", "a b"], "give both --clean and --corrupted"),
        (["L0H1", "--clean", "a", "--corrupted", "b", "--task", "induction"], "not both"),
    ],
)
def test_head_command_bad_input(census_dir, args, message):
    result = CliRunner().invoke(app, ["head", *args, "--model", "tiny-qwen2", "--out", str(census_dir)])
    assert result.exit_code != 0 and message in str(result.exception), (result.output, result.exception)


@pytest.mark.slow
def test_head_command_on_qwen_prints_the_deciding_sink_corrected_score_inside_its_interval(qwen, qwen_census, tmp_path):
    prov = io.provenance(qwen, **_census_settings(0))
    io.write_csv(qwen_census, tmp_path / "census.csv", provenance=prov)
    why = cards.explain(qwen_census)
    nosink = why[why["column"].fillna("").str.endswith("_nosink")]
    raw = [qwen_census.loc[i, c.removesuffix("_nosink")] for i, c in nosink["column"].items()]
    r = nosink.assign(gap=nosink["score"] - raw).sort_values("gap").iloc[-1]  # the largest raw vs deciding gap
    assert r.gap > 0.1 and r.lo <= r.score <= r.hi and r.score >= r.threshold
    name = viz.head_name(r.layer, r["head"])
    result = CliRunner().invoke(app, ["head", name, "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"reusing {tmp_path / 'census.csv'}" in out
    assert re.search(rf"{name} is an? {r.label} head", out)
    assert f"its sink-corrected {r.label} score {r.score:.3f} [{r.lo:.3f}, {r.hi:.3f}] reaches the threshold" in out
    assert f"{r.label} " in out and "<- label" in out and "Causal: " in out


@pytest.mark.slow
def test_committed_head_cards_summary_is_what_the_census_gives_now(qwen_census):
    """docs/head_cards.md quotes analyses/results/head_cards/summary.json: it must match today's census of Qwen."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "analyses" / "results" / "head_cards"
    summary = json.loads((results / "summary.json").read_text())
    why = cards.explain(qwen_census)
    nosink = why[why["column"].fillna("").str.endswith("_nosink")]
    assert summary["labelled_by_nosink"] == len(nosink) and summary["n_heads"] == len(qwen_census)
    example = summary["example"]
    row = why[[viz.head_name(r.layer, r.head) == example["head"] for r in why.itertuples()]].iloc[0]
    assert (row["label"], row["column"]) == (example["label"], example["column"])
    assert row["score"] == pytest.approx(example["score"], abs=1e-4)
    saved = pd.read_csv(results / "cards.csv")
    assert list(saved["label"]) == list(why["label"])


def test_census_tables_that_misplace_heads_are_refused_everywhere(tiny_qwen, tmp_path):
    """A layer of 0.5 (int() made it 0: the report put L1H0's induction label on L0H0), -1 (numpy indexing drew it in
    the last layer of the label map), text layers, a head twice (the summary counted it twice) or a NaN label: one
    HeadlensError from every reader of a census table, before anything is written."""
    base = sink_census()
    bad = {
        "holds 0.5": base.assign(layer=base["layer"].astype(float)).replace({"layer": {1.0: 0.5}}),
        "holds -1": base.assign(layer=base["layer"] - 1),
        "must hold integers": base.assign(layer=base["layer"].astype(str)),
        "more than once": pd.concat([base, base.iloc[[4]]], ignore_index=True),
        "the label nan": base.assign(label=base["label"].where(base.index != 4)),
    }
    calls = (
        CensusResult.from_table,
        lambda t: heads_with_label(t, "induction"),
        cards.explain,
        viz.label_map,
        lambda t: write_report(tmp_path / "r", model=tiny_qwen, census=t, figures=False, progress=False),
    )
    for message, table in bad.items():
        for call in calls:
            with pytest.raises(HeadlensError, match=message):
                call(table)
    assert not (tmp_path / "r").exists()


def test_card_thresholds_and_top_k_are_checked():
    """head_cards(thresholds=) took any dict (a misspelt label was ignored); a negative top_k sliced from the end."""
    with pytest.raises(HeadlensError, match="unknown threshold 'inducton'"):
        cards.explain(sink_census(), thresholds={"inducton": 0.5})
    with pytest.raises(HeadlensError, match="thresholds must be a dict"):
        cards.explain(sink_census(), thresholds=[("induction", 0.5)])
    edges = pd.DataFrame({"sender": ["L0H1", "L0H2"], "receiver": ["L1H0", "L1H0"], "input": "k", "score": [1.0, 2.0]})
    with pytest.raises(HeadlensError, match="top_k must be an integer >= 1"):
        cards.circuit_sentence(edges, 1, 0, top_k=-1)


def test_a_label_no_registered_type_gives_is_not_called_other(tiny_qwen):
    """A misspelt or unregistered label ('inducton') used to read "has no label ('other')" on its card."""
    table = sink_census()
    table.loc[4, "label"] = "inducton"
    card = cards.head_cards(tiny_qwen, table).iloc[4]
    assert card.startswith("L1H0 is labelled 'inducton'") and "no registered head type gives" in card
    assert "'other'" not in card


def test_evidence_labels_must_label_some_head_and_causal_validation_checks_the_table(tiny_qwen, monkeypatch):
    """labels=["inducton"] (or a label no head has) gave an empty result, labels="induction" matched by substring;
    causal_validation ran on a census with layer -1 (numpy reads it as the last layer) and named other heads."""
    from headlens.census.validate import causal_validation

    t = evidence_census()
    monkeypatch.setattr(type(tiny_qwen), "forward", lambda *a, **k: pytest.fail("ran the model"))
    for labels in (["inducton"], ["successor"], []):
        with pytest.raises(HeadlensError, match="no head of the census is labelled"):
            evidence.label_evidence(tiny_qwen, t, labels=labels, n_random=3, n_seqs=2, progress=False)
    with pytest.raises(HeadlensError, match=r"no head of the census is labelled \['successor'\]"):
        causal_validation(tiny_qwen, t, labels=["successor"], n_random=3, n_seqs=2, progress=False)
    moved = t.assign(layer=t["layer"] - 1)
    with pytest.raises(HeadlensError, match="column 'layer' holds -1"):
        causal_validation(tiny_qwen, moved, labels=["induction"], n_random=3, n_seqs=2, progress=False)
    assert causal_validation(tiny_qwen, t, labels="positional", progress=False)["verdict"].tolist() == ["descriptive"]


def test_head_cards_page_quotes_the_committed_summary():
    """docs/head_cards.md's worked example, sink-corrected counts, task roles and timings are summary.json's; the
    slow test above ties that file to today's census of Qwen."""
    from pathlib import Path

    from docs_numbers import doc_text

    summary = json.loads((Path(__file__).parents[1] / "analyses/results/head_cards/summary.json").read_text())
    text = doc_text("head_cards")
    ex = summary["example"]
    runner_up = next(s for s in ex["scores"] if s["score"] == "first_token")
    assert (
        f"{ex['head']} is the highest-confidence head" in text
        and f"its raw {ex['label']} score is {ex['raw']:.3f}, its sink-corrected score {ex['score']:.3f} "
        f"[{ex['lo']:.3f}, {ex['hi']:.3f}] against the threshold {ex['threshold']}"
        in text
        and f"runner-up `first_token` ({runner_up['raw']:.3f})" in text
    )
    assert (
        f"{summary['labelled_by_nosink']} of the {summary['n_heads']} heads are labelled by a sink-corrected score, "
        f"{summary['labelled_by_nosink_more_than_0.1_from_raw']} of them" in text
    )
    first, second = summary["top_roles"][:2]
    assert (
        f"{first['head']} ({100 * first['patching']:.0f} % of the clean−corrupted gap, census label `{first['label']}`)"
        in text
    )
    assert f"{second['head']} ({100 * second['patching']:.0f} %, `{second['label']}`)" in text
    t = summary["timings_s_quiet_2_cores"]
    assert (
        f"census {t['census_s']:.0f} s, causal evidence {t['evidence_s']:.0f} s, cards for all {summary['n_heads']} "
        f"heads {t['cards_s']:.0f} s, task roles on the pair {t['roles_s']:.0f} s, load {t['load_s']:.0f} s" in text
    )

"""The committed census_trust results (analyses/census_trust.py on the default Qwen) hang together and hold what the
docs state from them: stability measured on fresh seeds 3-5 with the frozen settings, held-out causal verdicts."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scripts import load_script

from headlens.census.validate import LABEL_TASKS

RESULTS = Path(__file__).parents[1] / "analyses" / "results" / "census_trust"
BULK = ("first_token", "local", "other")


def tables(seeds):
    return [pd.read_csv(RESULTS / f"census_seed{s}.csv") for s in seeds]


def test_counts_are_the_seed0_table_and_lie_in_their_intervals():
    table = pd.read_csv(RESULTS / "census_seed0.csv")
    counts = pd.read_csv(RESULTS / "counts.csv").set_index("label")
    assert counts["n_heads"].sum() == len(table) == 336
    assert counts["n_heads"].to_dict() == table["label"].value_counts().reindex(counts.index).to_dict()
    assert ((counts["lo"] <= counts["n_heads"]) & (counts["n_heads"] <= counts["hi"])).all()


def test_fresh_seed_stability_is_what_the_seed_tables_say():
    """Stability at seeds 3, 4, 5 (never used for a choice), at the development seeds and at seeds 6-8 (scored after
    every choice), recomputed here from the committed tables: all heads, heads with a specific label, per label, and
    what a confident label promises at another seed."""
    stability = json.loads((RESULTS / "stability.json").read_text())
    assert stability["fresh_seeds"] == [3, 4, 5] and stability["development_seeds"][:1] == [0]
    development = tuple(stability["development_seeds"])
    assert stability["unseen_seeds"] == [6, 7, 8]
    for key, seeds in (("fresh", (3, 4, 5)), ("development", development), ("unseen", (6, 7, 8))):
        if len(seeds) < 3:  # development seeds 1 and 2 not scored yet: no development comparison was written
            assert "note" in stability[key]
            continue
        labels = np.stack([t["label"].to_numpy() for t in tables(seeds)])
        same = (labels == labels[0]).all(0)
        specific = ~np.isin(labels, BULK).all(0)
        record = stability[key]
        assert record["n_same"] == int(same.sum()) and record["n_specific_any_seed"] == int(specific.sum())
        assert record["n_specific_same"] == int((same & specific).sum())
        for label, row in record["by_label"].items():
            assert row["n_any_seed"] == int((labels == label).any(0).sum()), (key, label)
            assert row["n_every_seed"] == int((labels == label).all(0).sum()), (key, label)
        kept = census_trust_script().confident_kept(tables(seeds))
        assert {k: record[k] for k in kept} == pytest.approx(kept)
    fresh = stability["fresh"]
    met = fresh["same_label"] >= 0.97 and fresh["specific_same_label"] >= 0.95
    assert stability["targets_met_on_fresh_seeds"] == met


@pytest.mark.xfail(
    strict=True,
    reason="issue 24's targets are MISSED on fresh seeds with disjoint probe data (stability.json: 92.0 % of all heads, "
    "75.3 % of specifically-labelled heads); the settings stay frozen, not retuned on seeds 3-5",
)
def test_fresh_seed_stability_meets_the_targets():
    """The must-show: >= 97 % of all heads and >= 95 % of the heads with a specific label keep their label at fresh
    seeds 3, 4, 5. Strict xfail: it records the miss, and fails loudly the day the committed file meets them."""
    fresh = json.loads((RESULTS / "stability.json").read_text())["fresh"]
    assert fresh["same_label"] >= 0.97 and fresh["specific_same_label"] >= 0.95


def test_seeds_share_no_probe_window():
    sources = json.loads((RESULTS / "sources.json").read_text())
    assert {"0", "3", "4", "5"} <= set(sources) <= {str(s) for s in range(9)}
    windows = [w for by_kind in sources.values() for ws in by_kind.values() for w in ws]
    assert len(windows) == len(set(windows)) == len(sources) * 3 * 48
    assert json.loads((RESULTS / "summary.json").read_text())["provenance"]["seed_units_shared"] == 0


def test_nulls_cleared_and_every_label_has_a_verdict():
    null = pd.read_csv(RESULTS / "null.csv").set_index("label")
    assert null["clears"].all() and "closer_to_opener" in null.index
    causal = pd.read_csv(RESULTS / "causal.csv").set_index("label")
    table = pd.read_csv(RESULTS / "census_seed0.csv")
    assert set(causal.index) == set(table["label"]) & set(LABEL_TASKS)
    for label, row in causal.iterrows():
        if LABEL_TASKS[label].task is None:
            assert row["verdict"] == "descriptive"
            continue
        sign = LABEL_TASKS[label].expected_sign
        beats = sign * row["target_effect"] > max(0.0, sign * row["random_min"], sign * row["random_max"])
        assert row["verdict"] == ("supported" if beats else "no evidence"), label
        assert row["task"] == LABEL_TASKS[label].task
        # 20 distinct layer-matched sets; a one-head label has only its 13 layer-mates (successor: L16H8)
        assert row["n_random"] >= 20 or (row["n_heads"] == 1 and row["n_random"] == 13), label
    assert causal.loc["previous_token", "task"] == "repeat_loss"  # the induction task, not next-token text loss


def test_previous_token_heads_beat_random_sets_on_the_induction_task_and_the_key_path_file_agrees():
    """The must-show: previous_token beats layer-matched random sets on the induction task (ratio with interval).
    Ablated only on the path into the induction heads' keys, it does not (summary.json says so from key_path.csv)."""
    row = pd.read_csv(RESULTS / "causal.csv").set_index("label").loc["previous_token"]
    assert row["verdict"] == "supported" and row["ratio_lo"] > 1 and row["task"] == "repeat_loss"
    paths = pd.read_csv(RESULTS / "key_path.csv")
    target = paths.loc[paths.kind == "target", "effect"].iloc[0]
    random = paths.loc[paths.kind == "random", "effect"]
    recorded = json.loads((RESULTS / "summary.json").read_text())["previous_token_key_path"]
    assert recorded["effect"] == pytest.approx(target) and recorded["p_random_ge"] == pytest.approx(
        (random >= target).mean()
    )


@pytest.mark.slow
def test_default_qwen_census_regenerates_the_committed_seed0_table(qwen_census):
    """The committed seed-0 table is what the current code gives (same labels, scores within float noise)."""
    committed = pd.read_csv(RESULTS / "census_seed0.csv")
    assert qwen_census["label"].tolist() == committed["label"].tolist()
    for column in ("previous_token", "induction", "first_token", "local", "closer_to_opener", "copying", "confidence"):
        assert np.allclose(qwen_census[column], committed[column], atol=1e-4, equal_nan=True), column


@pytest.mark.slow
def test_previous_token_causal_effect_regenerates(qwen, qwen_census):
    """One ablation of the committed causal table, recomputed: the previous-token heads on the held-out induction
    task (same evaluation and reference sequences as analyses/census_trust.py)."""
    from headlens.census.validate import task_data
    from headlens.interventions.ablation import ablated_metrics

    row = pd.read_csv(RESULTS / "causal.csv").set_index("label").loc["previous_token"]
    heads = [(int(r.layer), int(r.head)) for r in qwen_census.itertuples() if r.label == "previous_token"]
    data = task_data(qwen, "repeat_loss", n_seqs=int(row["eval_sequences"]), seed=0)
    clean, (value,) = ablated_metrics(qwen, data.metric, [heads], method="mean", reference=data.reference)
    assert value - clean == pytest.approx(row["target_effect"], abs=1e-3)


# ---------------------------------------------------------------- the script itself, regenerated on a tiny model

PINNED = Path(__file__).parent / "data" / "census_trust_tiny.json"
TINY = {"repeated": 3, "natural": 3, "delimiter": 3, "code": 3}


def census_trust_script():
    """analyses/census_trust.py as a module."""
    return load_script("analyses/census_trust.py")


def digest(out: Path) -> dict:
    """What the tiny regeneration pins: agreement at fresh and development seeds, per-seed label counts, the causal
    verdicts and effects, which thresholds clear their null, the scaled triple's plan and agreement."""
    stability = json.loads((out / "stability.json").read_text())
    causal = pd.read_csv(out / "causal.csv")
    scaled = json.loads((out / "scaled.json").read_text())
    return {
        "fresh": stability["fresh"],
        "development": stability["development"],
        "label_counts_by_seed": stability["label_counts_by_seed"],
        "causal": causal[["label", "verdict", "n_label_heads", "heads"]].fillna("").to_dict("records"),
        "causal_effects": [round(float(x), 5) for x in causal["target_effect"].fillna(0)],
        "key_path_effects": [round(float(x), 5) for x in pd.read_csv(out / "key_path.csv")["effect"]],
        "null_clears": pd.read_csv(out / "null.csv").set_index("label")["clears"].to_dict(),
        "dev_sizes_same_label": [round(float(x), 6) for x in pd.read_csv(out / "dev_sizes.csv")["same_label"]],
        "draws": [
            [r.draw, r.label, r.verdict, round(float(r.target_effect), 5)]
            for r in pd.read_csv(out / "causal_draws.csv").itertuples()
        ],
        "scaled": {k: v for k, v in scaled.items() if k in ("scale", "sizes", "windows_shared")}
        | {k: v for k, v in scaled["measured"].items() if k != "by_label"},
    }


def test_census_trust_script_regenerates_its_pinned_tiny_results(tmp_path, monkeypatch):
    """The whole study (every step, then write) on the planted tiny Qwen (previous-token and induction heads set by
    hand, ``test_census.planted_model``) with a few sequences per kind: the same numbers as the pinned run, so a
    change to the script or to what it calls shows here, not only in the Qwen files."""
    from test_census import planted_model

    script = census_trust_script()
    monkeypatch.setattr(script, "OUT", tmp_path / "out")
    monkeypatch.setattr(script, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(script, "DEV_SIZES", {k: v + 1 for k, v in TINY.items()})
    monkeypatch.setattr(script, "SIZE_GRID", [TINY, {k: v + 1 for k, v in TINY.items()}])
    monkeypatch.setattr(script, "FROZEN", TINY)
    monkeypatch.setattr(script, "MAX_SCALE", 2)  # the scaled triple at 2x: the plan is tested, not the data size
    monkeypatch.setattr(script, "CAUSAL_SEQS", 2)
    monkeypatch.setattr(script, "N_RANDOM", 3)
    script.main([], model=planted_model())
    got = digest(tmp_path / "out")
    sources = json.loads((tmp_path / "out" / "sources.json").read_text())
    windows = [w for by_kind in sources.values() for ws in by_kind.values() for w in ws]
    assert len(windows) == len(set(windows)) == 9 * 3 * 3  # nine seeds, three text kinds, no window twice
    rules = pd.read_csv(tmp_path / "out" / "dev_rules.csv")
    assert rules["picked"].sum() == 1 and set(pd.read_csv(tmp_path / "out" / "rule_check.csv")["rule"]) == {
        "point",
        script.CANDIDATE_RULE,
    }
    check_dev_scaling(tmp_path / "out")
    check_draws(tmp_path / "out")
    check_scaled(tmp_path / "out", script)
    noise = pd.read_csv(tmp_path / "out" / "noise_model.csv")
    assert noise.loc[noise["kinds"] == "all", "scale"].tolist() == list(script.NOISE_SCALES)
    if not PINNED.exists():  # first run: write the pin (then commit it)
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert json.loads(json.dumps(got, sort_keys=True)) == json.loads(PINNED.read_text())


def check_dev_scaling(out: Path) -> None:
    """dev_scaling.csv at scale 1 under the census's rule is the development agreement at the frozen sizes."""
    scaling = pd.read_csv(out / "dev_scaling.csv")
    development = json.loads((out / "stability.json").read_text())["development"]
    at_frozen = scaling[(scaling["scale"] == 1.0) & (scaling["rule"] == "point")].iloc[0]
    assert at_frozen["n_same"] == development["n_same"]
    assert at_frozen["n_specific_same"] == development["n_specific_same"]
    assert (scaling["n_changed"] == scaling["n_heads"] - scaling["n_same"]).all()


def check_draws(out: Path) -> None:
    """causal_draws.csv: every tested label of causal.csv once per draw (0, 1, 2), draw 0 its causal.csv row, the same
    heads in every draw, and evaluation data no two draws share (text windows of the eval split; random-token
    sequences of other generators)."""
    from headlens.data import corpus

    draws = pd.read_csv(out / "causal_draws.csv")
    causal = pd.read_csv(out / "causal.csv")
    tested = causal[causal["verdict"] != "descriptive"].set_index("label")
    assert sorted(set(draws["draw"])) == [0, 1, 2] and len(draws) == 3 * len(tested)
    for label, mine in draws.groupby("label"):
        assert mine["draw"].tolist() == [0, 1, 2] and mine["heads"].nunique() == 1, label
        first = mine[mine["draw"] == 0].iloc[0]
        for column in ("heads", "verdict", "target_effect", "ratio", "p_random_ge"):
            assert first[column] == tested.loc[label, column], (label, column)
        if tested.loc[label, "task"] == "successor":  # fixed prompts: the draws differ in reference and random sets
            continue
        sources = [set(s.split()) for s in mine["eval_sources"]]
        assert all(not (a & b) for i, a in enumerate(sources) for b in sources[i + 1 :]), label
        text = [w for ws in sources for w in ws if not w.startswith("repeated@")]
        assert all(corpus.split_of(w.rsplit("@", 1)[0]) == "eval" for w in text), label


def check_scaled(out: Path, script) -> None:
    """scaled.json: the plan is the largest that the recorded capacity fits (scaled_plan), the measured agreement is
    the committed scaled tables', each seed reads its own windows of the score split (none of the development
    seeds', the overlap with seeds 3-8 as recorded), and the prediction is the noise model's at that scale."""
    from headlens.census.registry import head_types
    from headlens.census.run import label_thresholds
    from headlens.data import corpus

    scaled = json.loads((out / "scaled.json").read_text())
    assert scaled["seeds"] == list(script.SCALED_SEEDS)
    plan = json.loads(json.dumps(script.scaled_plan(scaled["capacity"])))
    assert {k: scaled[k] for k in plan} == plan and plan["scale"] > 1
    tables = [pd.read_csv(out / f"census_scaled_seed{s}.csv") for s in scaled["seeds"]]
    assert scaled["measured"] == json.loads(json.dumps(script.agreement(tables)))
    met = scaled["measured"]["same_label"] >= 0.97 and scaled["measured"]["specific_same_label"] >= 0.95
    assert scaled["targets_met"] == met
    sources = json.loads((out / "scaled_sources.json").read_text())
    windows = [w for by_kind in sources.values() for ws in by_kind.values() for w in ws]
    assert len(windows) == len(set(windows)) == 3 * sum(plan["sizes"][k] for k in plan["blocks"])
    assert all(corpus.split_of(w.rsplit("@", 1)[0]) == "score" for w in windows)
    earlier = json.loads((out / "sources.json").read_text())
    later = {s: len(set(windows) & {w for ws in by_kind.values() for w in ws}) for s, by_kind in earlier.items()}
    assert scaled["windows_shared"] == {"development": 0, **{s: n for s, n in later.items() if int(s) > 2}}
    types = head_types()
    limits = label_thresholds(types, None)
    plans = [("all", plan["scale"], None)]
    row = script.noise_model(script.scored_tables(out), types, limits, plans=plans).iloc[0]
    assert scaled["predicted"] == pytest.approx({k: row[k] for k in scaled["predicted"]})


def test_committed_scaled_triple_holds_its_checks():
    check_scaled(RESULTS, census_trust_script())


def test_scaled_plan_is_the_largest_multiple_every_kind_fits():
    """Blocks start after the development seeds' 240 windows, at a multiple of the block size: 5x (240 windows a
    seed, blocks 1-3) and 4x (192, blocks 2-4) both need 960 windows of each text kind, 3x (144, blocks 2-4) 720.
    One window fewer in any one kind drops every kind to 3x; too few for 1x stops."""
    script = census_trust_script()
    kinds = ("natural", "delimiter", "code")
    plan = script.scaled_plan(dict.fromkeys(kinds, 960))
    assert plan["scale"] == 5 and plan["blocks"] == dict.fromkeys(kinds, [1, 2, 3])
    assert plan["sizes"] == {k: 5 * n for k, n in script.FROZEN.items()}
    short = script.scaled_plan({**dict.fromkeys(kinds, 960), "code": 959})
    assert short["scale"] == 3 and short["blocks"] == dict.fromkeys(kinds, [2, 3, 4])
    assert script.scaled_plan(dict.fromkeys(kinds, 720))["scale"] == 3
    with pytest.raises(SystemExit, match="too few windows"):
        script.scaled_plan(dict.fromkeys(kinds, 300))


@pytest.mark.slow
def test_scaled_triple_windows_regenerate(qwen):
    """The committed scaled triple's capacity and every probe window (and repeated-token count) are what the script
    draws on the real Qwen today."""
    script = census_trust_script()
    scaled = json.loads((RESULTS / "scaled.json").read_text())
    assert script.capacity(qwen) == scaled["capacity"]
    committed = json.loads((RESULTS / "scaled_sources.json").read_text())
    plan = script.scaled_plan(scaled["capacity"])
    for seed in script.SCALED_SEEDS:
        probes = script.scaled_probes(qwen, seed, plan)
        assert {k: list(p.sources) for k, p in probes.items() if p.sources} == committed[str(seed)], seed
        assert len(probes["repeated"].tokens) == plan["sizes"]["repeated"]


def test_committed_causal_draws_hold_their_checks():
    check_draws(RESULTS)


def test_findings_quote_the_causal_draws():
    """docs/findings.md's table of every causal check on three evaluation draws is causal_draws.csv's: verdicts,
    effects of the label's heads, random means and how many random sets did as much, draw by draw."""
    from docs_numbers import doc_text, numbers, table_row

    draws = pd.read_csv(RESULTS / "causal_draws.csv")
    for label, mine in draws.groupby("label", sort=False):
        mine = mine.sort_values("draw")
        cells = table_row("findings", f"{label} (", after="| label (heads) | verdict, draws 0 / 1 / 2")
        assert cells[0] == f"{label} ({mine['n_heads'].iloc[0]})"
        assert cells[1] == " / ".join(mine["verdict"]), label
        for cell, column in ((cells[2], "target_effect"), (cells[3], "random_mean")):
            assert numbers(cell) == pytest.approx(mine[column].tolist(), abs=0.0005 + 1e-9), (label, column)
        as_large = [round(p * n) for p, n in zip(mine["p_random_ge"], mine["n_random"])]
        assert numbers(cells[4]) == [*as_large, mine["n_random"].iloc[0]], label
    text = doc_text("findings")
    bullet = text[text.index("The same checks on two more evaluation draws") :].split(" - ")[0]
    hold = bullet[bullet.index("hold on all three") : bullet.index("move with the data")]
    for label, verdicts in draws.groupby("label")["verdict"]:
        assert (label in hold) == (verdicts.nunique() == 1), label
    row = draws[(draws["label"] == "previous_token") & (draws["draw"] == 1)].iloc[0]  # the random set as large
    assert f"{row.random_max:+.3f} vs {row.target_effect:+.3f}" in bullet


def test_committed_dev_scaling_holds_the_development_agreement():
    check_dev_scaling(RESULTS)


def test_noise_model_regenerates_from_the_committed_seed_tables():
    """noise_model.csv is what the script's noise model gives from the nine committed census tables (it needs no
    model); its 1x row sits near the measured triples, its larger scales above it."""
    from headlens.census.registry import head_types
    from headlens.census.run import label_thresholds

    script = census_trust_script()
    committed = pd.read_csv(RESULTS / "noise_model.csv")
    seeds = [int(s) for s in committed["seeds"].iloc[0].split()]
    assert seeds == list(range(9))
    types = head_types()
    got = script.noise_model(tables(seeds), types, label_thresholds(types, None))
    pd.testing.assert_frame_equal(got, committed.drop(columns="seeds"), check_exact=False, rtol=1e-9)
    assert committed.loc[committed["kinds"] == "all", "specific_same_label_p50"].is_monotonic_increasing


def test_findings_quote_the_noise_model():
    """docs/findings.md's noise-model bullet: the 1x prediction, the scales where the targets are reached, and the
    measured triples beside it, from noise_model.csv and stability.json."""
    from docs_numbers import doc_text, numbers

    committed = pd.read_csv(RESULTS / "noise_model.csv")
    model = committed[committed["kinds"] == "all"].set_index("scale")
    stability = json.loads((RESULTS / "stability.json").read_text())
    text = doc_text("findings")
    bullet = text[text.index("How much data the targets need") :].split(" - ")[0]
    pct = lambda x: round(100 * x, 1)  # noqa: E731
    one = model.loc[1]
    assert (
        f"predicts {pct(one.same_label_p50)} % ({pct(one.same_label_p5)}–{pct(one.same_label_p95)} %) of all heads and "
        f"{pct(one.specific_same_label_p50)} % ({pct(one.specific_same_label_p5)}–{pct(one.specific_same_label_p95)} %)"
    ) in bullet
    for key, name in (("development", "development"), ("fresh", "fresh 3–5"), ("unseen", "6–8")):
        a = stability[key]
        assert f"{pct(a['same_label'])} / {pct(a['specific_same_label'])} % ({name}" in bullet, key
    all_at = model.index[model.same_label_p50 >= 0.97][0]
    specific_at = model.index[model.specific_same_label_p50 >= 0.95][0]
    assert f"97 % of all heads at k = {all_at} ({pct(model.loc[all_at].same_label_p50)} %)" in bullet
    row = model.loc[specific_at]
    assert (
        f"only at k = {specific_at} ({pct(row.specific_same_label_p50)} %, {pct(row.specific_same_label_p5)}–"
        f"{pct(row.specific_same_label_p95)} %)"
    ) in bullet
    flat = " ".join(bullet.split())
    for r in committed[committed["kinds"] != "all"].itertuples():  # which probes the data is for, at 16x
        alone = "" if r.kinds.startswith("all") else " alone"
        said = f"{r.kinds}{alone} {pct(r.same_label_p50)} / {pct(r.specific_same_label_p50)} %"
        assert r.scale == 16 and said in flat, said
    timings = json.loads((RESULTS / "summary.json").read_text())["timings_s"]
    fresh = [timings[f"census_fresh_seed{s}_s"] for s in (3, 4, 5)]
    assert numbers(bullet[bullet.index("a census of") :])[:2] == [round(min(fresh)), round(max(fresh))]


def test_findings_quote_the_scaled_triple():
    """docs/findings.md's scaled-triple bullet is scaled.json's: capacity, scale and sizes, the windows it reads, what
    the census's and the interval rule keep, the prediction beside it, per label, confident labels, timings."""
    from docs_numbers import doc_text, numbers

    scaled = json.loads((RESULTS / "scaled.json").read_text())
    text = doc_text("findings")
    bullet = text[text.index("More probe data, measured") :].split(" - ")[0]
    pct = lambda x: round(100 * x, 1)  # noqa: E731
    cap, sizes, blocks = scaled["capacity"], scaled["sizes"], scaled["blocks"]["natural"]
    assert f"{cap['natural']} prose, {cap['delimiter']} delimiter-code and {cap['code']} bracket-code" in bullet
    assert (
        f"at most {scaled['scale']} times" in bullet and f"({sizes['repeated']} repeated, {sizes['code']} of" in bullet
    )
    assert f"{3 * 16 * 48:,} windows per kind" in bullet
    first, last = blocks[0] * sizes["natural"], (blocks[-1] + 1) * sizes["natural"] - 1
    assert f"text windows {first}–{last}" in bullet
    assert all(scaled["blocks"][k] == blocks and sizes[k] == sizes["natural"] for k in scaled["blocks"])
    assert scaled["windows_shared"] == {"development": 0, "3": 0, **{str(s): 3 * 48 for s in range(4, 9)}}
    m, interval, p = scaled["measured"], scaled["rule_interval"], scaled["predicted"]
    assert f"{m['n_same']} of {m['n_heads']} heads keep their label ({pct(m['same_label'])} %)" in bullet
    assert (
        f"{m['n_specific_same']} of the {m['n_specific_any_seed']} specifically labelled heads ({pct(m['specific_same_label'])} %)"
        in bullet
    )
    assert (
        f"predicted {pct(p['same_label_p50'])} % ({pct(p['same_label_p5'])}–{pct(p['same_label_p95'])} %) and "
        f"{pct(p['specific_same_label_p50'])} % ({pct(p['specific_same_label_p5'])}–{pct(p['specific_same_label_p95'])} %)"
    ) in bullet
    assert m["same_label"] < p["same_label_p5"] and m["specific_same_label"] < p["specific_same_label_p5"]
    assert (
        f"{pct(interval['same_label'])} % of all heads and {pct(interval['specific_same_label'])} % of "
        f"{interval['n_specific_any_seed']} specific"
    ) in bullet
    changed = {k: v for k, v in m["by_label"].items() if v["n_every_seed"] < v["n_any_seed"]}
    for label, v in changed.items():
        assert f"{label} {v['n_any_seed']} → {v['n_every_seed']}" in bullet, label
    labels = np.stack(
        [pd.read_csv(RESULTS / f"census_scaled_seed{s}.csv")["label"].to_numpy() for s in scaled["seeds"]]
    )
    moved = [set(labels[:, i]) for i in range(labels.shape[1]) if len(set(labels[:, i])) > 1]
    specific = [len(lbs - set(BULK)) for lbs in moved]
    assert len(moved) == m["n_heads"] - m["n_same"] and max(specific) == 1  # never two specific labels on one head
    assert (
        f"Of the {len(moved)} heads whose label changes, none moves between two specific labels: each crosses between "
        f"a specific label and a bulk one ({specific.count(1)}) or between two bulk labels ({specific.count(0)})"
    ) in bullet
    assert f"{pct(m['confident_kept_pairwise'])} % of {m['n_confident_pairs']:,}" in bullet
    assert f"{pct(m['confident_specific_kept_pairwise'])} % of {m['n_confident_specific_pairs']}" in bullet
    seconds = scaled["seconds"].values()
    assert numbers(bullet[bullet.index("census took") :])[:2] == [round(min(seconds)), round(max(seconds))]


def test_without_sampling_noise_every_label_is_kept():
    """A seed table whose intervals have no width: the model's simulated seeds all give its labels."""
    from headlens.census.registry import head_types
    from headlens.census.run import label_thresholds

    script = census_trust_script()
    table = tables([0])[0]
    for column in [c[:-3] for c in table.columns if c.endswith("_lo")]:
        table[f"{column}_lo"] = table[f"{column}_hi"] = table[column]
    types = head_types()
    got = script.noise_model(
        [table] * 3, types, label_thresholds(types, None), plans=script.noise_plans(types, (1,)), n_sim=3
    )
    assert got.filter(like="same_label").eq(1.0).all(axis=None)
    assert got["n_specific_any_seed"].iloc[0] == (~table["label"].isin(BULK)).sum()


def test_point_rule_is_the_census_label_rule():
    """census_trust's rule comparison labels through the census's own rule (``_label``, extra candidate masks for
    the other rules): its ``point`` labels are build_table's labels (planted tiny Qwen), so it measures that rule."""
    from test_census import planted_model

    from headlens.census.registry import head_types
    from headlens.census.run import build_table, collect, label_thresholds
    from headlens.data.probes import default_probes

    script = census_trust_script()
    model = planted_model()
    types = head_types()
    limits = label_thresholds(types, None)
    per = collect(model, default_probes(model, seed=0, n_seqs=3, n=16, seq_len=40), types, progress=False)
    table = build_table(model, per, types, limits, seed=0, n_boot=0)[0]
    rules = script.rule_labels(per, types, limits, seed=0, L=model.cfg.n_layers, H=model.cfg.n_heads, n_boot=20)
    assert list(rules["point"]) == list(table["label"])
    assert set(rules) == set(script.RULES)


def test_rule_check_file_holds_what_the_tables_say():
    """rule_check.csv (the rule development picked, on seeds no choice saw) is written with its own verdict."""
    check = pd.read_csv(RESULTS / "rule_check.csv")
    rules = pd.read_csv(RESULTS / "dev_rules.csv")
    assert rules.loc[rules["picked"], "rule"].tolist() == [census_trust_script().CANDIDATE_RULE]
    for r in check.itertuples():
        assert r.meets_97_95 == (r.same_label >= 0.97 and r.specific_same_label >= 0.95)
    point = check[(check["rule"] == "point") & (check["seeds"] == "fresh 3-5")].iloc[0]
    stability = json.loads((RESULTS / "stability.json").read_text())["fresh"]
    assert point["same_label"] == pytest.approx(stability["same_label"])  # the census's rule: the stability file


def test_confident_kept_reads_each_ordered_pair_of_seeds_from_the_first_seeds_confidence():
    """A head counts for the pair (a, b) when its label at a is confident, whatever happens at b."""
    a = pd.DataFrame({"label": ["induction", "local", "other"], "confidence": [0.95, 0.95, 0.5]})
    b = pd.DataFrame({"label": ["induction", "first_token", "other"], "confidence": [0.5, 0.99, 0.99]})
    got = census_trust_script().confident_kept([a, b])
    # a -> b: heads 0 and 1 are confident at a, head 0 keeps its label; b -> a: heads 1 and 2, head 2 keeps it
    assert got["n_confident_pairs"] == 4 and got["confident_kept_pairwise"] == 0.5
    assert got["n_confident_specific_pairs"] == 1 and got["confident_specific_kept_pairwise"] == 1.0


def test_findings_page_quotes_the_committed_census_stability_and_causal_files():
    """docs/findings.md's census table (count [95 % interval], the top heads' deciding scores), its stability headline
    (fresh seeds 3-5 and 6-8), the share of `other` and the causal ratios are what the committed files hold; the
    files themselves are tied to the code by the tiny regeneration above and the slow seed-0 census test."""
    from docs_numbers import doc_text, numbers, table_row

    counts = pd.read_csv(RESULTS / "counts.csv").set_index("label")
    seed0 = pd.read_csv(RESULTS / "census_seed0.csv")
    seed0.index = [f"L{r.layer}H{r.head}" for r in seed0.itertuples()]
    for label, row in counts.iterrows():
        cells = table_row("findings", f"{label} |", after="| label | heads [95 % interval]")
        assert numbers(cells[1]) == [row.n_heads, row.lo, row.hi], label
        for head, shown in re.findall(r"(L\d+H\d+) \((\d\.\d\d)", cells[2]):
            assert seed0.loc[head, "label"] == label and abs(float(shown) - seed0.loc[head, "label_score"]) <= 0.005
    text = doc_text("findings")
    stability = json.loads((RESULTS / "stability.json").read_text())
    fresh, unseen = stability["fresh"], stability["unseen"]
    assert f"{fresh['n_same']} of {fresh['n_heads']} heads keep their label ({100 * fresh['same_label']:.1f} %" in text
    assert (
        f"{fresh['n_specific_same']} of the {fresh['n_specific_any_seed']} heads with a specific label" in text
        and f"({100 * fresh['specific_same_label']:.1f} %" in text
    )
    assert (
        f"{unseen['n_same']} of {unseen['n_heads']} ({100 * unseen['same_label']:.1f} %) and "
        f"{unseen['n_specific_same']} of {unseen['n_specific_any_seed']} specific "
        f"({100 * unseen['specific_same_label']:.1f} %)" in text
    )
    assert f"{100 * fresh['confident_kept_pairwise']:.1f} % of {fresh['n_confident_pairs']:,} cases" in text
    other = int(counts.loc["other", "n_heads"])
    assert f"`other` is {other} of {len(seed0)} heads ({100 * other / len(seed0):.1f} %)" in text
    causal = json.loads((RESULTS / "summary.json").read_text())["causal"]
    for label, digits in (("previous_token", 1), ("induction", 0), ("successor", 0)):
        c = causal[label]
        assert f"ratio {c['ratio']:.{digits}f} [{c['lo']:.{digits}f}–{c['hi']:.{digits}f}]" in text, label


def test_census_trust_refuses_a_cache_of_other_code_or_another_model(tmp_path, monkeypatch):
    """The study's step cache (per-seed scores, nulls, causal rows) is reused across runs: a cache made by other
    headlens code, for another model or at other sizes stops the run instead of being mixed into the results."""
    from headlens import tiny_model

    script = census_trust_script()
    monkeypatch.setattr(script, "CACHE", tmp_path / "cache")
    model = tiny_model("qwen2")
    script.check_cache(model)
    script.check_cache(model)  # the same run again: fine
    (tmp_path / "cache" / "dev_seed0.npz").write_bytes(b"scores")
    with pytest.raises(SystemExit, match="another weights"):
        script.check_cache(tiny_model("qwen2", seed=1))
    monkeypatch.setattr(script, "code_version", lambda: "0.0.0+other")
    with pytest.raises(SystemExit, match="another code"):
        script.check_cache(model)
    (tmp_path / "cache" / "stamp.json").unlink()
    with pytest.raises(SystemExit, match="unknown origin"):
        script.check_cache(model)


def test_head_report_is_the_seed0_census_and_the_findings_quote_it():
    """analyses/head_report.py runs the default census at seed 0: its labels are census_seed0.csv's, and the findings'
    single-head ablation figures are its summary's."""
    from docs_numbers import doc_text

    report = RESULTS.parent / "head_report"
    summary = json.loads((report / "summary.json").read_text())
    seed0 = pd.read_csv(RESULTS / "census_seed0.csv")
    assert summary["labels"] == seed0["label"].value_counts().to_dict()
    assert pd.read_csv(report / "census.csv")["label"].tolist() == seed0["label"].tolist()
    text = doc_text("findings")
    n_induction = summary["labels"]["induction"]
    assert (
        f"{n_induction} induction heads raise the repeated-half loss by only "
        f"{summary['mean_ablation_effect_induction_heads']:.3f} nats on average (other heads: "
        f"{summary['mean_ablation_effect_other_heads']:.3f})" in text
    )

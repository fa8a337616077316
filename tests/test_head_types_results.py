"""The committed head-type study (analyses/head_types.py on the default Qwen) holds what the README states from it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

RESULTS = Path(__file__).parents[1] / "analyses" / "results" / "head_types"


@pytest.fixture(scope="module", params=["committed", "tiny"])
def results(request, tmp_path_factory) -> Path:
    """The committed study, and a fresh run of the same script on a tiny random Qwen (its smoke mode): the structural
    checks below hold for both, so they check the code that writes the files, not only the files."""
    if request.param == "committed":
        return RESULTS
    out = tmp_path_factory.mktemp("head_types")
    script = Path(__file__).parents[1] / "analyses" / "head_types.py"
    args = ["--model", "tiny-qwen2", "--out", str(out), "--n-random", "3", "--n-random-bracket", "3"]
    subprocess.run([sys.executable, str(script), *args, "--code-windows", "4"], check=True, capture_output=True,
                   text=True, timeout=900)  # fmt: skip
    for name in ("scores.csv", "causal.csv", "causal_draws.csv", "ablation_sets.csv"):  # the committed files' schema
        assert list(pd.read_csv(out / name).columns) == list(pd.read_csv(RESULTS / name).columns), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny-qwen2" and "rope_change" not in summary  # rope_change: pinned Qwen values
    assert set(summary) | {"rope_change"} == set(json.loads((RESULTS / "summary.json").read_text()))
    return out


def test_every_type_has_a_causal_row_and_the_readme_verdicts_hold():
    causal = pd.read_csv(RESULTS / "causal.csv").set_index("type")
    assert set(causal.index) == {
        "copy_suppression",
        "successor",
        "positional",
        "bracket_matching",
        "closer_to_opener",
        "identifier",
        "retrieval",
    }
    verdict = causal["target_worse_than_every_random"].to_dict()
    assert verdict == {
        "copy_suppression": True,
        "successor": True,
        "positional": False,
        "bracket_matching": True,
        "closer_to_opener": False,
        "identifier": False,
        "retrieval": True,
    }
    bracket = causal.loc["bracket_matching"]  # the must-show: a larger drop than every random set
    assert bracket["target_effect"] < bracket["random_effect_min"] and bracket["n_random"] >= 20
    retrieval = causal.loc["retrieval"]
    assert retrieval["target_effect"] < -2 and retrieval["random_effect_min"] > -0.2


def test_each_causal_row_is_its_ablated_sets(results):
    """causal.csv's effects, ratio interval and share of random sets as bad are those of the sets in
    ablation_sets.csv (the ratio interval is the census's: ``headlens.census.validate.ratio_interval``, seed 0)."""
    from headlens.census.validate import ratio_interval

    causal = pd.read_csv(results / "causal.csv").set_index("type")
    sets = pd.read_csv(results / "ablation_sets.csv")
    for name, row in causal.iterrows():
        mine = sets[sets.type == name]
        target, rand = mine[mine.kind == "target"].iloc[0], mine[mine.kind == "random"]
        assert len(rand) == row["n_random"] and target["heads"] == row["heads_ablated"], name
        assert abs(target["effect"] - row["target_effect"]) < 1e-5, name
        for key, value in ratio_interval(target["effect"], rand["effect"], seed=0).items():
            assert abs(value - row[key]) <= 5e-4 * max(1.0, abs(value)), (name, key)
        assert row["p_random_ge"] == round(float((rand["worsening"] >= target["worsening"]).mean()), 3), name
        assert row["target_worse_than_every_random"] == (row["p_random_ge"] == 0), name


def test_findings_head_type_ratios_are_the_committed_rows():
    """docs/findings.md's causal bullets for the head types quote each ratio and its interval from causal.csv."""
    import re

    from docs_numbers import doc_text

    causal = pd.read_csv(RESULTS / "causal.csv").set_index("type")
    text = doc_text("findings")
    bullets = {
        "successor": "Successor (L16H8)",
        "positional": "Positional (9 heads)",
        "bracket_matching": "Bracket matching (11 heads",
        "closer_to_opener": "Closer to opener (11 heads",
        "identifier": "Identifier (10 heads",
        "retrieval": "Retrieval (the 20 strongest",
    }
    for name, start in bullets.items():
        bullet = text[text.index(start) :].split(" - ")[0]
        match = re.search(r"ratio (−?[\d.]+)(?:,? (?:\[|interval )(−?[\d.]+)(?:–| to )(−?[\d.]+))?", bullet)
        assert match, name
        row = causal.loc[name]
        for shown, value in zip(match.groups(), (row["ratio"], row["ratio_lo"], row["ratio_hi"])):
            if shown is not None:
                decimals = len(shown.split(".")[1]) if "." in shown else 0
                assert abs(float(shown.replace("−", "-")) - value) <= 0.5 * 10**-decimals, (name, shown, value)


def test_code_draws_are_disjoint_evaluation_data_and_draw_0_is_the_causal_table(results):
    """causal_draws.csv: three evaluation draws of the code checks share no window, all from the eval split; draw 0
    is causal.csv's row (the same heads, random sets and data)."""
    from headlens.data import corpus

    draws = pd.read_csv(results / "causal_draws.csv")
    causal = pd.read_csv(results / "causal.csv").set_index("type")
    assert sorted(set(draws["draw"])) == [0, 1, 2] and len(draws) == 9
    windows = {d: set(" ".join(g["eval_sources"]).split()) for d, g in draws.groupby("draw")}
    assert all(not (windows[a] & windows[b]) for a in windows for b in windows if a < b)
    assert all(corpus.split_of(w.rsplit("@", 1)[0]) == "eval" for ws in windows.values() for w in ws)
    for row in draws[draws["draw"] == 0].itertuples():
        committed = causal.loc[row.type]
        assert row.heads_ablated == committed["heads_ablated"], row.type
        assert abs(row.target_effect - committed["target_effect"]) < 1e-4, row.type
        assert row.target_worse_than_every_random == committed["target_worse_than_every_random"], row.type


def test_findings_quote_the_code_draws():
    """Each code type's bullet in docs/findings.md says in how many of the draws its heads beat every random set, and
    lists the draws' effects in order, as causal_draws.csv has them."""
    import re

    from docs_numbers import doc_text, numbers

    draws = pd.read_csv(RESULTS / "causal_draws.csv").sort_values("draw")
    text = doc_text("findings")
    starts = {"bracket_matching": "Bracket matching (11 heads", "closer_to_opener": "Closer to opener (11 heads",
              "identifier": "Identifier (10 heads"}  # fmt: skip
    for name, start in starts.items():
        bullet = text[text.index(start) :].split(" - ")[0]
        mine = draws[draws["type"] == name]
        said = re.search(r"in (\d) of (\d) disjoint evaluation draws .*?effects ([^a-z]*) nats", bullet)
        assert said, name
        assert (int(said.group(1)), int(said.group(2))) == (
            int(mine["target_worse_than_every_random"].sum()),
            len(mine),
        )
        shown = numbers(said.group(3))
        assert len(shown) == len(mine), name
        for value, effect in zip(shown, mine["target_effect"]):
            assert abs(value - effect) <= 0.0051, (name, value, effect)


def test_code_draws_regenerate_on_a_tiny_model(tiny_qwen):
    """The script's code_draws on a tiny Qwen: one row per draw and type, each draw on its own windows."""
    from scripts import load_script

    script = load_script("analyses/head_types.py")
    L, H = tiny_qwen.cfg.n_layers, tiny_qwen.cfg.n_heads
    scores = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)})
    for name, _ in script.CODE_CHECKS:
        scores[name] = np.where(np.arange(L * H) == 1, 0.9, 0.0)  # one head of layer 0 labelled
    got = script.code_draws(tiny_qwen, scores, n_windows=4, n_random=dict.fromkeys(scores.columns[2:], 2), seeds=(0, 1))
    assert list(zip(got["draw"], got["type"])) == [(d, n) for d in (0, 1) for n, _ in script.CODE_CHECKS]
    assert (got["heads_ablated"] == "L0H1").all() and (got["n_random"] == 2).all()
    by_draw = got.groupby("draw")["eval_sources"].first().str.split()
    assert len(by_draw[0]) == 4 and not set(by_draw[0]) & set(by_draw[1])


def test_summary_counts_match_the_scores(results):
    scores = pd.read_csv(results / "scores.csv")
    summary = json.loads((results / "summary.json").read_text())
    for name in ("successor", "bracket_matching", "identifier", "retrieval"):
        threshold = summary["thresholds"][name]
        assert summary["counts"][name] == int((scores[name] >= threshold).sum()), name


def test_findings_head_type_table_is_the_committed_study():
    """docs/findings.md's "More head types" table: each count of heads at or above the threshold and each top head's
    score are analyses/results/head_types' (summary.json counts, scores.csv)."""
    import re

    from docs_numbers import numbers, table_row

    scores = pd.read_csv(RESULTS / "scores.csv")
    scores.index = [f"L{r.layer}H{r.head}" for r in scores.itertuples()]
    summary = json.loads((RESULTS / "summary.json").read_text())
    rows = {
        "copy_suppression": "copy suppression (",
        "successor": "successor (",
        "positional": "positional (",
        "bracket_matching": "bracket matching (",
        "identifier": "identifier (",
        "retrieval": "retrieval (",
    }
    for name, start in rows.items():
        cells = table_row("findings", start, after="| type | heads ≥ threshold |")
        assert numbers(cells[1])[0] == summary["counts"][name], name
        column = "negative_copying" if name == "copy_suppression" else name
        for head, shown in re.findall(r"(L\d+H\d+) \(?(\d\.\d\d)", cells[2]):
            assert abs(float(shown) - scores.loc[head, column]) <= 0.005, (name, head)
    copy = table_row("findings", rows["copy_suppression"], after="| type | heads ≥ threshold |")[2]
    negative = int((scores["negative_copying"] >= summary["thresholds"]["negative_copying"]).sum())
    most = scores["attention_to_predicted"].idxmax()
    assert copy.startswith(f"{negative} heads copy negatively")
    assert f"(the most: {most}, {scores.loc[most, 'attention_to_predicted']:.2f})" in copy


@pytest.mark.slow
def test_the_committed_scores_regenerate_on_qwen(qwen):
    """scores.csv is what the study's score functions give today on the default Qwen: successor from the weights, and
    bracket_matching / closer_to_opener / identifier on the census's code probe of seed 0 (analyses/head_types.py)."""
    from headlens.census.code_heads import code_scores
    from headlens.census.ov import successor_scores
    from headlens.data.code import code_probe
    from headlens.data.probes import DEFAULT_SIZES

    scores = pd.read_csv(RESULTS / "scores.csv")
    successor = successor_scores(qwen).double().flatten().numpy()
    assert np.abs(successor - scores["successor"].to_numpy()).max() <= 1e-5
    code = code_scores(qwen, code_probe(qwen, seed=0, n_seqs=DEFAULT_SIZES["code"], min_pairs=1))
    for column in ("bracket_matching", "closer_to_opener", "identifier"):
        assert np.abs(code[column].to_numpy() - scores[column].to_numpy()).max() <= 1e-4, column


def test_the_census_and_the_study_score_identifier_alike():
    """Both score identifier on the same 48 code windows of seed 0 and average over the windows with a use (the census
    used to count a window without one as 0: L3H0 0.70 against the study's 0.86)."""
    census = pd.read_csv(RESULTS.parent / "census_trust" / "census_seed0.csv")
    scores = pd.read_csv(RESULTS / "scores.csv")
    assert np.abs(census["identifier"].to_numpy() - scores["identifier"].to_numpy()).max() <= 1e-4


def test_rope_change_is_rebuilt_from_its_pinned_old_values():
    """summary.json's rope_change (old eta^2 vs new excess-over-uniform RoPE summary) is what the study's rope_change
    gives from rope_summary.csv and the pinned old values, not from head_report's files, which were regenerated."""
    import json

    from scripts import load_script

    script = load_script("analyses/head_types.py")
    got = script.rope_change(pd.read_csv(RESULTS / "rope_summary.csv"))
    assert got == json.loads((RESULTS / "summary.json").read_text())["rope_change"]
    assert "L1H9 previous_token: positional 0.97 -> 0.81, peak 1 -> 1" in got["heads"]

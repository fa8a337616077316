"""Atlas across models: the trained toy model's circuit shows up where it was trained, and the page is offline."""

import pytest

import headlens
from headlens.analysis.atlas import atlas, parse_sources
from headlens.analysis.toy import circuit_heads
from headlens.render.atlas import atlas_html, write_atlas


@pytest.fixture(scope="module")
def result(one_thread):
    return atlas("tiny-qwen2,toy", seeds=2, progress=False)


def test_toy_circuit_sits_where_it_was_trained(result):
    circuit = circuit_heads()
    toy = result.census["toy"]
    layer, head = circuit["induction"]
    assert toy.set_index(["layer", "head"]).loc[(layer, head), "label"] == "induction"
    pos = result.positions.set_index(["model", "label"])
    assert f"L{layer}H{head}" in pos.loc[("toy", "induction"), "heads"]
    assert pos.loc[("toy", "induction"), "mean_depth"] == pytest.approx((layer + 0.5) / 2)
    assert pos.loc[("toy", "previous_token"), "mean_depth"] == pytest.approx(0.25)  # layer 0 of 2
    shares = result.depth_shares.set_index(["model", "bin", "label"])
    assert shares.loc[("toy", 3, "induction"), "share"] > 0.0 and shares.loc[("toy", 1, "induction"), "share"] == 0.0


def test_counts_have_a_seed_interval_and_add_up(result):
    counts = result.counts
    assert (counts["min"] <= counts["n_heads"]).all() and (counts["n_heads"] <= counts["max"]).all()
    assert counts.groupby("model").n_heads.sum().to_dict() == {"tiny-qwen2": 8, "toy": 8}
    assert (counts.n_seeds == 2).all()
    seed0 = headlens.run_census(headlens.tiny_model("qwen2"), seed=0, progress=False).table
    assert result.census["tiny-qwen2"]["induction"].tolist() == seed0["induction"].tolist()


def test_page_is_offline_and_escaped(result, tmp_path):
    bad = "<script>x</script>"

    def rename(df):
        return df.assign(model=df.model.replace("toy", bad))

    renamed = type(result)(
        {bad if k == "toy" else k: rename(v) for k, v in result.census.items()},
        rename(result.counts),
        rename(result.depth_shares),
        rename(result.positions),
        result.settings,
    )
    page = atlas_html(renamed)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page
    path = write_atlas(result, tmp_path / "atlas")
    assert path.name == "atlas.html" and (tmp_path / "atlas" / "census_toy.csv").is_file()
    assert not [p for p in (tmp_path / "atlas").iterdir() if p.name.startswith(".")]


def test_bad_sources_fail_before_any_work(tmp_path):
    with pytest.raises(headlens.HeadlensError, match="no models"):
        parse_sources(" , ")
    with pytest.raises(headlens.HeadlensError, match="listed twice"):
        parse_sources("toy,toy")
    with pytest.raises(headlens.HeadlensError, match="adapter directory"):
        parse_sources(f"qwen+{tmp_path / 'missing'}")
    with pytest.raises(headlens.HeadlensError, match="no such model"):
        parse_sources("./nowhere.gguf")

import math

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from headlens import HeadlensError
from headlens.census import scores
from headlens.census.attention_stats import (
    attention_mask,
    attention_scores,
    entropy_by_scale,
    group_contrast,
    head_similarity,
    mask_pattern,
    mean_entropy,
    mean_offdiagonal,
    pattern_similarity,
    query_entropy,
    scale_entropy_table,
    scale_settings,
    softmax_pattern,
    token_match,
)


@pytest.fixture(scope="module")
def tiny_run(tiny_qwen):
    tokens = torch.randint(0, tiny_qwen.cfg.d_vocab, (3, 24), generator=torch.Generator().manual_seed(0))
    _, cache = tiny_qwen.run_with_cache(tokens)
    return tokens, cache


def prev_and_first(n: int) -> torch.Tensor:
    """Two planted heads on one sequence: head 0 attends to i-1 (query 0 to itself), head 1 to position 0."""
    prev = torch.zeros(n, n)
    prev[0, 0] = 1
    prev[torch.arange(1, n), torch.arange(n - 1)] = 1
    first = torch.zeros(n, n)
    first[:, 0] = 1
    return torch.stack([prev, first])[None]


# ---------------------------------------------------------------- masks


def test_mask_counts_and_uniform_patterns():
    n, w = 11, 3
    assert attention_mask(n, "full").sum() == n * n
    assert attention_mask(n, "causal").sum() == n * (n + 1) // 2
    assert attention_mask(n, "local", window=w).sum() == n * (2 * w + 1) - w * (w + 1)
    assert attention_mask(n, "local_causal", window=w).sum() == n * (w + 1) - w * (w + 1) // 2
    assert attention_mask(5, "local", window=1)[2].tolist() == [False, True, True, True, False]
    for kind in ("full", "causal", "local", "local_causal"):
        p = mask_pattern(n, kind, window=w)
        torch.testing.assert_close(p.sum(-1), torch.ones(n))
        nz = p[p > 0]
        row = p[n // 2]
        assert torch.allclose(row[row > 0], row[row > 0][0].expand_as(row[row > 0]))
        assert nz.min() > 0


def test_mask_errors():
    with pytest.raises(HeadlensError, match="unknown mask kind"):
        attention_mask(4, "diagonal")
    with pytest.raises(HeadlensError, match="window"):
        attention_mask(4, "local", window=-1)
    with pytest.raises(HeadlensError, match="at least 1"):
        attention_mask(0)


# ---------------------------------------------------------------- entropy


def test_query_entropy_uniform_and_one_hot():
    p = mask_pattern(6, "causal")
    torch.testing.assert_close(query_entropy(p), torch.arange(1, 7).float().log())
    assert query_entropy(torch.eye(5)).abs().max() == 0


def test_mean_entropy_raw_and_normalised():
    n = 10
    uniform = mask_pattern(n, "causal").expand(2, 3, n, n)
    expected = torch.arange(2, n + 1).float().log().mean()
    torch.testing.assert_close(mean_entropy(uniform), expected.expand(3))
    torch.testing.assert_close(mean_entropy(uniform, normalize=True), torch.ones(3))
    full = mask_pattern(n, "full")[None, None]
    torch.testing.assert_close(mean_entropy(full, mask=attention_mask(n, "full")), torch.tensor([math.log(n)]))


def test_mean_entropy_normalised_is_the_census_entropy(tiny_run):
    _, cache = tiny_run
    for layer in range(2):
        torch.testing.assert_close(
            mean_entropy(cache["pattern", layer], normalize=True), scores.entropy(cache["pattern", layer])
        )


def test_recomputed_pattern_matches_transformer_lens(tiny_qwen, tiny_run):
    _, cache = tiny_run
    assert tiny_qwen.cfg.n_key_value_heads < tiny_qwen.cfg.n_heads
    for layer in range(2):
        q, k = cache["rot_q", layer], cache["rot_k", layer]
        pattern = softmax_pattern(attention_scores(q, k, scale=1 / tiny_qwen.cfg.attn_scale))
        torch.testing.assert_close(pattern, cache["pattern", layer])


def test_attention_scores_expand_kv_heads_by_group():
    q = torch.zeros(1, 1, 4, 2)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 2, 2)
    k[0, 0, 0, 0], k[0, 0, 1, 0] = 3.0, 5.0
    s = attention_scores(q, k, scale=0.5)
    assert s[0, :, 0, 0].tolist() == [1.5, 1.5, 2.5, 2.5]
    with pytest.raises(HeadlensError, match="grouped"):
        attention_scores(torch.zeros(1, 1, 3, 2), k, scale=1.0)


def test_scale_entropy_table_model_scale_matches_real_pattern(tiny_qwen, tiny_run):
    tokens, cache = tiny_run
    df = scale_entropy_table(tiny_qwen, tokens, batch_size=2, progress=False)
    assert set(df.setting) == {"unscaled", "T=0.5", "T=1", "T=2"}
    assert len(df) == 2 * 4 * tiny_qwen.cfg.n_heads
    for layer in range(2):
        rows = df[(df.layer == layer) & (df.setting == "T=1")].sort_values("head")
        torch.testing.assert_close(
            torch.tensor(rows.entropy.values, dtype=torch.float32), mean_entropy(cache["pattern", layer])
        )
        torch.testing.assert_close(
            torch.tensor(rows.norm_entropy.values, dtype=torch.float32), scores.entropy(cache["pattern", layer])
        )
    assert df[df.setting == "T=1"].kv_head.tolist() == [0, 0, 1, 1] * 2
    # entropy of softmax(beta * s) falls as beta grows, row by row: unscaled (beta=1) < T=0.5 < T=1 < T=2
    wide = df.pivot_table(index=["layer", "head"], columns="setting", values="entropy")
    assert (
        (wide["unscaled"] <= wide["T=0.5"]).all()
        and (wide["T=0.5"] < wide["T=1"]).all()
        and (wide["T=1"] < wide["T=2"]).all()
    )


def test_scale_entropy_table_errors(tiny_qwen):
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(HeadlensError, match="layer 5 is out of range"):
        scale_entropy_table(tiny_qwen, tokens, layers=[5], progress=False)
    with pytest.raises(HeadlensError, match="pos >= 2"):
        scale_entropy_table(tiny_qwen, tokens[:, :1], progress=False)
    with pytest.raises(HeadlensError, match=r"must lie in 0\.001\.\.1000"):
        scale_settings(8.0, temperatures=(0.0,))
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10, attn_only=True, act_fn="relu"
    )
    with pytest.raises(HeadlensError, match="rotary"):
        scale_entropy_table(HookedTransformer(cfg), tokens, progress=False)


def test_gaussian_scaled_entropy_does_not_depend_on_d_k():
    """Seed 003's claim: with 1/sqrt(d_k) the entropy stays put as d_k grows; without it, it collapses."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for d in (8, 512):
        q, k = torch.randn(200, 20, 1, d, generator=g), torch.randn(200, 20, 1, d, generator=g)
        out[d] = entropy_by_scale(q, k, {"unscaled": 1.0, "scaled": d**-0.5}, mask=attention_mask(20, "full"))
    assert abs(out[8]["scaled"].item() - out[512]["scaled"].item()) < 0.05
    assert 2.4 < out[512]["scaled"].item() < math.log(20)
    assert out[512]["unscaled"].item() < 0.25 < 1.2 < out[8]["unscaled"].item()


# ---------------------------------------------------------------- similarity


def test_pattern_similarity_planted_heads():
    n = 8
    p = prev_and_first(n)
    cos = pattern_similarity(p)
    torch.testing.assert_close(cos, torch.tensor([[1.0, 2 / n], [2 / n, 1.0]]))
    no_sink = pattern_similarity(p, drop_keys=1)
    assert no_sink[0, 1].abs() < 1e-6
    same = pattern_similarity(torch.cat([p[:, :1], p[:, :1]], dim=1), metric="pearson")
    torch.testing.assert_close(same, torch.ones(2, 2))
    centered = pattern_similarity(torch.cat([p, mask_pattern(n, "causal")[None, None]], dim=1), metric="centered")
    assert centered[2, :2].abs().max() < 1e-6


def test_centered_similarity_of_random_heads_is_near_zero():
    g = torch.Generator().manual_seed(0)
    scores_ = torch.randn(4, 8, 20, 20, generator=g) * 2
    sim = pattern_similarity(softmax_pattern(scores_), metric="centered")
    assert abs(mean_offdiagonal(sim)) < 0.05
    assert mean_offdiagonal(pattern_similarity(softmax_pattern(scores_))) > 0.4


def test_head_similarity_streams_the_same_numbers(tiny_qwen, tiny_run):
    tokens, cache = tiny_run
    for drop in (0, 1):
        sims = head_similarity(tiny_qwen, tokens, drop_keys=drop, batch_size=2, progress=False)
        for metric, mats in sims.items():
            expected = torch.stack(
                [pattern_similarity(cache["pattern", layer], metric=metric, drop_keys=drop) for layer in range(2)]
            )
            torch.testing.assert_close(mats, expected, atol=1e-5, rtol=1e-5)


def test_similarity_errors():
    with pytest.raises(HeadlensError, match="unknown similarity metric"):
        pattern_similarity(prev_and_first(4), metric="dot")
    with pytest.raises(HeadlensError, match=r"\[batch, head, q, k\]"):
        pattern_similarity(torch.zeros(2, 4, 4))
    with pytest.raises(HeadlensError, match="no query-key pair"):
        pattern_similarity(prev_and_first(4), drop_keys=4)


def test_mean_offdiagonal():
    assert mean_offdiagonal(torch.ones(1, 1)) == 1.0
    sim = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    assert mean_offdiagonal(sim) == pytest.approx(0.4)


# ---------------------------------------------------------------- GQA group test


def planted_sim(groups, within=0.9, across=0.1):
    g = torch.tensor(groups)
    sim = torch.where(g[:, None] == g[None, :], within, across)
    return sim.fill_diagonal_(1.0)


def test_group_contrast_exact_p_value():
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    out = group_contrast(planted_sim(groups), groups)
    assert out["exact"] and out["n_permutations"] == 70
    assert out["within"] == pytest.approx(0.9) and out["across"] == pytest.approx(0.1)
    assert out["p_value"] == pytest.approx(2 / 70)
    flat = group_contrast(torch.ones(8, 8), groups)
    assert flat["difference"] == pytest.approx(0) and flat["p_value"] == 1.0


def test_group_contrast_random_permutations_are_seeded():
    groups = [0] * 7 + [1] * 7
    sim = planted_sim(groups, 0.3, 0.25)
    a = group_contrast(sim, groups, n_permutations=500, seed=3)
    b = group_contrast(sim, groups, n_permutations=500, seed=3)
    assert not a["exact"] and a["p_value"] == b["p_value"] and a["n_permutations"] == 501
    exact = group_contrast(sim, groups)
    assert exact["n_permutations"] == 3432 and exact["p_value"] == pytest.approx(2 / 3432)
    assert a["p_value"] < 0.02


def test_group_contrast_errors():
    with pytest.raises(HeadlensError, match="3 group labels for 4 heads"):
        group_contrast(torch.eye(4), [0, 0, 1])
    with pytest.raises(HeadlensError, match="two groups"):
        group_contrast(torch.eye(4), [0, 0, 0, 0])


# ---------------------------------------------------------------- identical-token attention


def test_token_match_hand_pattern():
    tokens = torch.tensor([[5, 6, 5, 7]])
    pattern = mask_pattern(4, "causal").clone()[None, None].repeat(1, 2, 1, 1)
    pattern[0, 1, 2] = torch.tensor([1.0, 0, 0, 0])
    out = token_match(pattern, tokens)
    torch.testing.assert_close(out, torch.tensor([0.0, 1 - 1 / 3]))
    with pytest.raises(HeadlensError, match="no token repeats"):
        token_match(pattern, torch.tensor([[1, 2, 3, 4]]))
    with pytest.raises(HeadlensError, match="token_match needs"):
        token_match(pattern, torch.tensor([[1, 2, 3]]))


# ---------------------------------------------------------------- real Qwen


@pytest.mark.slow
def test_qwen_entropy_and_similarity_parity(qwen):
    from transformer_lens import utils

    tokens = qwen.to_tokens(
        "The river ran low that summer, and the children walked along its stony bed looking for shells.",
        prepend_bos=False,
    )
    df = scale_entropy_table(qwen, tokens, layers=[1], progress=False)
    _, cache = qwen.run_with_cache(tokens, names_filter=utils.get_act_name("pattern", 1), stop_at_layer=2)
    pattern = cache["pattern", 1]
    got = df[df.setting == "T=1"].sort_values("head").entropy.to_numpy()
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), mean_entropy(pattern), atol=1e-4, rtol=1e-4)
    assert (df[df.setting == "unscaled"].entropy.to_numpy() < got).all()
    sims = head_similarity(qwen, tokens, layers=[1], metrics=("cosine",), progress=False)["cosine"][0]
    torch.testing.assert_close(sims, pattern_similarity(pattern), atol=1e-4, rtol=1e-4)
    assert sims.shape == (14, 14)


# ---------------------------------------------------------------- CLI


def test_cli_stats_writes_tables(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from headlens.cli import app

    result = CliRunner().invoke(
        app, ["stats", "-m", "tiny-qwen2", "--out", str(tmp_path), "--seq-len", "32", "--n-seqs", "2", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    entropy = pd.read_csv(tmp_path / "entropy.csv")
    assert len(entropy) == 2 * 4 * 4 and set(entropy.setting) == {"unscaled", "T=0.5", "T=1", "T=2"}
    similarity = pd.read_csv(tmp_path / "similarity.csv")
    assert len(similarity) == 2 * 2 and (similarity.n_permutations == 6).all()
    assert "unscaled" in result.output


def test_cli_stats_bad_temperatures(tmp_path):
    from typer.testing import CliRunner

    from headlens.cli import app

    for bad, message in (
        ("0,1", "--temperatures must be a comma list of positive numbers"),
        ("a,b", "--temperatures must be a comma list of positive numbers"),
        ("nan", "--temperatures must be a comma list of positive numbers"),
    ):
        result = CliRunner().invoke(
            app, ["stats", "--out", str(tmp_path), "--temperatures", bad], standalone_mode=False
        )
        assert isinstance(result.exception, HeadlensError) and message in str(result.exception)


def test_similarity_layers_and_tokens_are_checked(tiny_qwen, tiny_run):
    """head_similarity(layers=[-1]) was a KeyError deep in the hooks; a 1-d token tensor was cut into "sequences" of
    batch_size tokens; an id of -1 read the embedding table from its end."""
    tokens, _ = tiny_run
    with pytest.raises(HeadlensError, match="layer -1 is out of range: this model has layers 0..1"):
        head_similarity(tiny_qwen, tokens, layers=[-1], progress=False)
    with pytest.raises(HeadlensError, match=r"tokens must be \[batch, pos\]"):
        head_similarity(tiny_qwen, tokens[0], progress=False)
    with pytest.raises(HeadlensError, match="token id -1 is not in this model's vocabulary"):
        scale_entropy_table(tiny_qwen, torch.where(tokens == tokens[0, 0], -1, tokens), progress=False)

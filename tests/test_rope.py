import math

import numpy as np
import pytest
import torch
from transformer_lens import utils

from headlens import HeadlensError, distance_profile, rope_summary
from headlens.census.rope import constant_tokens, distance_profiles, distance_sums, excess_sums, uniform_profile
from headlens.heads import kv_heads
from headlens.models import tiny_model
from headlens.render.plots import plot_distance_curves, plot_distance_heatmap


def causal_softmax(scores):
    n = scores.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def plant_distance_head(model, layer: int, head: int, distance: int, norm: float = 30.0) -> None:
    """Make (layer, head) attend to the key ``distance`` back, by RoPE alignment of constant q and k.

    W_Q = W_K = 0 and b_Q = u, b_K = R(distance) u, so the score q . k = u . R(k + distance - q) u
    is largest exactly when q - k = distance, whatever the tokens.
    """
    attn = model.blocks[layer].attn
    d_head = model.cfg.d_head
    u = torch.full((d_head,), norm / math.sqrt(d_head))
    x = u.expand(1, distance + 1, 1, d_head).clone()
    rotated = attn.apply_rotary(x)[0, distance, 0]
    kv = kv_heads(model)[head]
    with torch.no_grad():
        attn.W_Q[head] = 0
        attn.b_Q[head] = u
        attn._W_K[kv] = 0
        attn._b_K[kv] = rotated


@pytest.fixture(scope="module")
def planted():
    model = tiny_model("qwen2", n_layers=2)
    plant_distance_head(model, 0, 0, 5)
    plant_distance_head(model, 1, 2, 3)
    return model


def test_distance_sums_match_naive_loop():
    gen = torch.Generator().manual_seed(0)
    pattern = causal_softmax(torch.randn(3, 2, 9, 9, generator=gen))
    sums, sq, counts = distance_sums(pattern)
    for d in range(9):
        diag = pattern.diagonal(offset=-d, dim1=-2, dim2=-1)  # [batch, head, 9 - d]
        torch.testing.assert_close(sums[:, d], diag.double().sum((0, 2)))
        torch.testing.assert_close(sq[:, d], (diag.double() ** 2).sum((0, 2)))
        assert counts[d] == 3 * (9 - d)


def test_uniform_profile_is_uniform_head():
    n = 12
    pattern = causal_softmax(torch.zeros(1, 1, n, n))
    sums, _, counts = distance_sums(pattern)
    torch.testing.assert_close(sums[0] / counts, uniform_profile(n))


def _profile_of(pattern):
    """A one-head distance profile DataFrame built from a hand-made pattern (what distance_profile would return)."""
    sums, _, counts = distance_sums(pattern)
    exc, n_exc = excess_sums(pattern)
    n = pattern.shape[-1]
    import pandas as pd

    return pd.DataFrame(
        {
            "layer": 0,
            "head": 0,
            "distance": range(n),
            "attention": (sums[0] / counts).numpy(),
            "n": counts.numpy().astype(int),
            "excess": (exc[0] / n_exc.clamp_min(1)).numpy(),
            "n_excess": n_exc.numpy().astype(int),
        }
    )


def test_uniform_and_sink_heads_are_not_positional():
    n = 40
    uniform = causal_softmax(torch.zeros(1, 1, n, n))
    sink = torch.zeros(1, 1, n, n)
    sink[..., 0] = 1.0
    for pattern in (uniform, sink):
        s = rope_summary(_profile_of(pattern)).iloc[0]
        assert s["positional_score"] == pytest.approx(0, abs=1e-6)
        assert math.isnan(s["peak_distance"]) and math.isnan(s["half_life"])
    # a head that splits 70 % sink / 30 % previous token is positional on its non-sink part
    mixed = 0.7 * sink + 0.3 * torch.eye(n).roll(-1, 1).tril()[None, None]
    mixed[..., 0, 0] = 1.0
    s = rope_summary(_profile_of(mixed)).iloc[0]
    assert s["peak_distance"] == 1 and 0.25 < s["positional_score"] < 0.3


def test_excess_sums_match_naive_loop():
    gen = torch.Generator().manual_seed(1)
    pattern = causal_softmax(torch.randn(2, 3, 7, 7, generator=gen)).double()
    exc, counts = excess_sums(pattern)
    for h in range(3):
        for d in range(6):
            want = sum(
                pattern[b, h, q, q - d] - (1 - pattern[b, h, q, 0]) / q for b in range(2) for q in range(d + 1, 7)
            )
            assert exc[h, d].item() == pytest.approx(float(want), abs=1e-12)
            assert counts[d] == 2 * (6 - d)


@pytest.mark.slow
def test_random_and_constant_pools_exclude_control_and_placeholder_ids(qwen):
    from headlens.census.rope import _usable_ids

    ids = set(_usable_ids(qwen).tolist())
    tok = qwen.tokenizer
    assert not ids & set(tok.added_tokens_decoder) and not ids & set(tok.all_special_ids)
    assert (
        len(tok) == 151936 and max(ids) < 151643
    )  # Qwen: control tokens from 151643, [PAD...] placeholders from 151665
    assert len(ids) > 150_000


@pytest.mark.parametrize("probe", ["natural", "random", "constant"])
def test_planted_heads_peak_at_their_distance(planted, probe):
    prof = distance_profile(planted, probe, n_seqs=4, seq_len=48, progress=False)
    summary = rope_summary(prof).set_index(["layer", "head"])
    assert summary.loc[(0, 0), "peak_distance"] == 5
    assert summary.loc[(1, 2), "peak_distance"] == 3
    a = prof[(prof.layer == 0) & (prof["head"] == 0)].set_index("distance")["attention"]
    assert a[5] > 0.99 and a.drop(5).max() < 4 / 48  # the 5 queries that cannot reach distance 5 go elsewhere
    # queries 5..47 read d = 5 (43 of 47), minus what a uniform head would put there (sum_q 1/q ~ 2.1)
    assert summary.loc[(0, 0), "positional_score"] > 0.8
    assert summary.loc[(0, 0), "half_life"] == 1
    # attention rows sum to 1: sum_d n_d * attention_d equals the number of queries
    g = prof[(prof.layer == 1) & (prof["head"] == 1)]
    assert (g["n"] * g["attention"]).sum() == pytest.approx(4 * 48)
    assert summary.loc[(1, 1), "mean_distance"] == pytest.approx(
        (g["distance"] * g["n"] * g["attention"]).sum() / (4 * 48)
    )


def test_constant_probe_removes_content():
    """On a repeated token every position has the same pre-rotation q and k in every layer: only RoPE varies."""
    model = tiny_model("qwen2", n_layers=2)
    tokens = constant_tokens(model, n_seqs=2, seq_len=16)
    assert (tokens == tokens[:, :1]).all() and tokens[0, 0] != tokens[1, 0]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_q", "hook_k")))
    for layer in range(2):
        for name in ("q", "k"):
            act = cache[utils.get_act_name(name, layer)]
            torch.testing.assert_close(act, act[:, :1].expand_as(act), atol=1e-5, rtol=1e-5)


def test_content_head_is_less_positional_than_planted(planted):
    summary = rope_summary(distance_profile(planted, "natural", n_seqs=4, seq_len=48, progress=False)).set_index(
        ["layer", "head"]
    )
    assert summary.loc[(0, 0), "positional_score"] > summary.loc[(0, 2), "positional_score"]


def test_profiles_are_deterministic_and_stacked(planted):
    a = distance_profiles(planted, ("random", "constant"), n_seqs=2, seq_len=16, seed=3, progress=False)
    b = distance_profiles(planted, ("random", "constant"), n_seqs=2, seq_len=16, seed=3, progress=False)
    assert list(a.columns[:5]) == ["probe", "layer", "head", "kv_head", "distance"]
    assert a.equals(b) and set(a["probe"]) == {"random", "constant"} and len(a) == 2 * 2 * 4 * 16
    s = rope_summary(a)
    assert {"peak_distance", "half_life", "mean_distance", "positional_score"} <= set(s.columns) and len(s) == 16


def test_figures(planted):
    import matplotlib

    matplotlib.use("Agg")
    prof = distance_profiles(planted, ("natural", "constant"), n_seqs=2, seq_len=16, progress=False)
    fig = plot_distance_heatmap(prof, probe="constant", max_distance=8)
    assert len(fig.axes) == 2
    fig = plot_distance_curves(prof, [(0, 0), (1, 2)])
    assert len(fig.axes[0].lines) == 2
    with pytest.raises(HeadlensError, match="several probes"):
        plot_distance_heatmap(prof)
    with pytest.raises(HeadlensError, match="not in the profile"):
        plot_distance_curves(prof, [(5, 0)])


def test_bad_input_raises(planted):
    with pytest.raises(HeadlensError, match="unknown probe"):
        distance_profile(planted, "shuffled", progress=False)
    with pytest.raises(HeadlensError, match="exceeds the model's context"):
        distance_profile(planted, "random", seq_len=100_000, progress=False)
    with pytest.raises(HeadlensError, match="layer 7 is out of range"):
        distance_profile(planted, "random", layers=[7], progress=False)
    with pytest.raises(HeadlensError, match="at least 2 positions"):
        distance_profile(planted, torch.zeros(3, dtype=torch.long), progress=False)


@pytest.mark.slow
def test_qwen_profile_rows_sum_to_one(qwen):
    prof = distance_profile(qwen, "constant", n_seqs=2, seq_len=32, layers=[0, 23], progress=False)
    assert set(prof["layer"]) == {0, 23} and len(prof) == 2 * 14 * 32
    totals = prof.assign(mass=prof["n"] * prof["attention"]).groupby(["layer", "head"])["mass"].sum()
    np.testing.assert_allclose(totals.to_numpy(), 2 * 32, rtol=1e-4)


def test_layers_tokens_and_sizes_are_not_misread(planted, monkeypatch):
    """layers=[0.5] profiled layer 0; seq_len beside a token batch was silently ignored; a list of ids was an
    AttributeError; distance_profiles("natural") profiled the probes 'n', 'a', ... (one error on 'n')."""
    tokens = torch.randint(0, planted.cfg.d_vocab, (2, 6))
    with pytest.raises(HeadlensError, match="layers must be whole numbers"):
        distance_profile(planted, tokens, layers=[0.5], progress=False)
    with pytest.raises(HeadlensError, match="a probe name with n_seqs/seq_len/seed, or tokens, not both"):
        distance_profile(planted, tokens, seq_len=64, progress=False)
    with pytest.raises(HeadlensError, match="must be a tensor of integer token ids"):
        distance_profile(planted, tokens.tolist(), progress=False)
    one = distance_profiles(planted, "random", n_seqs=1, seq_len=4, progress=False)
    assert one["probe"].unique().tolist() == ["random"]

"""Scores against hand-made patterns with known answers, and the copying score against the explicit OV circuit."""

import math

import pytest
import scipy.stats
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from headlens import HeadlensError, tiny_model
from headlens.census import scores


def causal_uniform(n_seqs: int, heads: int, pos: int) -> torch.Tensor:
    mask = torch.ones(pos, pos).tril()
    return (mask / mask.sum(-1, keepdim=True)).expand(n_seqs, heads, pos, pos).clone()


def one_hot(targets: list[int], pos: int) -> torch.Tensor:
    """[1, 1, pos, pos] pattern: query q attends only to key targets[q]."""
    p = torch.zeros(1, 1, pos, pos)
    for q, k in enumerate(targets):
        assert k <= q
        p[0, 0, q, k] = 1.0
    return p


def heads(*patterns: torch.Tensor) -> torch.Tensor:
    return torch.cat(patterns, dim=1)


POS = 9
SELF = one_hot(list(range(POS)), POS)
PREV = one_hot([0] + list(range(POS - 1)), POS)
SINK = one_hot([0] * POS, POS)
UNIFORM = causal_uniform(1, 1, POS)
HARMONIC = sum(1 / (q + 1) for q in range(1, POS)) / (POS - 1)


def test_previous_and_first_token_on_known_patterns():
    pattern = heads(PREV, SELF, SINK, UNIFORM)
    assert scores.previous_token(pattern).tolist() == pytest.approx([1.0, 0.0, 1 / (POS - 1), HARMONIC])
    assert scores.first_token(pattern).tolist() == pytest.approx([1 / (POS - 1), 0.0, 1.0, HARMONIC])


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_duplicate_and_induction_read_the_right_pairs(prefix):
    n = 5
    pos = prefix + 2 * n
    dup = list(range(prefix + n)) + [prefix + i for i in range(n)]
    ind = list(range(prefix + n)) + [prefix + i + 1 for i in range(n)]
    half_dup = list(range(prefix + n)) + [prefix + i if i % 2 == 0 else prefix + n + i for i in range(n)]
    pattern = heads(one_hot(dup, pos), one_hot(ind, pos), one_hot(half_dup, pos), causal_uniform(1, 1, pos))
    uniform = sum(1 / (prefix + n + i + 1) for i in range(n)) / n
    assert scores.duplicate_token(pattern, n).tolist() == pytest.approx([1.0, 0.0, 3 / 5, uniform])
    assert scores.induction(pattern, n).tolist() == pytest.approx([0.0, 1.0, 0.0, uniform])


def test_repeated_scores_reject_bad_n():
    pattern = causal_uniform(1, 2, 10)
    with pytest.raises(HeadlensError, match="n >= 2"):
        scores.induction(pattern, 1)
    with pytest.raises(HeadlensError, match="longer than the sequence"):
        scores.duplicate_token(pattern, 6)
    with pytest.raises(HeadlensError, match=r"\[batch, head, q, k\]"):
        scores.previous_token(pattern[0])


def test_delimiter_is_excess_over_the_uniform_share():
    pos = 8
    is_delim = torch.tensor([[False, False, True, False, False, True, False, True]])
    count = is_delim.float().cumsum(-1)[0, 1:]  # delimiters among keys 1..q (key 0 is never counted)
    share = count / torch.arange(1, pos)  # a uniform head over the non-sink keys 1..q
    last_delim = [0, 0] + [max(k for k in range(q + 1) if is_delim[0, k]) for q in range(2, pos)]
    reader = one_hot(last_delim, pos)
    reader[0, 0, 1] = torch.tensor([0.5, 0.5] + [0.0] * (pos - 2))  # no delimiter yet: spread over both keys
    avoider = SINK[..., :pos, :pos]
    got = scores.delimiter(heads(reader, causal_uniform(1, 1, pos), avoider), is_delim)
    has = torch.tensor([float(is_delim[0, : q + 1].any()) for q in range(1, pos)])
    uniform = (count / torch.arange(2, pos + 1) - share).mean().item()  # uniform over keys 0..q: slightly below
    assert got.tolist() == pytest.approx([(has - share).mean().item(), uniform, -share.mean().item()], abs=1e-6)
    nonsink_uniform = scores.without_sink(causal_uniform(1, 1, pos))
    assert scores.delimiter(nonsink_uniform, is_delim).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(HeadlensError, match="is_delim"):
        scores.delimiter(reader, is_delim[:, :-1])


def test_local_window():
    pos = 9
    far = one_hot([0, 0, 0, 0, 0, 0, 1, 2, 3], pos)  # distance 6, 6, 6 or sink for early queries
    pattern = heads(SELF, PREV, far, UNIFORM)
    uniform = sum(4 / (q + 1) for q in range(4, pos)) / (pos - 4)
    assert scores.local(pattern, window=3).tolist() == pytest.approx([1.0, 1.0, 0.0, uniform])
    assert scores.local(pattern, window=0).tolist() == pytest.approx(
        [1.0, 0.0, 0.0, sum(1 / (q + 1) for q in range(1, pos)) / (pos - 1)]
    )
    with pytest.raises(HeadlensError, match="window"):
        scores.local(pattern, window=pos)


def test_entropy_matches_scipy_and_its_extremes():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, POS, POS).masked_fill(~torch.ones(POS, POS, dtype=torch.bool).tril(), -torch.inf)
    pattern = logits.softmax(-1)
    expected = torch.zeros(3)
    for h in range(3):
        vals = [
            scipy.stats.entropy(pattern[b, h, q, : q + 1].numpy()) / math.log(q + 1)
            for b in range(2)
            for q in range(1, POS)
        ]
        expected[h] = float(sum(vals) / len(vals))
    assert scores.entropy(pattern).tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert scores.entropy(heads(UNIFORM, SINK, PREV)).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)


def test_scores_average_over_batch():
    pattern = torch.cat([heads(PREV, SINK), heads(SINK, SINK)], dim=0)
    assert scores.previous_token(pattern).tolist() == pytest.approx([(1 + 1 / (POS - 1)) / 2, 1 / (POS - 1)])


def explicit_copying(model, layer: int, head: int) -> float:
    """Σλ/Σ|λ| of the explicit vocab x vocab circuit W_E W_V W_O W_U (fine for a small vocab)."""
    attn = model.blocks[layer].attn
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    w_v = attn._W_V[head // group].double()
    full = model.W_E.double() @ w_v @ attn.W_O[head].double() @ model.W_U.double()
    lam = torch.linalg.eigvals(full)
    return (lam.sum().real / lam.abs().sum()).item()


def small_vocab_gqa_model(seed: int = 0) -> HookedTransformer:
    """Random 2-layer GQA model (4 q heads, 2 kv heads, d_head 8) with a 96-token vocab, so the explicit circuit is cheap."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        d_vocab=96,
        n_ctx=32,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        d_mlp=64,
        seed=seed,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_copying_matches_the_explicit_ov_circuit_per_q_head():
    model = small_vocab_gqa_model()
    got = scores.copying(model)
    assert got.shape == (2, 4)
    for layer in range(2):
        for head in range(4):
            assert got[layer, head].item() == pytest.approx(explicit_copying(model, layer, head), abs=1e-5)
    assert len(set(got[0].tolist())) == 4  # heads sharing a kv head still get their own W_O
    assert got.abs().max() < 0.9  # random heads: neither pure copying nor pure suppression


def test_copying_planted_copy_and_suppress_heads():
    model = tiny_model("qwen2", seed=0)
    with torch.no_grad():
        model.W_U.copy_(model.W_E.T)
        attn = model.blocks[0].attn
        attn.W_O[0] = attn._W_V[0].T  # head 0 (kv 0): W_E W_V W_V^T W_E^T is positive semi-definite
        attn.W_O[2] = -attn._W_V[1].T  # head 2 (kv 1): negative semi-definite
    got = scores.copying(model)
    assert got[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert got[0, 2].item() == pytest.approx(-1.0, abs=1e-5)

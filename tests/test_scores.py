"""Scores against hand-made patterns with known answers (OV copying scores: tests/test_head_types.py)."""

import math

import pytest
import scipy.stats
import torch

from headlens import HeadlensError
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


def test_without_sink_renormalises_a_bfloat16_row_by_what_it_holds():
    """A bfloat16 pattern with a heavy sink (the audit: rows summed to up to 721 on tiny-qwen2 in bfloat16): each row
    i >= 1 sums to 1 over keys 1..i and keeps the ratios between those keys."""
    pos = 12
    logits = torch.randn(2, 3, pos, pos, generator=torch.Generator().manual_seed(0))
    logits[..., 0] += 7.0  # about 99.9 % of each row on key 0
    logits = logits.masked_fill(torch.ones(pos, pos).triu(1).bool(), float("-inf"))
    pattern = logits.to(torch.bfloat16).softmax(-1).float()
    assert (pattern[..., 1:, 0] > 0.9).all()
    out = scores.without_sink(pattern)
    assert out[..., 1:, :].sum(-1) == pytest.approx(torch.ones(2, 3, pos - 1), abs=1e-5)
    assert (out[..., 0] == 0).all()
    rest = pattern[..., 1:].clone()
    assert out[..., 1:] == pytest.approx((rest / rest.sum(-1, keepdim=True)).nan_to_num(), abs=1e-6)


def test_sink_corrected_scores_hold_in_bfloat16(tiny_qwen):
    """The census's sink-corrected scores of a model run in bfloat16 stay near float32's (before the fix L0H1's
    previous_token_nosink on tiny-qwen2 was 0.248 in bfloat16 against 0.038)."""
    import copy

    from headlens.census.run import run_census
    from headlens.data.probes import default_probes

    bf16 = copy.deepcopy(tiny_qwen)
    bf16.to(torch.bfloat16, print_details=False)
    probes = default_probes(tiny_qwen, seed=0)  # at 4 x 32 tokens no row has a heavy enough sink
    ref, low = (run_census(m, probes, progress=False, n_boot=0).table for m in (tiny_qwen, bf16))
    cols = [c for c in ref.columns if c.endswith("_nosink")]
    assert cols
    for c in cols:
        assert low[c].to_numpy() == pytest.approx(ref[c].to_numpy(), abs=0.01, nan_ok=True), c


def test_streamed_mean_over_defined_sequences_is_the_census_mean_head_by_head():
    """add_defined (the streamed mean of code_scores and copy_suppression_scores) leaves out each head's undefined
    sequences as the census's per-sequence mean does (``run._mean_defined``), head by head; a head no sequence scores is
    NaN. It used to read head 0's NaN for every head: a head defined where head 0 was not lost that sequence, and one
    undefined where head 0 was defined made its mean NaN."""
    import numpy as np

    from headlens.census.run import _mean_defined

    gen = torch.Generator().manual_seed(0)
    per_seq = torch.rand(6, 2, 4, generator=gen, dtype=torch.float64)  # sequence, layer, head
    per_seq[torch.rand(6, 2, 4, generator=gen) < 0.3] = float("nan")
    per_seq[:, 1, 3] = float("nan")  # L1H3: no sequence defines it
    sums, counts = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    for rows in (slice(0, 4), slice(4, 6)):  # streamed in two batches
        for layer in range(2):
            scores.add_defined(sums, counts, layer, per_seq[rows, layer])
    expected = _mean_defined(per_seq.numpy())
    head0 = per_seq[:, :, :1].isnan()
    assert (head0 & ~per_seq.isnan()).any() and (~head0 & per_seq.isnan()).any()  # both ways head 0 misled it
    np.testing.assert_allclose((sums / counts).numpy(), expected, rtol=1e-12, equal_nan=True)
    assert np.isnan(expected[1, 3]) and np.isfinite(np.delete(expected.ravel(), 7)).all()

"""Ground truth for the new head types: hand-set heads in a tiny Qwen and hand-made patterns."""

import math

import numpy as np
import pytest
import torch

from headlens.census.code_heads import bracket_by_depth, bracket_matching, closer_to_opener, code_scores, identifier
from headlens.census.ov import (
    attention_to_predicted,
    copying_scores,
    negative_copying,
    own_rank_share,
    predicted_mask,
    successor_share,
)
from headlens.census.positional import positional_overlap, positional_scores
from headlens.data.code import MIN_GAP, REGION, code_probe
from headlens.heads import kv_heads
from headlens.models import tiny_model


def causal_softmax(scores):
    n = scores.shape[-1]
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


# ---------------------------------------------------------------- positional


def plant_distance_head(model, layer, head, distance, norm=30.0):
    """(layer, head) attends to the key ``distance`` back whatever the tokens (RoPE alignment of constant q and k)."""
    attn = model.blocks[layer].attn
    u = torch.full((model.cfg.d_head,), norm / math.sqrt(model.cfg.d_head))
    rotated = attn.apply_rotary(u.expand(1, distance + 1, 1, -1).clone())[0, distance, 0]
    with torch.no_grad():
        attn.W_Q[head] = 0
        attn.b_Q[head] = u
        attn._W_K[kv_heads(model)[head]] = 0
        attn._b_K[kv_heads(model)[head]] = rotated


def test_planted_positional_head_is_found_with_its_offset(one_thread):
    model = tiny_model("qwen2", n_layers=2)
    plant_distance_head(model, 1, 2, 4)
    with torch.no_grad():  # a uniform head (q = k = 0) must not score positional
        model.blocks[0].attn.W_Q[0] = 0
        model.blocks[0].attn.b_Q[0] = 0
    table = positional_scores(model, n_seqs=3, seq_len=48).set_index(["layer", "head"])
    assert table.loc[(1, 2), "positional"] > 0.75 and table.loc[(1, 2), "positional_offset"] == 4
    assert table.loc[(0, 0), "positional"] < 0.02
    assert table.drop((1, 2))["positional"].max() < 0.3


def test_positional_overlap_needs_both_probes():
    n = torch.tensor([10.0, 9, 8, 7])
    nat = torch.tensor([0.0, 0.9, -0.1, 0.0])
    assert positional_overlap(nat, nat, n) == (pytest.approx(0.81), 1)
    # a content head that looks positional on constant tokens only (different offset) scores 0
    assert positional_overlap(nat, torch.tensor([0.0, -0.05, 0.9, 0.0]), n) == (0.0, -1)


# ---------------------------------------------------------------- copy suppression


def plant_copy_heads(model):
    """Layer 1 heads 0 and 1 (one kv head) copy (+) / suppress (-) the token they attend to, through tied unembedding."""
    d, dh = model.cfg.d_model, model.cfg.d_head
    proj = torch.eye(d)[:, :dh] * 4.0
    with torch.no_grad():
        model.blocks[0].attn.W_O.zero_()
        model.blocks[0].mlp.W_out.zero_()
        model.unembed.W_U.copy_(model.embed.W_E.T)
        attn = model.blocks[1].attn
        attn._W_V[kv_heads(model)[0]] = proj
        attn._b_V.zero_()
        attn.W_O[0] = proj.T
        attn.W_O[1] = -proj.T


def test_planted_copy_and_suppress_heads_score_one_measurement(one_thread):
    model = tiny_model("qwen2", n_layers=2)
    plant_copy_heads(model)
    got = copying_scores(model, n=500)
    neg, copying = got["negative_copying"], got["copying"]
    assert neg[1, 1] > 0.9 and copying[1, 1] < -0.9  # the suppressing head ranks nearly every token at its bottom
    assert neg[1, 0] < 0.02 and copying[1, 0] > 0.9  # its copying twin ranks them at its top
    assert neg[0].max() == 0 and copying[0].abs().max() == 0  # layer 0 writes nothing
    assert torch.equal(negative_copying(model, n=500), neg)


def eigenvalue_share(model, layer: int, head: int) -> float:
    """The copying score the census read before (Olsson et al.): sum/abs-sum of the eigenvalues of W_E W_V W_O W_U."""
    attn = model.blocks[layer].attn
    with torch.no_grad():
        w_v = attn._W_V[kv_heads(model)[head]].double()
        lam = torch.linalg.eigvals(attn.W_O[head].double() @ model.W_U.double() @ model.W_E.double() @ w_v)
    return float(lam.sum().real / lam.abs().sum())


def test_copying_and_negative_copying_agree_where_the_eigenvalue_share_did_not(one_thread):
    """Block 0 writes minus 50x each token's own embedding (first d_head dims), as a head past block 0 may see it: a
    layer-1 head with OV +P P^T then has all-positive eigenvalues on the raw embedding (the old ``copying`` said it
    copies) but pushes down the token it reads. Qwen's L23H2 was such a head (eigenvalue share 0.83, negative
    copying 0.96). The one measurement now says suppression in both columns; the -P P^T head is its mirror."""
    model = tiny_model("qwen2", n_layers=2)
    plant_copy_heads(model)
    d, dh = model.cfg.d_model, model.cfg.d_head
    proj = torch.eye(d)[:, :dh]
    with torch.no_grad():
        block = model.blocks[0]
        block.mlp.b_out.zero_()
        block.attn.b_O.zero_()
        block.attn._W_V[0] = proj
        block.attn.W_O[0] = -10.0 * proj.T  # input is RMS-normalised (rms ~ 0.2): about -50 e in those dims
    assert eigenvalue_share(model, 1, 0) > 0.99 and eigenvalue_share(model, 1, 1) < -0.99
    got = copying_scores(model, n=500)
    assert got["negative_copying"][1, 0] > 0.9 and got["copying"][1, 0] < -0.9
    assert got["negative_copying"][1, 1] < 0.02 and got["copying"][1, 1] > 0.9


def test_own_rank_share_on_hand_made_logits():
    logits = torch.randn(2, 50, 50, generator=torch.Generator().manual_seed(0))
    logits[0].diagonal().fill_(-100)
    logits[1].diagonal().fill_(100)
    top, bottom = own_rank_share(logits, lowest=0.02)
    assert bottom.tolist() == [1.0, 0.0] and top.tolist() == [0.0, 1.0]


def test_attention_to_predicted_earlier_token():
    tokens = torch.tensor([[5, 7, 9, 7, 3]])
    predicted = torch.tensor([[1, 1, 7, 1, 9]])  # at q=2 the model predicts 7 (seen at k=1), at q=4 it predicts 9 (k=2)
    mask = predicted_mask(tokens, predicted)
    assert mask[0].nonzero().tolist() == [[2, 1], [4, 2]]
    pattern = torch.zeros(1, 2, 5, 5)
    pattern[0, 0, :, 0] = 1  # sink head
    pattern[0, 1, 2, 1] = pattern[0, 1, 4, 2] = 1  # attends to the predicted earlier token
    pattern[0, 1, [0, 1, 3], [0, 0, 0]] = 1
    assert attention_to_predicted(pattern, mask)[0].tolist() == [0.0, 1.0]


# ---------------------------------------------------------------- successor


def test_successor_share_counts_top1_successors():
    logits = torch.zeros(1, 4, 4)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 0] = 1  # rows 0, 1 rank their successor top; row 2 does not
    assert successor_share(logits, torch.tensor([1, 2, 3, -1])).item() == pytest.approx(2 / 3)


# ---------------------------------------------------------------- code heads


BRACKETS = {"(": ")", "[": "]", "{": "}"}


def bracket_ids(model, chars):
    """Every token whose text, spaces stripped, is one of ``chars`` (`(` and ` (` alike, as the probe counts them)."""
    pieces = model.tokenizer.batch_decode([[i] for i in range(model.cfg.d_vocab)])
    return [i for i, p in enumerate(pieces) if p.strip() in set(chars)]


def plant_bracket_head(model, head=0, scale=6.0, freq_index=3):
    """Layer-0 head: every token attends to opening brackets, the most recent one most (RoPE recency).

    Embedding dimension 0 marks openers and dimension 1 is set on every token; q reads dim 1 and k dim 0 into one
    rotary pair of low frequency, so q . k = scale^2 * |x|^2 cos(theta * distance) falls with distance over the
    window. Before a closer it finds that closer's opener exactly when it is the most recent opener — not when a
    nested pair opened (and closed) in between.
    """
    openers = bracket_ids(model, BRACKETS)
    attn = model.blocks[0].attn
    with torch.no_grad():
        model.embed.W_E[:, :2] = 0
        model.embed.W_E[openers, 0] = 8.0
        model.embed.W_E[:, 1] = 8.0
        attn.W_Q[head] = 0
        attn.b_Q[head] = 0
        attn.W_Q[head][1, freq_index] = scale
        kv = kv_heads(model)[head]
        attn._W_K[kv] = 0
        attn._b_K[kv] = 0
        attn._W_K[kv][0, freq_index] = scale


def latest_opener_share(probe, model):
    """Share of scored positions (the token before a closer) whose closer's opener region (``REGION`` tokens either side)
    holds the latest opening bracket up to them (what the planted head reads)."""
    opener_ids = set(bracket_ids(model, BRACKETS))
    hit = total = 0
    for b in range(probe.n_seqs):
        toks = probe.tokens[b].tolist()
        for q in (probe.opener[b] >= 0).nonzero()[:, 0].tolist():
            latest = max(k for k in range(q + 1) if toks[k] in opener_ids)
            hit += abs(latest - int(probe.opener[b, q])) <= REGION
            total += 1
    return hit / total


def test_planted_bracket_head_scores_what_it_matches(one_thread):
    model = tiny_model("qwen2", n_layers=1)
    plant_bracket_head(model)
    probe = code_probe(model, seq_len=64, n_seqs=12, min_pairs=3)
    assert (probe.depth[probe.opener >= 0] >= 2).any()  # the probe holds nested pairs
    table = code_scores(model, probe).set_index(["layer", "head"])
    want = latest_opener_share(probe, model)
    assert 0.3 < want < 1.0
    assert table.loc[(0, 0), "bracket_matching"] == pytest.approx(want, abs=0.08)
    assert table.drop((0, 0))["bracket_matching"].max() < 0.2
    by_depth, counts = bracket_by_depth(model, [(0, 0)], probe)  # the same score, split by nesting depth
    assert sum(counts.values()) == int((probe.opener >= 0).sum())
    pooled = sum(by_depth[d][0] * counts[d] for d in counts) / sum(counts.values())
    assert pooled == pytest.approx(want, abs=0.1)


def own_opener_expected(probe, model):
    """What a head that reads only the most recent opener scores as closer_to_opener: at each scored closer, 1 when
    that opener is the closer's own, else minus 1 / (other openers before the closer)."""
    values = []
    for b in range(probe.n_seqs):
        openers = probe.is_opener[b].nonzero()[:, 0].tolist()
        for q in (probe.opener[b] >= 0).nonzero()[:, 0].tolist():
            c, own = q + 1, int(probe.opener[b, q])
            before = [k for k in openers if k < c]
            latest = max(before)
            values.append(1.0 if latest == own else -1.0 / max(len(before) - 1, 1))
    return sum(values) / len(values)


def test_planted_closer_head_scores_its_ground_truth(one_thread):
    """The recency head of the bracket test, read at the closers: it scores exactly the closers whose own opener is the
    most recent one (nested pairs in between count against it), and every other head scores near 0."""
    model = tiny_model("qwen2", n_layers=1)
    plant_bracket_head(model)
    probe = code_probe(model, seq_len=64, n_seqs=12, min_pairs=3)
    want = own_opener_expected(probe, model)
    assert 0.3 < want < 0.95
    table = code_scores(model, probe).set_index(["layer", "head"])
    assert table.loc[(0, 0), "closer_to_opener"] == pytest.approx(want, abs=0.05)
    assert table.drop((0, 0))["closer_to_opener"].abs().max() < 0.1
    opener_ids = set(bracket_ids(model, BRACKETS))
    for b in range(probe.n_seqs):  # is_opener marks opening brackets that are their own token
        assert all(int(probe.tokens[b, k]) in opener_ids for k in probe.is_opener[b].nonzero()[:, 0].tolist())


def test_a_window_without_a_use_is_left_out_of_the_census_identifier(one_thread):
    """identifier is "mean over uses": a code window with no re-used name has no score, so the census averages over
    the windows that have one, as the head-type study does (it used to count such windows as 0)."""
    from headlens.census.run import run_census
    from headlens.data.probes import ProbeSet

    model = tiny_model("qwen2", n_layers=2)
    probe = code_probe(model, seq_len=64, n_seqs=12, min_pairs=3)
    has_use = probe.ident.any(-1).any(-1)
    assert 0 < int(has_use.sum()) < probe.n_seqs  # some windows without a use, so the old mean would differ
    census = run_census(model, ProbeSet(code=probe), progress=False, n_boot=20).table.set_index(["layer", "head"])
    study = code_scores(model, probe).set_index(["layer", "head"])
    assert census["identifier"].to_numpy() == pytest.approx(study["identifier"].to_numpy(), abs=1e-5)
    assert census["identifier"].abs().max() > 1e-3  # not 0 everywhere: a mean over all windows would be smaller
    assert census[["identifier_lo", "identifier_hi"]].notna().all().all()
    assert (census["identifier_lo"] <= census["identifier"] + 1e-6).all()


def test_census_means_leave_out_sequences_without_a_score():
    from headlens.census.registry import head_types
    from headlens.census.run import PerSequence, build_table, label_thresholds

    model = tiny_model("qwen2", n_layers=1)
    n = model.cfg.n_layers * model.cfg.n_heads
    ident = np.tile(np.array([[0.8], [np.nan], [0.6]]), (1, n))
    ident[:, 1] = np.nan  # a head no window scores stays undefined
    bracket = np.tile(np.array([[0.1], [0.2], [0.3]]), (1, n))
    per_seq = PerSequence({"code": {"identifier": ident, "bracket_matching": bracket, "_sink": np.zeros((3, n))}}, {})
    types = head_types()
    table, _ = build_table(model, per_seq, types, label_thresholds(types, None), n_boot=0)
    assert table["identifier"].iloc[0] == pytest.approx(0.7)  # (0.8 + 0.6) / 2, not (0.8 + 0 + 0.6) / 3
    assert np.isnan(table["identifier"].iloc[1])
    assert table["bracket_matching"].iloc[0] == pytest.approx(0.2)


def test_closer_to_opener_on_a_hand_made_pattern():
    opener = torch.tensor([[-1, -1, -1, -1, 1, -1]])  # position 4 predicts the closer at 5, whose opener is 1
    is_opener = torch.tensor([[False, True, False, True, False, False]])  # another opener at 3
    pattern = causal_softmax(torch.zeros(1, 3, 6, 6))
    pattern[0, 1, 5] = torch.tensor([0.0, 0.7, 0.0, 0.1, 0.0, 0.2])  # own opener, a little on the other
    pattern[0, 2, 5] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # only the other opener
    got = closer_to_opener(pattern, opener, is_opener)[0]
    assert got.tolist() == pytest.approx([1 / 6 - 1 / 6, 0.6, -1.0])


def test_code_probe_marks_real_brackets_and_names(tiny_qwen):
    probe = code_probe(tiny_qwen, seq_len=64, n_seqs=6, min_pairs=3)
    tok = tiny_qwen.tokenizer
    for b in range(probe.n_seqs):
        toks = probe.tokens[b].tolist()
        for q in (probe.opener[b] >= 0).nonzero()[:, 0].tolist():  # q: the token before the closer
            o = int(probe.opener[b, q])
            assert BRACKETS[tok.decode([toks[o]]).strip()] == tok.decode([toks[q + 1]]).strip() and q - o >= MIN_GAP
        closers = probe.closer[b].nonzero()[:, 0].tolist()  # every closer that starts its token, merged ones too
        assert set((probe.opener[b] >= 0).nonzero()[:, 0].tolist()) <= set(closers)
        assert all(tok.decode([toks[q + 1]]).lstrip()[0] in ")]}" for q in closers)
        for q, k in probe.ident[b].nonzero().tolist():
            assert k < q and tok.decode([toks[k]]).strip() and tok.decode([toks[q]]).strip().isidentifier()
    assert probe.tokens.equal(code_probe(tiny_qwen, seq_len=64, n_seqs=6, min_pairs=3).tokens)  # seeded


def test_bracket_and_identifier_scores_on_hand_made_patterns():
    pattern = causal_softmax(torch.zeros(1, 2, 6, 6))
    opener = torch.tensor([[-1, -1, -1, 1, -1, 0]])
    pattern[0, 1] = 0
    pattern[0, 1, torch.arange(6), torch.tensor([0, 1, 2, 1, 4, 0])] = 1
    got = bracket_matching(pattern, opener)[0]  # region: keys opener - 1 .. opener + 1 (none before key 0)
    assert got[1] == 1 and got[0] == pytest.approx((3 / 4 + 2 / 6) / 2)
    ident = torch.zeros(1, 6, 6, dtype=torch.bool)
    ident[0, 4, [1, 2]] = True
    assert identifier(pattern, ident)[0].tolist() == pytest.approx([2 / 5, 0.0])


# ---------------------------------------------------------------- retrieval


def test_needle_probe_layout(tiny_qwen):
    from headlens.census.retrieval import needle_probe

    probe = needle_probe(tiny_qwen, seq_len=256, n_seqs=2, n_words=5)
    assert probe.tokens.shape == (2, 256)
    for b in range(2):
        needle = probe.tokens[b, probe.needle_pos[b]]
        assert needle.equal(probe.tokens[b, probe.answer_pos[b]]) and len(set(needle.tolist())) == 5
        assert (probe.tokens[b, : probe.needle_pos[b, 0]] != needle[0]).all()  # the needle word is not in the haystack


def test_retrieval_score_on_hand_made_pattern_and_model(tiny_qwen, one_thread):
    import dataclasses

    from headlens.census.retrieval import needle_probe, retrieval_scores, retrieval_seq, with_predictions
    from headlens.engine.capture import stream_patterns

    probe = needle_probe(tiny_qwen, seq_len=96, n_seqs=2, n_words=4)
    probe = dataclasses.replace(probe, correct=torch.tensor([[True, True, False, True], [True, True, True, True]]))
    pattern = causal_softmax(torch.zeros(2, 2, 96, 96))
    for b in range(2):
        for i in range(4):
            q, k = int(probe.answer_pos[b, i]) - 1, int(probe.needle_pos[b, i])
            pattern[b, 1, q] = 0
            pattern[b, 1, q, k] = 1  # head 1 copies every needle word
    got = retrieval_seq(pattern, probe, slice(0, 2))
    assert got[:, 0].tolist() == [0, 0] and got[:, 1].tolist() == [0.75, 1.0]  # step 3 of sequence 0: model wrong
    # the streaming score agrees with the one-forward score of retrieval_scores on the tiny model
    probe = with_predictions(tiny_qwen, needle_probe(tiny_qwen, seq_len=96, n_seqs=2, n_words=4))
    sums = torch.zeros(tiny_qwen.cfg.n_layers, tiny_qwen.cfg.n_heads)
    stream_patterns(tiny_qwen, probe.tokens, lambda l, p, rows: sums[l].add_(retrieval_seq(p, probe, rows).sum(0)))
    table = retrieval_scores(tiny_qwen, probe)
    torch.testing.assert_close(torch.tensor(table["retrieval"].to_numpy()).float(), (sums / 2).flatten())


# ---------------------------------------------------------------- a user's own type, end to end


def test_a_user_type_reaches_census_labels_report_and_compare(tmp_path, one_thread):
    from headlens.analysis.compare import compare_models
    from headlens.census.registry import HeadType, register, unregister
    from headlens.census.run import run_census
    from headlens.data.probes import default_probes
    from headlens.render.report import write_report

    # --- what a user writes (<= 10 lines): a score over (pattern, probe, rows) and one register call
    def late_sink(pattern, probe, rows):  # [batch, head, q, k] -> [batch, head]: last 8 queries on position 0
        return pattern[..., -8:, 0].mean(-1)

    register(HeadType("late_sink", "natural", late_sink, threshold=0.02, tier=0, description="late queries sink"))
    # ---
    try:
        model = tiny_model("qwen2", n_layers=2)
        probes = default_probes(model, n_seqs=2, seq_len=32)
        table = run_census(model, probes, progress=False, n_boot=10).table
        assert "late_sink" in table.columns and (table["label"] == "late_sink").any()
        assert (table.loc[table.label == "late_sink", "late_sink"] >= 0.02).all()
        html = write_report(tmp_path / "r", model=model, census=table, figures=False, progress=False).read_text()
        assert "late_sink" in html and "late queries sink" in html
        tuned = tiny_model("qwen2", n_layers=2)
        with torch.no_grad():
            tuned.blocks[1].attn.W_Q.mul_(3.0)
        diff = compare_models(model, tuned, probes, progress=False)
        assert "d_late_sink" in diff.columns and "late_sink" in set(diff.label_base) | set(diff.label_tuned)
        assert diff.loc[diff.layer == 0, "d_late_sink"].abs().max() == 0  # layer 0 unchanged
    finally:
        unregister("late_sink")

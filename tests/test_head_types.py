"""Ground truth for the new head types: hand-set heads in a tiny Qwen and hand-made patterns."""

import math

import pytest
import torch

from headlens.census.code_heads import bracket_by_depth, bracket_matching, code_scores, identifier
from headlens.census.ov import attention_to_predicted, negative_copying, own_rank_share, predicted_mask, successor_share
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


def test_planted_negative_copying_head(one_thread):
    model = tiny_model("qwen2", n_layers=2)
    plant_copy_heads(model)
    neg = negative_copying(model, n=500)
    assert neg[1, 1] > 0.9  # the suppressing head ranks nearly every token at the bottom of its own output
    assert neg[1, 0] < 0.02  # its copying twin never does
    assert neg[0].max() == 0  # layer 0 writes nothing


def test_own_rank_share_on_hand_made_logits():
    logits = torch.randn(2, 50, 50, generator=torch.Generator().manual_seed(0))
    logits[0].diagonal().fill_(-100)
    logits[1].diagonal().fill_(100)
    share = own_rank_share(logits, lowest=0.02)
    assert share.tolist() == [1.0, 0.0]


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

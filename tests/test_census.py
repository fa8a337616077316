"""Head census: hand-planted heads are labelled exactly, TransformerLens parity, determinism, bad input, real Qwen."""

import math
import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import utils
from transformer_lens.head_detector import detect_head

from headlens import HeadlensError, run_census, tiny_model
from headlens.census import scores
from headlens.census.registry import HeadType, register, unregister
from headlens.census.run import COLUMNS, LABELS, THRESHOLDS, CensusResult, label_heads
from headlens.data.probes import ProbeSet, default_probes, delimiter_mask, natural_text, repeated_tokens
from headlens.heads import kv_heads

EXPECTED = {
    (0, 0): "previous_token",  # real weights: constant q/k biases, RoPE phase peaked at distance 1
    (0, 1): "other",  # real weights: zero query, so exactly uniform causal attention (what an untrained head does)
    (0, 2): "delimiter",  # real weights: keys read a delimiter flag planted in the embeddings
    (0, 3): "local",  # real weights: RoPE phase peaked at distance 0 (attends to itself)
    (1, 0): "first_token",  # planted scores (hook): all attention on position 0
    (1, 1): "duplicate_token",  # planted scores (hook): earlier copies of the same token
    (1, 2): "induction",  # planted scores (hook): the token after an earlier copy of the current token
    (1, 3): "positional",  # real weights: RoPE phase peaked at distance 6 (positional head, offset 6)
}


def _positional(
    n_pairs: int, distance: int, amplitude: float, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) biases whose RoPE score a * sum_i cos(theta_i (d - distance)) peaks at relative distance ``distance``."""
    d_head = 2 * len(theta)
    q, k = torch.zeros(d_head), torch.zeros(d_head)
    root = math.sqrt(amplitude)
    for i in range(n_pairs):
        q[i], q[i + d_head // 2] = root * math.cos(theta[i] * distance), -root * math.sin(theta[i] * distance)
        k[i] = root
    return q, k


def planted_model():
    """tiny Qwen2 (2 layers x 4 heads, 2 kv heads, d_head 16) with the heads of ``EXPECTED`` set by hand."""
    model = tiny_model("qwen2", seed=0)
    cfg = model.cfg
    half = cfg.d_head // 2
    theta = cfg.rotary_base ** (-torch.arange(half, dtype=torch.float64) / half)
    delim_vocab = delimiter_mask(model.tokenizer, torch.arange(cfg.d_vocab)[None])[0]
    with torch.no_grad():
        model.W_E[:, 0] = 0.0
        model.W_E[delim_vocab, 0] = 5.0 * model.W_E[delim_vocab].norm(dim=-1)
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        for attn in (a0, a1):
            attn.W_Q.zero_()
            attn.b_Q.zero_()
            attn._W_K.zero_()
            attn._b_K.zero_()
        # layer 0, kv 0 (heads 0, 1): positional keys; head 0 peaks at distance 1, head 1 has no query
        a0.b_Q[0], a0._b_K[0] = _positional(half, 1, 120.0, theta)
        # layer 0, kv 1 (heads 2, 3): key dim 7 (slowest rotation) = delimiter flag, dims 0-6 (+8) positional
        a0._W_K[1, 0, half - 1] = 1.0
        a0.b_Q[2, half - 1] = 25.0
        a0.b_Q[3], a0._b_K[1] = _positional(half - 1, 0, 120.0, theta)
        # layer 1, kv 1: head 3 peaks at distance 6 (head 2 is overwritten by a hook)
        a1.b_Q[3], a1._b_K[1] = _positional(half, 6, 120.0, theta)

    store = {}

    def keep_embed(embed, hook):
        store["embed"] = embed

    def plant(scores_, hook):
        emb = store["embed"]
        pos = emb.shape[1]
        causal = torch.ones(pos, pos, dtype=torch.bool, device=emb.device).tril()
        same = (emb[:, :, None, :] == emb[:, None, :, :]).all(-1) & causal.tril(-1)
        after = torch.zeros_like(same)
        after[:, :, 1:] = same[:, :, :-1]
        first = torch.zeros_like(same)
        first[:, :, 0] = True
        out = scores_.clone()
        for head, target in ((0, first), (1, same), (2, after)):
            out[:, head] = torch.where(causal, 30.0 * (target & causal).float(), -torch.inf)
        return out

    model.add_hook("hook_embed", keep_embed, is_permanent=True)
    model.add_hook(utils.get_act_name("attn_scores", 1), plant, is_permanent=True)
    return model


def plant_ov(model, layer: int, head: int, sign: int) -> None:
    """Tie the unembedding to the embedding, silence block 0's outputs (layer-0 patterns, and so every planted
    label, stay as they are) and give (layer, head) the OV circuit sign * P P^T (P: the first d_head dimensions): it
    raises (+1) or pushes down (-1) the token it reads."""
    d, dh = model.cfg.d_model, model.cfg.d_head
    proj = torch.eye(d)[:, :dh] * 4.0
    attn = model.blocks[layer].attn
    with torch.no_grad():
        for tensor in (
            model.blocks[0].attn.W_O,
            model.blocks[0].attn.b_O,
            model.blocks[0].mlp.W_out,
            model.blocks[0].mlp.b_out,
        ):
            tensor.zero_()
        model.unembed.W_U.copy_(model.embed.W_E.T)
        attn._W_V[kv_heads(model)[head]] = proj
        attn._b_V.zero_()
        attn.W_O[head] = sign * proj.T


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module")
def planted_result(planted):
    return run_census(planted, progress=False)


@pytest.fixture(scope="module")
def planted_table(planted_result):
    return planted_result.table


def test_planted_heads_are_labelled_exactly(planted_table):
    got = {(r.layer, r.head): r.label for r in planted_table.itertuples()}
    assert got == EXPECTED


def test_planted_scores_are_near_their_ideal(planted, planted_table):
    t = planted_table.set_index(["layer", "head"])
    assert t.loc[(0, 0), "previous_token"] > 0.99
    assert t.loc[(0, 1), "entropy"] == pytest.approx(1.0, abs=1e-5)
    assert t.loc[(0, 3), "local"] > 0.99
    assert t.loc[(1, 0), "first_token"] > 0.999
    assert t.loc[(1, 1), "duplicate_token"] > 0.999
    assert t.loc[(1, 2), "induction"] > 0.999
    # the delimiter head reads only delimiters: its excess is close to the largest possible, 1 - share
    probe = default_probes(planted, seed=0).delimiter
    d = probe.is_delim.float()
    d[:, 0] = 0.0  # key 0 never counts as a delimiter; the uniform baseline spreads over keys 1..i
    share = d.cumsum(-1)[:, 1:] / torch.arange(1, d.shape[-1])
    reads_any = d.cumsum(-1)[:, 1:] > 0
    best = ((1 - share) * reads_any - share * ~reads_any).mean().item()
    assert t.loc[(0, 2), "delimiter"] == pytest.approx(best, abs=0.02)
    assert best > THRESHOLDS["delimiter"]
    # the distance-6 head does none of the named things
    row = t.loc[(1, 3)]
    assert max(row["previous_token"], row["first_token"], row["local"], row["induction"]) < 0.1


def test_census_columns_kv_heads_and_labels(planted_table):
    assert tuple(planted_table.columns[: len(COLUMNS)]) == COLUMNS
    assert {"previous_token_nosink", "induction_nosink", "induction_lo", "induction_hi", "confidence"} <= set(
        planted_table
    )
    assert planted_table["kv_head"].tolist() == [0, 0, 1, 1] * 2
    assert set(planted_table["label"]) <= set(LABELS)
    assert planted_table[["layer", "head"]].values.tolist() == [[l, h] for l in range(2) for h in range(4)]


def test_thresholds_override_and_tie_rules(planted_table):
    relaxed = label_heads(planted_table, {"previous_token": 1.5})
    assert relaxed[0] == "local"  # the previous-token head fails its threshold and is local (tier 2)
    frame = pd.DataFrame(
        [
            {
                "previous_token": 0.7,
                "induction": 0.6,
                "duplicate_token": 0.9,
                "delimiter": 0.0,
                "first_token": 0.99,
                "local": 0.99,
                "entropy": 0.9,
                "copying": 0.5,
                "negative_copying": 0.0,
            }
        ]
    )
    # tier 1 wins over tier 2; inside tier 1 the largest score/threshold ratio wins (0.9/0.3 > 0.7/0.4)
    assert label_heads(frame) == ["duplicate_token"]
    frame["duplicate_token"] = 0.6  # exact tie with induction (both 0.6 / 0.3): the type registered first wins
    assert label_heads(frame) == ["duplicate_token"]
    frame["duplicate_token"] = 0.0
    assert label_heads(frame) == ["induction"]
    frame["negative_copying"] = 0.9  # prefix matching by a head that pushes down the token it reads: suppression
    frame["copying"] = -0.9  # (the same OV measurement, so copying says so too; the label reads negative_copying)
    assert label_heads(frame) == ["copy_suppression"]
    frame["negative_copying"] = float("nan")  # no copying evidence: neither
    assert label_heads(frame) == ["previous_token"]
    frame.loc[:, ["previous_token", "induction", "duplicate_token"]] = 0.0
    assert label_heads(frame) == ["first_token"]
    frame.loc[:, ["first_token", "local"]] = 0.0
    assert label_heads(frame) == ["other"]  # breadth alone is no label (an untrained head is broadest)
    frame["first_token"] = 0.3  # the sink threshold (Gu et al. 2024)
    assert label_heads(frame) == ["first_token"]
    with pytest.raises(HeadlensError, match="unknown threshold"):
        label_heads(frame, {"inductoin": 0.5})


def test_summary_lists_every_label(planted_result):
    s = planted_result.summary()
    assert s.set_index("label")["n_heads"].to_dict() == {label: 1 for label in EXPECTED.values()}
    assert s.set_index("label").loc["induction", "heads"] == "L1H2"
    assert (s.lo <= s.n_heads).all() and (s.n_heads <= s.hi).all()


def test_planted_heads_are_confident(planted_result):
    assert (planted_result.table["confidence"] >= 0.9).all()
    counts = planted_result.label_counts.set_index("label")
    assert (counts.lo == 1).all() and (counts.hi == 1).all()
    # a table read back from CSV still gives counts with intervals
    back = CensusResult.from_table(pd.DataFrame(planted_result.table)).label_counts
    assert set(back.label) == set(EXPECTED.values())
    assert (back.lo <= back.n_heads).all() and (back.n_heads == back.hi).all()


def test_planted_copy_suppression_head():
    """The planted induction head is copy_suppression when its OV circuit pushes down the token it reads, and
    induction when it raises it: one OV measurement (copying and negative_copying) decides, and both columns say
    the same."""
    model = planted_model()
    for sign, label in ((-1, "copy_suppression"), (+1, "induction")):
        plant_ov(model, 1, 2, sign)
        row = run_census(model, progress=False, n_boot=20).table.set_index(["layer", "head"]).loc[(1, 2)]
        assert row["label"] == label and row["induction"] > 0.99
        assert np.sign(row["copying"]) == sign and (row["negative_copying"] >= 0.5) == (sign < 0)


def sink_previous_model(sink: float = 0.7):
    """tiny Qwen2 whose L0H0 puts ``sink`` of every row on position 0 and the rest on i-1 (planted by hook)."""
    model = tiny_model("qwen2", seed=0)

    def plant(scores_, hook):
        pos = scores_.shape[-1]
        out = scores_.clone()
        target = torch.full((pos, pos), -torch.inf)
        target[:, 0] = math.log(sink)
        idx = torch.arange(1, pos)
        target[idx, idx - 1] = math.log(1 - sink)
        target[1, 0] = 0.0  # query 1: i-1 is the sink itself
        target[0, 0] = 0.0
        out[:, 0] = target.to(out)
        return out

    model.add_hook(utils.get_act_name("attn_scores", 0), plant, is_permanent=True)
    return model


def test_head_split_between_sink_and_previous_token_is_previous_token():
    table = run_census(sink_previous_model(0.7), progress=False, n_boot=50).table.set_index(["layer", "head"])
    row = table.loc[(0, 0)]
    assert row["first_token"] == pytest.approx(0.7, abs=0.01)
    assert row["previous_token"] < THRESHOLDS["previous_token"]  # raw score diluted by the sink
    assert row["previous_token_nosink"] > 0.99
    assert row["label"] == "previous_token" and row["confidence"] == 1.0
    # a head that is all sink stays first_token: no attention is left to read
    assert (
        run_census(sink_previous_model(0.99), progress=False, n_boot=0)
        .table.set_index(["layer", "head"])
        .loc[(0, 0), "label"]
        == "first_token"
    )


def test_custom_head_type_appears_in_table_and_labels(planted):
    def last_sink(pattern, probe, rows):  # a user's score: the last 8 queries' attention on position 0
        return pattern[..., -8:, 0].mean(-1)

    register(HeadType("last_sink", "natural", last_sink, threshold=0.9, tier=0, description="late queries sink"))
    try:
        table = run_census(planted, progress=False, n_boot=10).table
    finally:
        unregister("last_sink")
    assert (
        "last_sink" in table.columns and "last_sink" not in run_census(planted, progress=False, n_boot=0).table.columns
    )
    assert table.set_index(["layer", "head"]).loc[(1, 0), "label"] == "last_sink"  # the planted sink head, tier 0


def test_registry_rejects_bad_types():
    with pytest.raises(HeadlensError, match="already registered"):
        register(HeadType("induction", "repeated", lambda p, probe, rows: p[..., 0, 0], 0.3, 1, "dup"))
    with pytest.raises(HeadlensError, match="identifier"):
        register(HeadType("other", "natural", lambda p, probe, rows: p[..., 0, 0], 0.3, 1, "bad"))
    with pytest.raises(HeadlensError, match="no head type"):
        unregister("no_such_type")


@pytest.mark.parametrize("model_name", ["planted", "random"])
def test_agrees_with_transformer_lens_detect_head(model_name, planted):
    """Same query/key pairs as TL detect_head; TL divides by all attention (pos), we by the scored queries."""
    model = planted if model_name == "planted" else tiny_model("qwen2", seed=1)
    probe = repeated_tokens(model, n=20, n_seqs=3, prefix=1, seed=3)
    texts = probe.text(model.tokenizer)
    assert [model.to_tokens(t, prepend_bos=False)[0].tolist() for t in texts] == probe.tokens.tolist()
    pos, n = probe.seq_len, probe.n
    ours = {
        name: torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
        for name in ("previous_token", "duplicate_token", "induction")
    }
    with torch.no_grad():
        _, cache = model.run_with_cache(probe.tokens)
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer]
        ours["previous_token"][layer] = scores.previous_token(pattern) * (pos - 1) / pos
        ours["duplicate_token"][layer] = scores.duplicate_token(pattern, n) * n / pos
        ours["induction"][layer] = scores.induction(pattern, n) * n / pos
    for name, tl_name in [
        ("previous_token", "previous_token_head"),
        ("duplicate_token", "duplicate_token_head"),
        ("induction", "induction_head"),
    ]:
        theirs = detect_head(model, texts, tl_name)
        assert (ours[name] - theirs).abs().max().item() <= 0.01, name
        assert (ours[name] - theirs).abs().max().item() <= 1e-5, name
    if model_name == "planted":
        assert detect_head(model, texts, "induction_head")[1, 2] > 0.99 * n / pos


def test_same_seed_same_csv_bytes(tmp_path):
    model = tiny_model("qwen2", seed=2)
    first = run_census(model, seed=7, progress=False).table
    second = run_census(tiny_model("qwen2", seed=2), seed=7, progress=False).table
    first.to_csv(tmp_path / "a.csv", index=False)
    second.to_csv(tmp_path / "b.csv", index=False)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert not torch.equal(default_probes(model, seed=8).repeated.tokens, default_probes(model, seed=7).repeated.tokens)


def test_batch_size_does_not_change_the_scores(planted):
    probes = default_probes(planted, seed=0, n_seqs=3, n=16, seq_len=40)
    assert len(set(probes.repeated.n_per_seq.tolist())) > 1  # half-lengths vary
    a = run_census(planted, probes, batch_size=1, progress=False).table
    b = run_census(planted, probes, batch_size=8, progress=False).table
    pd.testing.assert_frame_equal(a, b, atol=2e-6, check_exact=False)


def test_missing_probe_kinds_leave_nan(planted):
    only = ProbeSet(repeated=repeated_tokens(planted, n=16, n_seqs=2))
    table = run_census(planted, only, progress=False).table
    assert table["previous_token"].isna().all() and table["delimiter"].isna().all()
    assert table.set_index(["layer", "head"]).loc[(1, 2), "label"] == "induction"


def test_bad_input_is_a_clear_error(planted):
    with pytest.raises(HeadlensError, match="longer than the model's context"):
        natural_text(planted, seq_len=planted.cfg.n_ctx + 1)
    with pytest.raises(HeadlensError, match="longer than the model's context"):
        repeated_tokens(planted, n=planted.cfg.n_ctx // 2 + 1)
    with pytest.raises(HeadlensError, match="empty"):
        natural_text(planted, text="")
    with pytest.raises(HeadlensError, match="n must be an integer >= 2"):
        repeated_tokens(planted, n=1)
    with pytest.raises(HeadlensError, match="ProbeSet"):
        run_census(planted, probes=torch.zeros(2, 5, dtype=torch.long), progress=False)
    fits = ProbeSet(natural=natural_text(planted, seq_len=64, n_seqs=1))
    n_ctx = planted.cfg.n_ctx
    too_long = ProbeSet(
        natural=type(fits.natural)(
            "natural", torch.zeros(1, n_ctx + 1, dtype=torch.long), torch.zeros(1, n_ctx + 1, dtype=torch.bool)
        )
    )
    with pytest.raises(HeadlensError, match="n_ctx"):
        run_census(planted, too_long, progress=False)
    with pytest.raises(HeadlensError, match="batch_size"):
        run_census(planted, fits, batch_size=0, progress=False)


def test_run_census_refuses_a_non_model_and_a_non_integer_seed(tiny_qwen, monkeypatch):
    class Reached(Exception):
        pass

    def collect(model, probes, *args, **kwargs):
        raise Reached(probes.seed)

    monkeypatch.setattr("headlens.census.run.collect", collect)
    for model in (None, "tiny-qwen2"):
        with pytest.raises(HeadlensError, match=r"model must be a loaded model \(headlens.load_model"):
            run_census(model, progress=False)
    for seed in (1.5, "0", True, -1, None):
        with pytest.raises(HeadlensError, match="seed must be an integer >= 0"):
            run_census(tiny_qwen, seed=seed, progress=False)
    with pytest.raises(Reached) as reached:  # numpy integers are integers
        run_census(tiny_qwen, seed=np.int64(3), progress=False)
    assert reached.value.args == (3,) and type(reached.value.args[0]) is int


def test_run_census_refuses_probe_sets_and_thresholds_it_would_misread(tiny_qwen, monkeypatch):
    """A probe keyed under another kind was a KeyError inside the executor, float token ids an IndexError in the
    embedding, a probe kind no head type reads was streamed and dropped, a list of thresholds an AttributeError."""
    monkeypatch.setattr(type(tiny_qwen), "forward", lambda *a, **k: pytest.fail("ran the model"))
    probe = repeated_tokens(tiny_qwen, n=4, n_seqs=2, seed=0)
    bad = {
        "holds a 'repeated' probe under 'natural'": ProbeSet(natural=probe),
        "repeated probe must be a tensor of integer token ids": ProbeSet(
            repeated=replace(probe, tokens=probe.tokens.float())
        ),
        "no registered head type reads a 'mine' probe": ProbeSet(mine=replace(probe, kind="mine")),
    }
    for message, probes in bad.items():
        with pytest.raises(HeadlensError, match=message):
            run_census(tiny_qwen, probes, progress=False)
    with pytest.raises(HeadlensError, match="thresholds must be a dict"):
        run_census(tiny_qwen, ProbeSet(repeated=probe), thresholds=[("induction", 0.4)], progress=False)


@pytest.fixture(scope="module")
def qwen_table(qwen):
    return run_census(qwen, default_probes(qwen, seed=0, n_seqs=4), progress=False).table  # small probes: CI time


@pytest.mark.slow
def test_real_qwen_has_induction_and_previous_token_heads(qwen_table):
    table = qwen_table
    assert len(table) == 24 * 14
    assert table["kv_head"].tolist() == [h // 7 for h in range(14)] * 24
    labels = table["label"].value_counts().to_dict()
    assert labels.get("induction", 0) >= 1
    assert labels.get("previous_token", 0) >= 1
    best = table.sort_values("induction", ascending=False).iloc[0]
    assert best["induction"] > 0.5 and best["layer"] > 0


@pytest.mark.slow
def test_ablating_census_induction_heads_hurts_repeats_more_than_random_heads(qwen, qwen_table):
    from headlens.interventions.ablation import compare_to_random, repeat_loss_metric

    induction_heads = [(int(r.layer), int(r.head)) for r in qwen_table.itertuples() if r.label == "induction"]
    assert induction_heads
    metric = repeat_loss_metric(qwen, n_seqs=4, half_len=32, seed=1)
    comparison = compare_to_random(qwen, metric, induction_heads, n_random=5, method="mean", seed=0, progress=False)
    result, target = comparison.table, comparison.target_effect
    ratio = target / max(abs(result.loc[result.kind == "random", "effect"].mean()), 1e-6)
    print(
        f"\n{len(induction_heads)} induction heads: repeated-half loss +{target:.3f} vs random heads "
        f"{result.loc[result.kind == 'random', 'effect'].round(3).tolist()} (ratio {ratio:.1f}x)"
    )
    assert comparison.p_random_ge == 0.0  # every random draw of as many heads hurts less
    assert target > 0 and ratio > 2


def test_weights_scores_are_stored_under_a_key_of_weights_tokenizer_and_code(tmp_path, monkeypatch):
    """The built-in weights scores are read back from the headlens cache for the same weights (the stored file is
    what is returned), recomputed after an in-place weight edit, and a damaged file is recomputed and replaced."""
    from headlens.census.registry import head_types
    from headlens.census.run import weights_scores

    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path))
    model = tiny_model("qwen2", seed=3)
    types = head_types()
    first = weights_scores(model, types)
    (stored,) = (tmp_path / "scores").glob("*.npz")
    assert set(first) == {n for n, t in types.items() if t.probe == "weights" and t.score is not None}
    with np.load(stored) as z:
        assert sorted(z.files) == sorted(first)
    marked = {n: np.full_like(v, 0.125) for n, v in first.items()}
    np.savez(stored, **marked)
    again = weights_scores(model, types)
    assert all(np.array_equal(again[n], marked[n]) for n in first)  # read from the file, not recomputed

    before = model.blocks[0].attn.W_O.detach().clone()
    with torch.no_grad():
        model.blocks[0].attn.W_O.add_(0.01)  # new weights: a new key, computed afresh
    edited = weights_scores(model, types)
    assert len(list((tmp_path / "scores").glob("*.npz"))) == 2
    assert not np.array_equal(edited["copying"], marked["copying"])
    with torch.no_grad():
        model.blocks[0].attn.W_O.copy_(before)
    stored.write_bytes(b"not an npz")
    assert all(np.allclose(weights_scores(model, types)[n], first[n], equal_nan=True) for n in first)
    with np.load(stored) as z:  # rewritten
        assert np.allclose(z["copying"], first["copying"])
    import headlens.census.run as run

    monkeypatch.setattr(run, "code_version", lambda: "0.0.0+other")  # other headlens code: a new key, not this file
    weights_scores(model, types)
    assert len(list((tmp_path / "scores").glob("*.npz"))) == 3


def test_a_full_cache_disk_costs_the_weights_scores_cache_only(tmp_path, monkeypatch):
    """The weights-scores file only saves time: a write that fails for lack of space (atomic_path says it as a
    HeadlensError) leaves no file and the census goes on, as with a read-only cache."""
    import errno

    from headlens.census.registry import head_types
    from headlens.census.run import weights_scores

    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path))
    model = tiny_model("qwen2", seed=3)
    expected = weights_scores(model, head_types())
    for stored in (tmp_path / "scores").glob("*"):
        stored.unlink()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    got = weights_scores(model, head_types())
    assert all(np.array_equal(got[n], expected[n], equal_nan=True) for n in expected)
    assert not list((tmp_path / "scores").iterdir())


def test_a_census_with_other_bootstrap_resamples_is_not_the_clis(tmp_path):
    """n_boot changes every interval: a census run with n_boot=3 and saved with its provenance is not reused where
    the CLI's default census (n_boot=200) is asked for (`headlens report`/`head` compare exactly this)."""
    from headlens import io
    from headlens.cli import _census_settings

    model = tiny_model("qwen2")
    few = run_census(model, n_boot=3, progress=False)
    io.write_csv(few.table, tmp_path / "census.csv", provenance=few.provenance)
    why = io.mismatch(tmp_path / "census.csv", io.provenance(model, **_census_settings(0)))
    assert why is not None and "settings" in why and '"n_boot": 3' in why

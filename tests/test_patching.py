from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
from transformer_lens import HookedTransformer, HookedTransformerConfig

from headlens import HeadlensError, tiny_model
from headlens.data.probes import word_tokens
from headlens.interventions.attribution import attribution_patching, compare_patching, rank_correlation
from headlens.interventions.patching import PromptPair, activation_patching, induction_pair, logit_diff, text_pair

ALL_POS = {
    "z": tlp.get_act_patch_attn_head_out_all_pos,
    "q": tlp.get_act_patch_attn_head_q_all_pos,
    "k": tlp.get_act_patch_attn_head_k_all_pos,
    "v": tlp.get_act_patch_attn_head_v_all_pos,
    "pattern": tlp.get_act_patch_attn_head_pattern_all_pos,
}
BY_POS = {
    "z": tlp.get_act_patch_attn_head_out_by_pos,
    "q": tlp.get_act_patch_attn_head_q_by_pos,
    "k": tlp.get_act_patch_attn_head_k_by_pos,
    "v": tlp.get_act_patch_attn_head_v_by_pos,
    "pattern": tlp.get_act_patch_attn_head_pattern_by_pos,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mha_qwen():
    return tiny_model("qwen2", seed=1, n_kv_heads=4)


def _tl_reference(model, pair, fn):
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(pair.clean)
        return fn(model, pair.corrupted, clean_cache, pair.metric_logits)


def _as_tl_layout(df: pd.DataFrame, activation: str, by_position: bool) -> torch.Tensor:
    """Our long table reshaped to TransformerLens' output layout."""
    unit = "kv_head" if df["head"].isna().all() else "head"
    if not by_position:
        index, columns = ["layer"], [unit]
    elif activation == "pattern":
        index, columns = ["layer", unit], ["pos"]
    else:
        index, columns = ["layer", "pos"], [unit]
    table = df.pivot_table(index=index, columns=columns, values="metric", aggfunc="first")
    array = torch.tensor(table.to_numpy())
    sizes = [df[c].nunique() for c in index + columns]
    return array.reshape(sizes)


@pytest.mark.parametrize("activation", ["z", "q", "k", "v", "pattern"])
def test_exact_matches_transformerlens_all_pos_gqa(tiny_qwen, activation):
    pair = induction_pair(tiny_qwen, n_tokens=6, n_seqs=2, seed=0)
    ref = _tl_reference(tiny_qwen, pair, ALL_POS[activation])
    result = activation_patching(tiny_qwen, pair, activation=activation, runs_per_pass=3, progress=False)
    ours = _as_tl_layout(result.table, activation, by_position=False)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-5, rtol=0)
    assert (ref - result.corrupted).abs().max() > 1e-3  # the patches do something


@pytest.mark.parametrize("activation", ["z", "pattern"])
def test_exact_matches_transformerlens_by_pos_gqa(tiny_qwen, activation):
    pair = induction_pair(tiny_qwen, n_tokens=4, n_seqs=1, seed=1)
    ref = _tl_reference(tiny_qwen, pair, BY_POS[activation])
    df = activation_patching(tiny_qwen, pair, activation=activation, by_position=True, progress=False).table
    ours = _as_tl_layout(df, activation, by_position=True)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-5, rtol=0)


def test_exact_matches_transformerlens_mha(mha_qwen):
    pair = induction_pair(mha_qwen, n_tokens=3, n_seqs=1, seed=2)
    for by_position in (False, True):
        ref = _tl_reference(mha_qwen, pair, (BY_POS if by_position else ALL_POS)["z"])
        df = activation_patching(mha_qwen, pair, activation="z", by_position=by_position, progress=False).table
        torch.testing.assert_close(_as_tl_layout(df, "z", by_position).float(), ref.float(), atol=1e-5, rtol=0)
    ref_v = _tl_reference(mha_qwen, pair, ALL_POS["v"])
    df_v = activation_patching(mha_qwen, pair, activation="v", progress=False).table
    assert df_v["head"].notna().all() and len(df_v) == 2 * 4
    torch.testing.assert_close(_as_tl_layout(df_v, "v", False).float(), ref_v.float(), atol=1e-5, rtol=0)


def test_table_columns_and_normalisation(tiny_qwen):
    pair = induction_pair(tiny_qwen, n_tokens=5, n_seqs=2, seed=0)
    result = activation_patching(tiny_qwen, pair, activation="z", progress=False)
    df = result.table
    assert list(df.columns) == ["activation", "layer", "head", "kv_head", "metric", "effect"]
    assert len(df) == tiny_qwen.cfg.n_layers * tiny_qwen.cfg.n_heads
    assert df["kv_head"].tolist() == [0, 0, 1, 1] * 2
    clean, corrupted = result.clean, result.corrupted
    with torch.no_grad():
        assert clean == pytest.approx(float(pair.metric_logits(tiny_qwen(pair.clean))), abs=1e-5)
        assert corrupted == pytest.approx(float(pair.metric_logits(tiny_qwen(pair.corrupted))), abs=1e-5)
    np.testing.assert_allclose(df["effect"], (df["metric"] - corrupted) / (clean - corrupted))
    flipped = activation_patching(
        tiny_qwen, pair, activation="z", metric=lambda logits: -pair.metric(logits), runs_per_pass=1, progress=False
    ).table
    np.testing.assert_allclose(flipped["metric"], -df["metric"], atol=1e-5)
    np.testing.assert_allclose(flipped["effect"], df["effect"], atol=1e-4)
    k = activation_patching(tiny_qwen, pair, activation="k", progress=False).table
    assert k["head"].isna().all() and k["kv_head"].tolist() == [0, 1, 0, 1]


def test_ungrouped_kv_is_per_q_head_and_matches_transformerlens(tiny_qwen):
    pair = induction_pair(tiny_qwen, n_tokens=5, n_seqs=2, seed=3)
    with torch.no_grad():
        grouped = tiny_qwen(pair.clean)
        tiny_qwen.cfg.ungroup_grouped_query_attention = True
        try:
            ungrouped = tiny_qwen(pair.clean)
            _, cache = tiny_qwen.run_with_cache(pair.clean)
            index = pd.DataFrame([(layer, head) for layer in range(2) for head in range(4)], columns=["layer", "head"])
            ref = tlp.generic_activation_patch(
                tiny_qwen,
                pair.corrupted,
                cache,
                pair.metric_logits,
                tlp.layer_head_vector_patch_setter,
                "k",
                index_df=index,
            )
        finally:
            tiny_qwen.cfg.ungroup_grouped_query_attention = False
    torch.testing.assert_close(ungrouped, grouped, atol=1e-5, rtol=0)
    df = activation_patching(tiny_qwen, pair, activation="k", ungroup_kv=True, progress=False).table
    assert tiny_qwen.cfg.ungroup_grouped_query_attention is False
    assert df["head"].tolist() == [0, 1, 2, 3] * 2 and df["kv_head"].tolist() == [0, 0, 1, 1] * 2
    np.testing.assert_allclose(df["metric"].to_numpy(), ref.cpu().numpy(), atol=1e-5)
    grouped_k = activation_patching(tiny_qwen, pair, activation="k", progress=False).table
    assert not np.allclose(grouped_k["metric"].to_numpy(), df["metric"].to_numpy()[::2])


def test_qkv_patching_equals_split_input_patching(tiny_qwen):
    """Patching hook_q/k/v of a head equals patching its split q/k/v input (use_split_qkv_input)."""
    pair = induction_pair(tiny_qwen, n_tokens=5, n_seqs=2, seed=4)
    ours = {
        a: activation_patching(tiny_qwen, pair, activation=a, progress=False).table["metric"].to_numpy() for a in "qkv"
    }
    tiny_qwen.set_use_split_qkv_input(True)
    try:
        _, cache = tiny_qwen.run_with_cache(pair.clean)
        assert cache["blocks.0.hook_k_input"].shape[2] == tiny_qwen.cfg.n_key_value_heads
        assert cache["blocks.0.hook_q_input"].shape[2] == tiny_qwen.cfg.n_heads
        for a in "qkv":
            n = tiny_qwen.cfg.n_heads if a == "q" else tiny_qwen.cfg.n_key_value_heads
            index = pd.DataFrame([(layer, h) for layer in range(2) for h in range(n)], columns=["layer", "head"])
            with torch.no_grad():
                ref = tlp.generic_activation_patch(
                    tiny_qwen,
                    pair.corrupted,
                    cache,
                    pair.metric_logits,
                    tlp.layer_head_vector_patch_setter,
                    f"{a}_input",
                    index_df=index,
                )
            np.testing.assert_allclose(ours[a], ref.cpu().numpy(), atol=1e-5)
    finally:
        tiny_qwen.set_use_split_qkv_input(False)


def attn_only_model(*, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        d_head=8,
        n_heads=n_heads,
        n_key_value_heads=n_kv_heads,
        n_ctx=32,
        d_vocab=40,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type="rotary",
        rotary_dim=8,
        act_fn="relu",
        seed=0,
        default_prepend_bos=False,
        initializer_range=0.3,
    )
    return HookedTransformer(cfg).eval()


def test_one_means_full_recovery():
    """One layer, one head, prompts differing at position 0 only: the head's output at the last position carries
    all of the difference, so patching it recovers exactly (effect 1) and patching other positions does nothing."""
    model = attn_only_model(n_layers=1, n_heads=1, n_kv_heads=1)
    clean = torch.tensor([[3, 5, 7, 9, 11, 13]])
    corrupted = clean.clone()
    corrupted[0, 0] = 20
    pair = PromptPair(
        clean, corrupted, torch.tensor([5]), partial(logit_diff, correct=torch.tensor([[1]]), wrong=torch.tensor([[2]]))
    )
    df = activation_patching(model, pair, progress=False).table
    assert df["effect"].tolist() == pytest.approx([1.0], abs=1e-5)
    by_pos = activation_patching(model, pair, by_position=True, progress=False).table
    assert by_pos["effect"].tolist() == pytest.approx([0, 0, 0, 0, 0, 1], abs=1e-5)
    pattern = activation_patching(model, pair, activation="pattern", by_position=True, progress=False).table
    assert pattern["effect"].iloc[:5].abs().max() < 1e-5 and abs(pattern["effect"].iloc[5]) > 1e-3


def linear_model() -> HookedTransformer:
    """Attention-only, no norms, layer 1 with W_Q = 0 (uniform attention): logits are linear in every z, v and pattern."""
    model = attn_only_model()
    with torch.no_grad():
        model.blocks[1].attn.W_Q.zero_()
        model.blocks[1].attn.b_Q.zero_()
    return model.eval()


@pytest.mark.parametrize("by_position", [False, True])
def test_attribution_equals_exact_when_metric_is_linear(by_position):
    model = linear_model()
    gen = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, 40, (2, 3, 8), generator=gen)
    correct, wrong = torch.randint(0, 40, (2, 3, 1), generator=gen)
    pair = PromptPair(clean, corrupted, torch.tensor([7]), partial(logit_diff, correct=correct, wrong=wrong))
    activations = ["z", "v", "pattern"]
    attr = attribution_patching(model, pair, activations=activations, by_position=by_position).table
    for activation in activations:
        exact = activation_patching(model, pair, activation=activation, by_position=by_position, progress=False).table
        estimate = attr[attr["activation"] == activation].reset_index(drop=True)
        assert exact["layer"].equals(estimate["layer"]) and exact["kv_head"].equals(estimate["kv_head"])
        np.testing.assert_allclose(estimate["metric"], exact["metric"], atol=1e-5)
        np.testing.assert_allclose(estimate["effect"], exact["effect"], atol=1e-5)
        assert exact["effect"].abs().max() > 0.05
    model.requires_grad_(False)
    with torch.inference_mode():
        frozen = attribution_patching(model, pair, activations=activations, by_position=by_position).table
    np.testing.assert_allclose(frozen["effect"], attr["effect"], atol=1e-6)
    # q/k act through the softmax: plain AtP linearises it and is not exact; AtP* recomputes it and is
    for activation in ("q", "k"):
        exact = activation_patching(model, pair, activation=activation, by_position=by_position, progress=False).table
        plain = attribution_patching(model, pair, activations=[activation], by_position=by_position, method="atp").table
        star = attribution_patching(model, pair, activations=[activation], by_position=by_position).table
        assert np.abs(exact["effect"] - plain["effect"]).max() > 1e-3
        np.testing.assert_allclose(star["effect"], exact["effect"], atol=1e-4)


def test_compare_patching_reports_spearman(tiny_qwen):
    pair = induction_pair(tiny_qwen, n_tokens=5, n_seqs=2, seed=0)
    result = compare_patching(tiny_qwen, pair, top_k=5, progress=False)
    df, quality = result.table, result.quality
    assert {"exact", "attribution"} <= set(df.columns)
    assert df["exact"].abs().is_monotonic_decreasing
    assert quality["spearman"] == pytest.approx(rank_correlation(df["exact"], df["attribution"]))
    assert -1 <= quality["spearman_top"] <= 1
    assert -1 <= quality["pearson"] <= 1 and 0 <= quality["recall"] <= 1 and quality["recall_k"] == 2
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, -5, 3, 4], [9, 3, 2, 1], top_k=3) == pytest.approx(-1.0)


def test_induction_pair_is_deterministic_and_well_formed(tiny_qwen):
    a = induction_pair(tiny_qwen, n_tokens=6, n_seqs=3, seed=7)
    b = induction_pair(tiny_qwen, n_tokens=6, n_seqs=3, seed=7)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupted, b.corrupted)
    assert a.clean.shape == (3, 13)
    assert torch.equal(a.clean[:, 1:7], a.clean[:, 7:]) and torch.equal(a.corrupted[:, 7:], a.clean[:, 7:])
    assert torch.equal(a.corrupted[:, 0], a.clean[:, 0])
    for clean, corrupted in zip(a.clean, a.corrupted):
        assert len(set(clean[:7].tolist()) | set(corrupted[1:7].tolist())) == 13  # P, A and B all distinct
    assert a.positions.tolist() == list(range(7, 12))
    assert set(a.clean.flatten().tolist()) <= set(word_tokens(tiny_qwen.tokenizer))
    assert not torch.equal(a.clean, induction_pair(tiny_qwen, n_tokens=6, n_seqs=3, seed=8).clean)


def test_empty_prompts_raise(tiny_qwen):
    for clean, corrupted, which in (("", "", "clean"), ("The cat", "", "corrupted"), (["a", ""], ["b", "c"], "clean")):
        with pytest.raises(HeadlensError, match=f"the {which} prompt '' is empty"):
            text_pair(tiny_qwen, clean, corrupted)


def test_mismatched_lengths_raise(tiny_qwen):
    clean, corrupted = "The cat sat on the mat and", "A dog"
    n_clean, n_corrupted = (tiny_qwen.to_tokens(t).shape[-1] for t in (clean, corrupted))
    with pytest.raises(HeadlensError, match=f"clean .* has {n_clean} tokens, corrupted .* has {n_corrupted}"):
        text_pair(tiny_qwen, clean, corrupted)
    with pytest.raises(HeadlensError, match="clean has 5 tokens .* corrupted has 4"):
        PromptPair(
            torch.zeros(1, 5, dtype=torch.long),
            torch.zeros(1, 4, dtype=torch.long),
            torch.tensor([3]),
            lambda x: x.mean(),
        )


def test_bad_inputs_raise(tiny_qwen):
    pair = induction_pair(tiny_qwen, n_tokens=5, n_seqs=1)
    with pytest.raises(HeadlensError, match="unknown activation 'resid'"):
        activation_patching(tiny_qwen, pair, activation="resid", progress=False)
    with pytest.raises(HeadlensError, match="runs_per_pass must be an integer >= 1"):
        activation_patching(tiny_qwen, pair, runs_per_pass=0, progress=False)
    with pytest.raises(HeadlensError, match="layer 9 is out of range"):
        activation_patching(tiny_qwen, pair, layers=[9], progress=False)
    same = PromptPair(pair.clean, pair.clean, pair.positions, pair.metric)
    with pytest.raises(HeadlensError, match="nothing to recover"):
        activation_patching(tiny_qwen, same, progress=False)
    with pytest.raises(HeadlensError, match="nothing to recover"):
        attribution_patching(tiny_qwen, same)
    with pytest.raises(HeadlensError, match="single token"):
        text_pair(tiny_qwen, "The cat sat on the", "The dog ran to the", answer=" on the mat")


def test_text_pair_metric(tiny_qwen):
    pair = text_pair(tiny_qwen, "The cat sat on the", "The dog ran to the")
    assert pair.clean.shape == pair.corrupted.shape and pair.positions.tolist() == [pair.clean.shape[1] - 1]
    with torch.no_grad():
        clean_logits = tiny_qwen(pair.clean)[:, -1]
        corrupted_logits = tiny_qwen(pair.corrupted)[:, -1]
    top, other = clean_logits.argmax(-1), corrupted_logits.argmax(-1)
    expected = (
        (clean_logits[0, top] - clean_logits[0, other]).item()
        if top != other
        else clean_logits.log_softmax(-1)[0, top].item()
    )
    answer = text_pair(tiny_qwen, "The cat sat on the", "The dog ran to the", answer=" cat", wrong=" the")
    cat, the = tiny_qwen.to_single_token(" cat"), tiny_qwen.to_single_token(" the")
    with torch.no_grad():
        assert float(pair.metric_logits(tiny_qwen(pair.clean))) == pytest.approx(expected, abs=1e-5)
        assert float(answer.metric_logits(tiny_qwen(answer.clean))) == pytest.approx(
            (clean_logits[0, cat] - clean_logits[0, the]).item(), abs=1e-5
        )


def test_text_pair_scores_each_prompt_against_its_own_answer(tiny_qwen):
    clean, corrupted = ["The cat sat on the", "The dog ran to the"], ["The dog ran to the", "The cat sat on the"]
    pair = text_pair(tiny_qwen, clean, corrupted, answer=[" cat", " the"], wrong=[" the", " cat"])
    ids = [[tiny_qwen.to_single_token(t) for t in pair_] for pair_ in ([" cat", " the"], [" the", " cat"])]
    with torch.no_grad():
        last = tiny_qwen(pair.clean)[:, -1]
    expected = ((last[0, ids[0][0]] - last[0, ids[1][0]]) + (last[1, ids[0][1]] - last[1, ids[1][1]])) / 2
    assert float(pair.metric_logits(tiny_qwen(pair.clean))) == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(HeadlensError, match="one answer per prompt"):
        text_pair(tiny_qwen, clean, corrupted, answer=[" cat"])


def test_cli_patch_writes_csvs(tmp_path):
    from typer.testing import CliRunner

    from headlens.cli import app

    result = CliRunner().invoke(
        app,
        [
            "patch",
            "--model",
            "tiny-qwen2",
            "--out",
            str(tmp_path),
            "--n-tokens",
            "5",
            "--activations",
            "z,k",
            "--top-k",
            "3",
            "--attribution-method",
            "ig",
        ],
    )
    assert result.exit_code == 0, result.output
    exact = pd.read_csv(tmp_path / "patch_z.csv")
    assert len(exact) == 8 and {"layer", "head", "kv_head", "effect"} <= set(exact.columns)
    assert len(pd.read_csv(tmp_path / "patch_k.csv")) == 4
    attr = pd.read_csv(tmp_path / "attribution.csv")
    assert set(attr["activation"]) == {"z", "k"}
    assert "ig vs exact over all 8 units: spearman" in result.output and "pearson" in result.output
    bad = CliRunner().invoke(
        app,
        [
            "patch",
            "--model",
            "tiny-qwen2",
            "--out",
            str(tmp_path),
            "--clean",
            "The cat sat on the mat",
            "--corrupted",
            "A dog",
        ],
    )
    assert bad.exit_code != 0 and isinstance(bad.exception, HeadlensError)


@pytest.mark.slow
def test_qwen_induction_pair_top_heads_are_census_induction_heads(qwen, qwen_census):
    """On Qwen with the induction pair, the heads whose output patching recovers most are induction heads."""
    table = qwen_census
    induction_heads = {(r.layer, r.head) for r in table.itertuples() if r.label == "induction"}
    assert induction_heads
    pair = induction_pair(qwen, n_tokens=8, n_seqs=2, seed=0)
    result = activation_patching(qwen, pair, progress=False)
    df = result.table
    assert result.clean > result.corrupted + 2  # the clean run does induction
    top = df.nlargest(10, "effect").merge(table[["layer", "head", "induction", "label"]], on=["layer", "head"])
    print(f"\nclean {result.clean:.3f}, corrupted {result.corrupted:.3f}\n{top.to_string()}")
    top_heads = {(r.layer, r.head) for r in top.itertuples()}
    assert len(top_heads & induction_heads) >= 3, (sorted(top_heads), sorted(induction_heads))
    assert top["induction"].mean() > 3 * table["induction"].mean()


@pytest.mark.parametrize(
    "activation, fn",
    [
        ("resid_pre", tlp.get_act_patch_resid_pre),
        ("attn_out", tlp.get_act_patch_attn_out),
        ("mlp_out", tlp.get_act_patch_mlp_out),
    ],
)
def test_layer_patching_matches_transformerlens(tiny_qwen, activation, fn):
    """Per-layer, per-position patching of the residual stream / block outputs on the engine == TL's
    get_act_patch_{resid_pre,attn_out,mlp_out} ([layer, pos] of metric values); all positions at once of
    resid_pre recovers the clean run exactly."""
    pair = induction_pair(tiny_qwen, n_tokens=5, n_seqs=2, seed=3)
    result = activation_patching(
        tiny_qwen, pair, activation=activation, by_position=True, runs_per_pass=5, progress=False
    )
    ours = result.table
    assert list(ours.columns) == ["activation", "layer", "pos", "metric", "effect"]
    theirs = _tl_reference(tiny_qwen, pair, fn)
    grid = torch.tensor(ours.pivot(index="layer", columns="pos", values="metric").to_numpy())
    assert grid.shape == theirs.shape
    assert (grid - theirs.double()).abs().max() < 1e-5
    assert (grid - result.corrupted).abs().max() > 1e-3  # the patches do something
    whole = activation_patching(tiny_qwen, pair, activation=activation, progress=False).table
    assert len(whole) == tiny_qwen.cfg.n_layers
    if activation == "resid_pre":
        assert whole["effect"].tolist() == pytest.approx([1.0] * tiny_qwen.cfg.n_layers, abs=1e-5)


def test_patching_chosen_heads_gives_their_rows_of_the_full_table(tiny_qwen):
    """Verifying an attribution screen: patching just some heads reproduces their rows of the full run."""
    pair = induction_pair(tiny_qwen, n_tokens=6, n_seqs=2, seed=0)
    full = activation_patching(tiny_qwen, pair, activation="z", progress=False).table.set_index(["layer", "head"])
    some = activation_patching(tiny_qwen, pair, activation="z", heads=["L1H2", (0, 1)], progress=False).table
    assert list(zip(some["layer"], some["head"])) == [(0, 1), (1, 2)]
    assert np.allclose(some["effect"], full.loc[[(0, 1), (1, 2)], "effect"], atol=1e-5)
    for kwargs, match in [
        ({"heads": ["L1H2"], "layers": [1]}, "layers or heads, not both"),
        ({"heads": ["L9H0"]}, "out of range"),
        ({"heads": ["L1H2"], "activation": "k"}, "heads= picks q heads"),
    ]:
        with pytest.raises(HeadlensError, match=match):
            activation_patching(tiny_qwen, pair, progress=False, **{"activation": "z", **kwargs})


def test_prompt_pairs_are_batches_with_distinct_positions_of_the_models_vocabulary(tiny_qwen, monkeypatch):
    """A 1-d pair ran (exact) or failed deep inside (attribution, roles); a position given twice weighed it twice;
    -1 broke what reads positions (task_roles found no answer before it); ids past the vocabulary: IndexError."""
    from headlens.analysis.roles import task_roles

    pair = induction_pair(tiny_qwen, n_tokens=4, n_seqs=2)
    n = pair.clean.shape[1]
    with pytest.raises(HeadlensError, match=r"clean tokens must be a \[batch, pos\] tensor \(got \(9,\)\)"):
        PromptPair(pair.clean[0], pair.corrupted[0], pair.positions, pair.metric)
    with pytest.raises(HeadlensError, match="name a position twice"):
        PromptPair(pair.clean, pair.corrupted, torch.tensor([n - 1, -1]), lambda x: x.mean())
    with pytest.raises(HeadlensError, match="1-d tensor of integer positions, got \\[5, 6\\]"):
        PromptPair(pair.clean, pair.corrupted, [5, 6], lambda x: x.mean())
    back = PromptPair(pair.clean, pair.corrupted, pair.positions - n, pair.metric, name="induction", info=pair.info)
    assert back.positions.tolist() == pair.positions.tolist() == back.metric.positions.tolist()
    pd.testing.assert_frame_equal(task_roles(tiny_qwen, back), task_roles(tiny_qwen, pair))
    far = PromptPair(pair.clean, pair.corrupted + tiny_qwen.cfg.d_vocab, pair.positions, pair.metric)
    monkeypatch.setattr(type(tiny_qwen), "forward", lambda *a, **k: pytest.fail("ran the model"))
    for run in (attribution_patching, task_roles):
        with pytest.raises(HeadlensError, match="corrupted tokens: token id .* is not in this model's vocabulary"):
            run(tiny_qwen, far)

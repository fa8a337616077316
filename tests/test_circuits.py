"""Circuits (issue 26): the edge graph, the edge-ablation driver (path patching) against TransformerLens and against a
hand-written hook version, EAP against a finite difference, composition against TransformerLens, a hand-planted
induction circuit recovered by every method, the trained toy model's known circuit, faithfulness, tasks and the CLI."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tl_patching

import headlens
from headlens.circuits import paths
from headlens.circuits.composition import composition_scores, random_baseline, top_senders
from headlens.circuits.edges import edge_attribution
from headlens.circuits.faithfulness import (
    area,
    circuit_metric,
    faithfulness,
    node_circuit,
    smallest_circuit,
    top_edges,
)
from headlens.circuits.graph import Graph
from headlens.circuits.study import exact_edges, find_circuit, recall_at, receiver_senders
from headlens.circuits.tasks import CircuitTask, induction_task
from headlens.errors import HeadlensError
from headlens.interventions.patching import PromptPair, induction_pair

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(one_thread):
    """Tiny random Qwen2: 3 layers, 4 q heads sharing 2 kv heads (GQA), MLPs, folded RMS norms."""
    return headlens.tiny_model("qwen2", seed=0, n_layers=3)


@pytest.fixture(scope="module")
def tiny_pair(tiny):
    return induction_pair(tiny, n_tokens=5, n_seqs=2, seed=1)


@pytest.fixture(scope="module")
def toy(one_thread):
    from headlens.analysis.toy import load_induction_model

    return load_induction_model()


@pytest.fixture(scope="module")
def toy_task(toy):
    return induction_task(toy, n_tokens=12, n_seqs=8, n_mean=16)


V, N = 12, 16  # planted model: vocabulary and context


def planted_induction() -> HookedTransformer:
    """A 2-layer attention-only model with a hand-set induction circuit (no layer norm).

    Residual stream: [token one-hot (V) | position one-hot (N) | previous token (V) | output (V)]. L0H0 is a
    previous-token head (query: position i, key: position j + 1; value: token; writes "previous token"). L1H0 is an
    induction head: its query reads the current token, its KEY reads the previous-token subspace written by L0H0
    (K-composition), its value reads the token and writes the output subspace that the unembedding reads. L0H1 and
    L1H1 are weak random distractors.
    """
    d = 3 * V + N
    tok, pos, prev, out = slice(0, V), slice(V, V + N), slice(V + N, 2 * V + N), slice(2 * V + N, d)
    cfg = HookedTransformerConfig(
        n_layers=2, n_heads=2, d_model=d, d_head=N, d_vocab=V, n_ctx=N, attn_only=True, normalization_type=None,
        positional_embedding_type="standard", default_prepend_bos=False, seed=0, device="cpu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    c = 30.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, tok] = torch.eye(V)
        model.pos_embed.W_pos[:, pos] = torch.eye(N)
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        a0.W_Q[0, pos, :N] = c * torch.eye(N)  # query at i looks for key code i
        a0.W_K[0, pos, 1:N] = torch.eye(N)[:, : N - 1]  # key at j carries code j + 1
        a0.W_V[0, tok, :V] = torch.eye(V)
        a0.W_O[0, :V, prev] = torch.eye(V)
        a1.W_Q[0, tok, :V] = c * torch.eye(V)  # the current token ...
        a1.W_K[0, prev, :V] = torch.eye(V)  # ... matches keys whose previous token it is
        a1.W_V[0, tok, :V] = torch.eye(V)
        a1.W_O[0, :V, out] = 8.0 * torch.eye(V)
        model.unembed.W_U[out, :] = torch.eye(V)
        g = torch.Generator().manual_seed(1)
        for attn in (a0, a1):  # distractor heads: small random weights
            for w in (attn.W_Q, attn.W_K, attn.W_V):
                w[1] = 0.05 * torch.randn(d, N, generator=g)
            attn.W_O[1] = 0.05 * torch.randn(N, d, generator=g)
    model.eval()
    return model


@pytest.fixture(scope="module")
def planted(one_thread):
    return planted_induction()


@pytest.fixture(scope="module")
def planted_task(planted):
    """[P A A] vs [P B A] over the planted model's 12 tokens (5 repeated), mean set from another seed."""
    return induction_task(planted, n_tokens=5, n_seqs=8, n_mean=16, prefix=1, seed=3)


# ---------------------------------------------------------------- the graph


def test_graph_counts_match_mib_for_qwen25_and_know_who_reads_whom(toy):
    assert Graph(24, 14, True).n_edges == 179749  # MIB's edge count for Qwen2.5-0.5B (its EDGE_COUNTS table)
    g = Graph.of(toy)  # attention-only: embed + 8 heads; 24 head inputs + logits
    assert (g.n_senders, g.n_slots, g.n_edges) == (9, 25, 81)
    s, r = g.edge("L0H2", "L1H2", "k")
    assert g.senders[s] == "L0H2" and g.slots[r].node == "L1H2" and g.slots[r].input == "k"
    for bad in (("L1H0", "L1H2", "k"), ("L1H2", "L0H0", "q"), ("MLP0", "L1H0", "q"), ("L0H0", "L1H9", "q")):
        with pytest.raises(HeadlensError):
            g.edge(*bad)
    big = Graph(3, 2, True)
    assert big.valid[big.mlp_sender(0), big.slot_index[("L1H0", "q")]]  # MLP0 -> layer 1
    assert big.valid[big.head_sender(1, 1), big.slot_index[("MLP1", "mlp")]]  # a head -> its own layer's MLP
    assert not big.valid[big.mlp_sender(1), big.slot_index[("MLP1", "mlp")]]
    assert big.valid[:, -1].all()  # everything -> logits


def test_split_inputs_keep_logits_and_restore_the_config(tiny, tiny_pair):
    before = (tiny.cfg.use_split_qkv_input, tiny.cfg.ungroup_grouped_query_attention, tiny.cfg.use_hook_mlp_in)
    with torch.inference_mode():
        base = tiny(tiny_pair.clean)
        with paths.split_inputs(tiny):
            _, cache = tiny.run_with_cache(tiny_pair.clean, names_filter=lambda n: n.endswith("k_input"))
            split = tiny(tiny_pair.clean)
    assert torch.allclose(base, split, atol=1e-5)
    assert cache["blocks.0.hook_k_input"].shape[2] == tiny.cfg.n_heads  # one key input per q head under GQA
    assert (tiny.cfg.use_split_qkv_input, tiny.cfg.ungroup_grouped_query_attention, tiny.cfg.use_hook_mlp_in) == before


# ---------------------------------------------------------------- the driver


def test_no_edge_is_clean_and_every_edge_is_the_corrupted_run(tiny, tiny_pair):
    g = Graph.of(tiny)
    empty = (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with paths.split_inputs(tiny):
        setting = paths.prepare(tiny, tiny_pair.clean, tiny_pair.metric, corrupted=tiny_pair.corrupted, graph=g)
        none, every = paths.run_edges(tiny, setting, [empty, paths.mask_run(g.valid)], progress=False)
    with torch.inference_mode():
        corrupted = tiny_pair.metric.full(tiny(tiny_pair.corrupted))
        clean = tiny_pair.metric.full(tiny(tiny_pair.clean))
    assert none == pytest.approx(float(clean), abs=1e-5)
    assert every == pytest.approx(float(corrupted), abs=1e-4)
    assert abs(float(clean) - float(corrupted)) > 0.05


def test_all_edges_out_of_a_head_equal_transformerlens_head_patching(tiny, tiny_pair):
    """Corrupting every edge out of a head = TransformerLens' get_act_patch_attn_head_out_all_pos, noising: the
    clean run with the head's z from the corrupted cache."""
    g = Graph.of(tiny)
    heads = [f"L{l}H{h}" for l in range(3) for h in range(4)]
    ours = paths.sender_patching(tiny, tiny_pair, heads, progress=False).table
    with torch.inference_mode():
        _, corrupted_cache = tiny.run_with_cache(tiny_pair.corrupted)
        tl = tl_patching.get_act_patch_attn_head_out_all_pos(
            tiny, tiny_pair.clean, corrupted_cache, tiny_pair.metric_logits
        )
    assert tl.shape == (3, 4)
    np.testing.assert_allclose(ours["metric"].to_numpy(), tl.flatten().numpy(), atol=2e-5)
    assert ours["delta"].abs().max() > 0.01 and len(g.senders) == 1 + 3 * 5


def _hand_path_patch(model, pair, sender: str, receiver: str, kind: str) -> float:
    """Path patching written out with plain hooks: record both runs' sender output, then rerun the clean prompt adding
    (corrupted − clean) to the one receiver input (its own head's copy for q/k/v)."""
    from transformer_lens.utils import get_act_name

    def out_hook_name(name):
        if name == "embed":
            return "blocks.0.hook_resid_pre"
        if name.startswith("MLP"):
            return get_act_name("mlp_out", int(name[3:]))
        return get_act_name("z", int(name[1 : name.index("H")]))

    def sender_out(tokens):
        _, cache = model.run_with_cache(tokens, names_filter=out_hook_name(sender))
        act = cache[out_hook_name(sender)]
        if sender.startswith("L"):
            layer, head = (int(x) for x in sender[1:].split("H"))
            return act[:, :, head] @ model.blocks[layer].attn.W_O[head]
        return act

    with paths.split_inputs(model), torch.inference_mode():
        delta = sender_out(pair.corrupted) - sender_out(pair.clean)
        if kind == "logits":
            resid = model(pair.clean, stop_at_layer=model.cfg.n_layers) + delta
            return float(pair.metric(model.unembed(model.ln_final(resid))[:, pair.positions]))
        if kind == "mlp":
            name = f"blocks.{int(receiver[3:])}.hook_mlp_in"
            hook = lambda act, hook: act + delta  # noqa: E731
        else:
            layer, head = (int(x) for x in receiver[1:].split("H"))
            name = f"blocks.{layer}.hook_{kind}_input"

            def hook(act, hook):
                act = act.clone()
                act[:, :, head] += delta
                return act

        logits = model.run_with_hooks(pair.clean, fwd_hooks=[(name, hook)])
        return float(pair.metric.full(logits))


def test_single_edge_path_patching_equals_a_hand_written_hook_version(tiny, tiny_pair):
    edges = [
        ("L0H1", "L2H3", "k"),  # kv head 1 of layer 2, only q head 3's copy
        ("L0H0", "L1H1", "v"),
        ("MLP0", "L2H0", "q"),
        ("embed", "MLP1", "mlp"),
        ("L1H2", "MLP1", "mlp"),  # a head into its own layer's MLP
        ("L2H1", "logits", "logits"),
        ("embed", "L0H2", "k"),
    ]
    table = paths.path_patching(tiny, tiny_pair, edges, progress=False).table
    hand = [_hand_path_patch(tiny, tiny_pair, *e) for e in edges]
    np.testing.assert_allclose(table["metric"].to_numpy(), hand, atol=2e-5)
    assert table["delta"].abs().max() > 1e-3  # the edges do something
    # stacking: the same edges in one pass each and all in one pass agree
    g = Graph.of(tiny)
    s, r = zip(*[g.edge(*e) for e in edges])
    with paths.split_inputs(tiny):
        setting = paths.prepare(tiny, tiny_pair.clean, tiny_pair.metric, corrupted=tiny_pair.corrupted, graph=g)
        one = paths.run_edges(tiny, setting, paths.single_edges(g, s, r), runs_per_pass=1, progress=False)
    np.testing.assert_allclose(one, table["metric"].to_numpy(), atol=1e-5)


def test_key_path_patching_leaves_the_queries_and_the_kv_siblings_clean(tiny, tiny_pair):
    """A k edge into L2H3 changes L2H3's own scores only: its kv-group sibling L2H2 and every q stay as in the clean run."""
    g = Graph.of(tiny)
    s, r = g.edge("L0H1", "L2H3", "k")
    seen = {}

    def keep(act, hook):
        seen.setdefault(hook.name, []).append(act.clone())

    with paths.split_inputs(tiny):
        setting = paths.prepare(tiny, tiny_pair.clean, tiny_pair.metric, corrupted=tiny_pair.corrupted, graph=g)
        names = ["blocks.2.attn.hook_q", "blocks.2.attn.hook_attn_scores"]
        with tiny.hooks(fwd_hooks=[(n, keep) for n in names]):
            paths.run_edges(tiny, setting, paths.single_edges(g, [s], [r]), progress=False)
            tiny(tiny_pair.clean)
    (q_patched, q_clean), (sc_patched, sc_clean) = seen[names[0]], seen[names[1]]
    assert torch.equal(q_patched, q_clean)
    assert torch.allclose(sc_patched[:, 2], sc_clean[:, 2]) and not torch.allclose(sc_patched[:, 3], sc_clean[:, 3])


def test_mean_ablation_needs_separate_prompts_of_the_same_length(tiny, tiny_pair):
    g = Graph.of(tiny)
    with paths.split_inputs(tiny):
        with pytest.raises(HeadlensError, match="separate set of prompts"):
            paths.prepare(tiny, tiny_pair.clean, tiny_pair.metric, ablation="mean", graph=g)
        with pytest.raises(HeadlensError, match="same length"):
            paths.prepare(tiny, tiny_pair.clean, tiny_pair.metric, ablation="mean", mean_tokens=tiny_pair.clean[:, :-1])
        with pytest.raises(HeadlensError, match="unknown ablation"):
            paths.prepare(tiny, tiny_pair.clean, tiny_pair.metric, ablation="zero")


def test_edges_scores_masks_and_tokens_outside_the_graph_are_refused(tiny, tiny_pair, monkeypatch):
    """Slot index -1 patched the logits edge, sender 1.7 ran as 1, a token id of -1 read W_E[-1]: each a plausible
    delta. top_edges(n=-1) kept all but one edge, smallest_circuit(high=-1) answered n=-1, a [slot] mask broadcast
    in circuit_metric, scores of another shape, a PromptPair or unused scores= failed late or were ignored."""
    g = Graph.of(tiny)
    s, r = g.edge("L0H0", "L1H0", "k")
    task = CircuitTask("x", tiny_pair, None)
    monkeypatch.setattr(type(tiny), "forward", lambda *a, **k: pytest.fail("ran the model"))
    monkeypatch.setattr(type(tiny), "run_with_hooks", lambda *a, **k: pytest.fail("ran the model"))
    bad_edges = {
        "slot index -1 is not in": ([s], [-1]),
        "sender indices must be a 1-d array of integers": ([1.7], [r]),
        "sender index 99 is not in": ([99], [r]),
        "give one slot per sender": ([s, s], [r]),
        "MLP2 does not write before L0H0\\[q\\] reads": ([g.n_senders - 1], [0]),
        "no edges given": ([], []),
    }
    for message, (senders, slots) in bad_edges.items():
        with pytest.raises(HeadlensError, match=message):
            paths.path_patching(tiny, task, (np.array(senders), np.array(slots)), progress=False)
    with pytest.raises(HeadlensError, match="slot index -1"):
        exact_edges(tiny, task, np.array([s]), np.array([-1]), progress=False)
    with pytest.raises(HeadlensError, match="triples"):
        paths.path_patching(tiny, task, [("L0H0", "L1H0")], progress=False)
    with pytest.raises(HeadlensError, match="non-empty list"):
        paths.sender_patching(tiny, task, [], progress=False)
    for corrupt in ("corrupted", "clean"):
        tokens = dict(clean=tiny_pair.clean, corrupted=tiny_pair.corrupted)
        tokens[corrupt] = tokens[corrupt] * 0 - 1
        pair = PromptPair(**tokens, positions=tiny_pair.positions, metric=tiny_pair.metric)
        with pytest.raises(HeadlensError, match="token id -1 is not in this model's vocabulary"):
            paths.path_patching(tiny, pair, [("L0H0", "L1H0", "k")], progress=False)
    with pytest.raises(HeadlensError, match="token id -1"):
        edge_attribution(tiny, CircuitTask("x", tiny_pair, tiny_pair.clean * 0 - 1), ablation="mean", progress=False)
    scores = torch.randn(g.n_senders, g.n_slots)
    with pytest.raises(HeadlensError, match=r"n must be an integer >= 0 \(got -1\)"):
        top_edges(g, scores, -1)
    with pytest.raises(HeadlensError, match="shape \\(16, 40\\) for this model, got \\(3, 3\\)"):
        top_edges(g, torch.zeros(3, 3), 5)
    with pytest.raises(HeadlensError, match="high must be an integer >= 1"):
        smallest_circuit(tiny, task, scores, 0, -1, ablation="resample")
    with pytest.raises(HeadlensError, match=f"need low < high <= {g.n_edges}"):
        smallest_circuit(tiny, task, scores, 0, 10**6, ablation="resample")
    with pytest.raises(HeadlensError, match="kept must be a \\[sender, slot\\] tensor"):
        circuit_metric(tiny, task, torch.ones(g.n_slots, dtype=torch.bool), ablation="resample")
    with pytest.raises(HeadlensError, match="kept must be a boolean"):
        circuit_metric(tiny, task, scores, ablation="resample")
    with pytest.raises(HeadlensError, match="percents must increase"):
        faithfulness(tiny, task, {"a": scores}, percents=[10, 10, 50], ablation="resample", progress=False)
    with pytest.raises(HeadlensError, match="find_circuit takes a CircuitTask \\(got PromptPair\\)"):
        find_circuit(tiny, tiny_pair, methods=["eap"], progress=False)
    with pytest.raises(HeadlensError, match="scores given for \\['eap-ig'\\], not among methods"):
        find_circuit(tiny, task, methods=["eap"], scores={"eap-ig": scores}, progress=False)
    with pytest.raises(HeadlensError, match="scores\\['eap'\\] must be a \\[sender, slot\\] tensor"):
        find_circuit(tiny, task, methods=["eap"], scores={"eap": torch.zeros(3, 3)}, progress=False)


# ---------------------------------------------------------------- EAP


def test_eap_is_the_derivative_of_path_patching(tiny, tiny_pair):
    """EAP's score for an edge = d/dε of the exact edge patch with source clean + ε (corrupted − clean), at ε = 0."""
    g = Graph.of(tiny)
    eap = edge_attribution(tiny, tiny_pair, method="eap", progress=False)
    edges = [("L0H1", "L2H3", "k"), ("MLP0", "L2H0", "q"), ("L1H2", "MLP1", "mlp"), ("L2H1", "logits", "logits")]
    s, r = (np.array(x) for x in zip(*[g.edge(*e) for e in edges]))
    eps = 1e-3
    with paths.split_inputs(tiny):
        setting = paths.prepare(tiny, tiny_pair.clean, tiny_pair.metric, corrupted=tiny_pair.corrupted, graph=g)
        setting.source = setting.clean.outputs + eps * (setting.source - setting.clean.outputs)
        tiny.to(torch.float64)
        try:
            setting.source, setting.clean.outputs = setting.source.double(), setting.clean.outputs.double()
            setting.clean.resid = [x.double() for x in setting.clean.resid]
            values = paths.run_edges(tiny, setting, paths.single_edges(g, s, r), progress=False)
            base = paths.run_edges(tiny, setting, [(torch.tensor([], dtype=torch.long),) * 2], progress=False)[0]
        finally:
            tiny.to(torch.float32)
    finite = (np.array(values) - base) / eps
    np.testing.assert_allclose(eap[torch.as_tensor(s), torch.as_tensor(r)].numpy(), finite, rtol=2e-2, atol=1e-4)
    assert np.abs(finite).max() > 1e-3


def test_eap_ig_with_one_step_is_the_gradient_at_the_corrupted_input(tiny, tiny_pair):
    """EAP-IG's first point is the corrupted embedding (α = 0); with one step EAP-IG is EAP taken there, so it
    differs from EAP (gradient at the clean run) but both are zero off the graph."""
    g = Graph.of(tiny)
    ig1 = edge_attribution(tiny, tiny_pair, method="eap-ig", steps=1, progress=False)
    eap = edge_attribution(tiny, tiny_pair, method="eap", progress=False)
    assert not torch.allclose(ig1, eap)
    assert (ig1[~g.valid] == 0).all() and (eap[~g.valid] == 0).all()
    with pytest.raises(HeadlensError, match="steps"):
        edge_attribution(tiny, tiny_pair, method="eap", steps=3)
    with pytest.raises(HeadlensError, match="unknown edge attribution"):
        edge_attribution(tiny, tiny_pair, method="acdc")


# ---------------------------------------------------------------- composition


def test_composition_matches_transformerlens_on_a_gqa_model(tiny):
    """Folded RMS norms and GQA: our factored scores (kv head's W_K/W_V per q head) equal TransformerLens'
    all_composition_scores (whose W_K/W_V repeat the kv heads)."""
    table = composition_scores(tiny, n_random=50)
    for kind in "QKV":
        tl = tiny.all_composition_scores(kind).detach()
        part = table[table.composition == kind.lower()]
        ref = tl[
            part.sender_layer.to_numpy(),
            part.sender_head.to_numpy(),
            part.receiver_layer.to_numpy(),
            part.receiver_head.to_numpy(),
        ].clone()
        np.testing.assert_allclose(part.score.to_numpy(), ref.numpy(), rtol=1e-4, atol=1e-6)
    assert len(table) == 3 * (4 * 4 + 8 * 4)  # pairs (earlier sender, later receiver) x q/k/v
    mean, std = random_baseline(64, 16, n_random=200, seed=0)
    assert 0 < std < mean < 1 and table["baseline"].iloc[0] == pytest.approx(random_baseline(64, 16, n_random=50)[0])


def test_composition_applies_an_unfolded_layernorm(toy):
    """The toy model keeps its LayerNorm weights: they are applied (so scores differ from the raw-weight ones)."""
    ours = composition_scores(toy, kinds=("k",), n_random=20)
    tl = toy.all_composition_scores("K").detach()
    raw = tl[
        ours.sender_layer.to_numpy(),
        ours.sender_head.to_numpy(),
        ours.receiver_layer.to_numpy(),
        ours.receiver_head.to_numpy(),
    ]
    assert not np.allclose(ours.score.to_numpy(), raw.numpy(), rtol=1e-3)


# ---------------------------------------------------------------- ground truth: planted and trained circuits


def _top_into(graph: Graph, scores: torch.Tensor, receiver: str, n: int = 1):
    """The edge (sender, input) of largest |score| into ``receiver``; with ``n`` > 1 the set of the top ``n``."""
    slots = [j for j, sl in enumerate(graph.slots) if sl.node == receiver]
    sub = (scores[:, slots].abs() * graph.valid[:, slots]).flatten()
    top = [divmod(int(i), len(slots)) for i in torch.argsort(sub, descending=True, stable=True)[:n]]
    found = [(graph.senders[s], graph.slots[slots[j]].input) for s, j in top]
    return found[0] if n == 1 else set(found)


def test_planted_circuit_is_recovered_by_composition_path_patching_and_eap(planted, planted_task):
    with torch.inference_mode():
        clean = planted_task.pair.metric.full(planted(planted_task.pair.clean))
    assert float(clean) > -0.1  # the planted circuit predicts the repeated half
    comp = composition_scores(planted, n_random=100)
    best = comp[comp.receiver == "L1H0"].sort_values("z", ascending=False).iloc[0]
    assert (best.sender, best.composition) == ("L0H0", "k") and best.z > 5
    assert top_senders(comp, "L1H0", "k", 1).sender[0] == "L0H0"
    g = Graph.of(planted)
    s, r = g.edge_index()
    exact = exact_edges(planted, planted_task, s, r, progress=False)
    exact_m = torch.zeros(g.n_senders, g.n_slots)
    exact_m[torch.as_tensor(s), torch.as_tensor(r)] = torch.as_tensor(exact, dtype=torch.float32)
    for scores in (
        exact_m,
        *(edge_attribution(planted, planted_task, method=m, progress=False) for m in ("eap", "eap-ig")),
    ):
        # the induction head needs its keys from the previous-token head and its values (the token to copy) from the
        # embedding; corrupting the first half breaks both, so both lead (the query reads the unchanged second half)
        assert _top_into(g, scores, "L1H0", 2) == {("L0H0", "k"), ("embed", "v")}
        assert _top_into(g, scores, "logits") == ("L1H0", "logits")
    # the planted heads are the circuit; the distractors are not (fair control: the same number of nodes)
    f = {nodes: circuit_metric(planted, planted_task, node_circuit(g, nodes), ablation="resample")["faithfulness"]
         for nodes in (("L0H0", "L1H0"), ("L0H1", "L1H1"))}  # fmt: skip
    assert f[("L0H0", "L1H0")] > 0.9 and abs(f[("L0H1", "L1H1")]) < 0.1


def test_toy_previous_token_to_induction_key_edge_is_the_top_edge_by_every_method(toy, toy_task):
    """The trained toy model's known circuit: its previous-token head feeds its induction head through K. Path
    patching (corrupted = first half resampled), EAP and EAP-IG all rank that edge first among edges into the
    induction head, and K-composition ranks the pair first among the induction head's senders."""
    from headlens.analysis.toy import circuit_heads

    heads = circuit_heads()
    prev, ind = "L{}H{}".format(*heads["previous_token"]), "L{}H{}".format(*heads["induction"])
    g = Graph.of(toy)
    s, r = receiver_senders(g, [(ind, kind) for kind in "qkv"])
    exact = exact_edges(toy, toy_task, s, r, progress=False)
    assert (g.senders[s[np.argmax(-exact)]], g.slots[r[np.argmax(-exact)]].input) == (prev, "k")
    for method in ("eap", "eap-ig"):
        scores = edge_attribution(toy, toy_task, method=method, ablation="resample", progress=False)
        assert _top_into(g, scores, ind) == (prev, "k"), method
    comp = composition_scores(toy, n_random=50)
    best = comp[comp.receiver == ind].sort_values("z", ascending=False).iloc[0]
    assert (best.sender, best.composition) == (prev, "k")


# ---------------------------------------------------------------- faithfulness


def test_area_and_faithfulness_bounds(toy, toy_task):
    assert area([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)
    g = Graph.of(toy)
    scores = edge_attribution(toy, toy_task, method="eap-ig", ablation="mean", progress=False)
    result = faithfulness(
        toy, toy_task, {"eap-ig": scores, "zero": torch.zeros_like(scores)}, percents=(10, 50, 100), progress=False
    )
    curves = result.table
    full = curves[curves.k == 100]
    assert np.allclose(full.faithfulness, 1.0) and (full.n_edges == g.n_edges).all()
    assert set(result.summary) == {"eap-ig", "zero"} and result.ablation == "mean"
    with torch.inference_mode():
        full_metric = float(toy_task.pair.metric.full(toy(toy_task.pair.clean)))
    assert result.full == pytest.approx(full_metric, abs=1e-5)
    # the ranking beats a ranking that knows nothing (every score 0: ties keep the graph's order) at half the edges
    half = curves[curves.k == 50].set_index("method").faithfulness
    assert half["eap-ig"] > half["zero"] + 0.3
    kept = top_edges(g, scores, g.n_edges)
    assert circuit_metric(toy, toy_task, kept)["faithfulness"] == pytest.approx(1.0)
    assert circuit_metric(toy, toy_task, torch.zeros_like(kept))["faithfulness"] == pytest.approx(0.0, abs=1e-6)


def test_find_circuit_on_the_toy_model_ties_scores_exact_checks_and_labels(toy, toy_task):
    from headlens.analysis.toy import toy_probes
    from headlens.census import run_census

    table = run_census(toy, toy_probes(toy, seed=0), progress=False).table
    result = find_circuit(
        toy, toy_task, check=30, ablation="resample", census=table, percents=(5, 20, 50, 100), progress=False
    )
    edges = result.edges
    assert len(edges) == 81 and edges["rank"].tolist() == list(range(1, 82))
    assert edges.exact.notna().sum() == 30 and edges.exact.notna().iloc[:30].all()
    assert {"sender", "receiver", "input", "score", "exact", "sender_label", "receiver_label"} <= set(edges.columns)
    assert set(edges.input) <= {"q", "k", "v", "mlp", "logits"}
    row = edges[(edges.sender == "L0H2") & (edges.receiver == "L1H2") & (edges.input == "k")].iloc[0]
    assert (row.sender_label, row.receiver_label) == ("previous_token", "induction")
    assert set(result.summary().method) == {"eap", "eap-ig", "exact"}
    assert result.nodes.set_index("node").loc["L1H2", "card"].startswith("L1H2 induction")
    assert result.edges.in_circuit.sum() == result.info["circuit_edges"] > 0
    assert recall_at([3, 2, 1, 0], [0.1, 3, 2, 0], 2) == 0.5


# ---------------------------------------------------------------- tasks


def test_induction_task_has_a_separate_mean_set(toy):
    task = induction_task(toy, n_tokens=6, n_seqs=3, n_mean=5, seed=2)
    assert isinstance(task, CircuitTask) and task.n_seqs == 3 and task.mean_tokens.shape == (5, task.seq_len)
    assert not any(torch.equal(m, c) for m in task.mean_tokens for c in task.pair.clean)


def test_text_tasks_need_a_tokenizer_and_one_token_words(toy, tiny):
    from headlens.circuits.tasks import build_task, ioi_task

    with pytest.raises(HeadlensError, match="tokenizer"):
        ioi_task(toy)
    with pytest.raises(HeadlensError, match="one token with a leading space"):
        ioi_task(tiny)  # the tiny BPE vocabulary holds almost no names as single tokens
    with pytest.raises(HeadlensError, match="unknown task"):
        build_task(toy, "greater-than")


# ---------------------------------------------------------------- CLI and HTML


def run_cli(args):
    from typer.testing import CliRunner

    from headlens.cli import app

    return CliRunner().invoke(app, args, catch_exceptions=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "toy", "--task", "ioi"], "toy model has no tokenizer"),
        (["--clean", "a b"], "give both --clean and --corrupted"),
        (["--task", "ioi", "--clean", "a", "--corrupted", "b"], "not both"),
        ([], "give --task"),
        (["--clean", "a b", "--corrupted", "a c", "--ablation", "mean"], "--ablation resample"),
        (["--task", "induction", "--methods", "eap,acdc"], "unknown method"),
        (["--task", "induction", "--check", "-1"], "--check must be at least 0"),
        (["--task", "induction", "--steps", "0"], "--steps must be at least 1"),
        (["--task", "induction", "--correct", " x"], "--correct/--wrong go with"),
    ],
)
def test_circuit_cli_rejects_bad_arguments_before_loading(tmp_path, capsys, args, message):
    from headlens.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["circuit", "--out", str(tmp_path / "out"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err and "loading" not in err and not (tmp_path / "out").exists()


def test_circuit_cli_on_the_toy_model_writes_every_file(tmp_path):
    out = tmp_path / "circ"
    res = run_cli(["circuit", "--task", "induction", "--model", "toy", "--out", str(out), "--check", "20", "--steps", "2",
                   "--ablation", "resample", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    edges = pd.read_csv(out / "edges.csv")
    nodes = pd.read_csv(out / "nodes.csv")
    faith = pd.read_csv(out / "faithfulness.csv")
    assert {"sender", "receiver", "input", "score", "exact"} <= set(edges.columns) and len(edges) == 81
    assert edges.exact.notna().sum() == 20 and set(faith.method) == {"eap", "eap-ig", "exact"}
    assert set(faith.k) == {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100} and "label" in nodes
    assert re.fullmatch(r"L\d+H\d+|embed", edges.sender.iloc[0])
    page = (out / "circuit.html").read_text()
    assert page.count("var CircuitsVis=") == 1 and "unpkg.com" not in page and "cdn.jsdelivr" not in page
    assert "<svg" in page and page.count("<title>") > 10 and "L0H2 → L1H2 [k]" in page
    assert "CPR" in res.output.upper() and "L0H2" in res.output


def test_circuit_html_escapes_token_strings(toy, toy_task):
    """A token string that looks like markup reaches the page only escaped (CircuitsVis 'heads' draws on a canvas and
    gets raw text inside JSON that cannot close the script)."""
    from headlens.render.circuit import circuit_html

    result = find_circuit(
        toy, toy_task, methods=("eap",), check=5, ablation="resample", percents=(50, 100), progress=False
    )
    import headlens.engine.capture as capture

    original = capture.str_tokens
    capture.str_tokens = lambda model, ids: ["<script>alert(1)</script>" for _ in ids]
    try:
        page = circuit_html(result, toy)
    finally:
        capture.str_tokens = original
    assert "<script>alert(1)</script>" not in page and "\\u003cscript\\u003ealert(1)" in page


# ---------------------------------------------------------------- Ray


def _first_token_logprob(logits):
    """Picklable by value (conftest's jaxtyping import hook makes headlens' own metric closures unpicklable)."""
    return logits.log_softmax(-1)[..., 0].mean()


def test_exact_checks_on_ray_equal_one_process(toy, toy_task, one_thread):
    ray = pytest.importorskip("ray")
    import sys

    from headlens.engine.executor import RayExecutor

    pair = toy_task.pair
    picklable = CircuitTask(
        "induction", PromptPair(pair.clean, pair.corrupted, pair.positions, _first_token_logprob), toy_task.mean_tokens
    )
    g = Graph.of(toy)
    s, r = receiver_senders(g, [("L1H2", "k"), ("L1H0", "v"), ("logits", "logits")])
    local = exact_edges(toy, picklable, s, r, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20)
    try:
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        with RayExecutor(2) as ex:
            remote = exact_edges(toy, picklable, s, r, executor=ex, progress=False)
            assert ex.computed == 2  # one shard per receiver layer (1, and the logits)
    finally:
        ray.shutdown()
    np.testing.assert_array_equal(local, remote)
    assert math.isfinite(float(np.abs(local).max()))


def test_brackets_task_swaps_one_opener_and_its_answer(tiny):
    from headlens.circuits.tasks import brackets_task

    task = brackets_task(tiny, n_seqs=4, n_mean=4, seq_len=24, seed=0)
    clean, corrupted = task.pair.clean, task.pair.corrupted
    assert clean.shape == corrupted.shape == task.mean_tokens.shape == (4, 24)
    assert ((clean != corrupted).sum(1) == 1).all()  # exactly the opener changed
    swap = {"(": "[", "[": "("}
    for before, after in zip(clean[clean != corrupted].tolist(), corrupted[clean != corrupted].tolist()):
        text = tiny.to_string([before])
        bracket = next(ch for ch in text if ch in swap)
        assert tiny.to_string([after]) == text.replace(bracket, swap[bracket], 1)  # the opener's bracket, swapped
    right = [tiny.to_string([t]).lstrip()[0] for t in task.info["correct"]]
    assert set(right) <= {")", "]"}
    assert not any(torch.equal(m, c) for m in task.mean_tokens for c in clean)  # a separate mean set


@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_small_circuits_built_from_the_source_side_equal_the_direct_sum(tiny, ablation):
    """A run that keeps few edges into a receiver builds its input as source residual + kept edges; the same runs
    computed edge by edge over the corrupted ones (source_run=None forces that) give the same metric."""
    g = Graph.of(tiny)
    task = induction_task(tiny, n_tokens=5, n_seqs=2, n_mean=4, seed=1)
    scores = edge_attribution(tiny, task, method="eap", ablation=ablation, progress=False)
    runs = [paths.mask_run(g.valid & ~top_edges(g, scores, n)) for n in (0, 5, 40, g.n_edges // 2)]
    with paths.split_inputs(tiny):
        setting = paths.prepare(
            tiny, task.pair.clean, task.pair.metric, corrupted=task.pair.corrupted, mean_tokens=task.mean_tokens,
            ablation=ablation, graph=g,
        )  # fmt: skip
        fast = paths.run_edges(tiny, setting, runs, runs_per_pass=2, progress=False)
        setting.source_run = None
        slow = paths.run_edges(tiny, setting, runs, runs_per_pass=2, progress=False)
    np.testing.assert_allclose(fast, slow, atol=2e-5)
    assert fast[0] != pytest.approx(fast[-1], abs=1e-3)  # the circuits differ


def _close(got, want, path=""):
    """JSON values equal, floats to 1e-3 (the committed file is rounded to 4 places)."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _close(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, abs=1e-3), path
    else:
        assert got == want, path


def test_circuits_script_regenerates_the_committed_toy_results(tmp_path):
    """analyses/circuits.py --part toy (the trained toy model's circuit, seconds) writes what is committed: the
    script's Qwen parts share its code paths, so an API change that breaks them shows here too."""
    import json

    from scripts import ROOT, load_script

    script = load_script("analyses/circuits.py")
    script.toy_study(0, tmp_path)
    committed = json.loads((ROOT / "analyses" / "results" / "circuits" / "toy.json").read_text())
    _close(json.loads((tmp_path / "toy.json").read_text()), committed)


def test_circuit_headlines_in_the_docs_are_the_committed_qwen_results():
    """The Qwen circuit numbers docs/findings.md and docs/circuits.md both quote (edge count, the smallest IOI edge
    circuit, the induction circuit's EAP-IG CPR/CMD with mean ablation) are analyses/results/circuits'; the slow
    tests/test_circuits_qwen.py regenerates part of those files."""
    import json
    from pathlib import Path

    from docs_numbers import doc_text

    results = Path(__file__).parents[1] / "analyses" / "results" / "circuits"
    induction = json.loads((results / "induction.json").read_text())
    small = json.loads((results / "ioi.json").read_text())["smallest_edge_circuit"]
    eap_ig = induction["circuits"]["mean"]["faithfulness"]["eap-ig"]
    for page in ("findings", "circuits"):
        text = doc_text(page)
        assert f"{induction['n_edges']:,} edges" in text, page
        assert f"{small['n_edges']} edges ({small['percent_of_edges']:.2f} %)" in text, page
        assert f"{small['faithfulness']:.3f}" in text.split(f"{small['n_edges']} edges")[1][:40], page
        assert f"CPR {eap_ig['cpr']:.3f}, CMD {eap_ig['cmd']:.3f}" in text, page


def test_circuits_study_regenerates_its_induction_part_on_a_tiny_qwen(tmp_path):
    """analyses/circuits.py --part induction on a tiny random Qwen (its smoke mode): the committed files' schema, and
    the faithfulness curves agree with the summary's areas, as the committed Qwen run's do (test_circuits_qwen)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_circuits_qwen import RESULTS, check_faithfulness

    script = Path(__file__).resolve().parents[1] / "analyses" / "circuits.py"
    args = ["--model", "tiny-qwen2", "--part", "induction", "--out", str(tmp_path)]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True, timeout=900)
    for name in ("induction_k_senders.csv", "induction_composition.csv", "induction_faithfulness.csv"):
        assert list(pd.read_csv(tmp_path / name).columns) == list(pd.read_csv(RESULTS / name).columns), name
    got, committed = (json.loads((d / "induction.json").read_text()) for d in (tmp_path, RESULTS))
    assert set(got) == set(committed) and got["model"] == "tiny-qwen2"
    check_faithfulness(tmp_path, ("induction",))

"""Circuits on the real offline Qwen (slow): the committed results files say what docs/circuits.md says, and a small
part of them is regenerated here (the path-patching effect of a few k-input edges of L9H8 on the same induction task)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from headlens.circuits.faithfulness import area

RESULTS = Path(__file__).resolve().parents[1] / "analyses" / "results" / "circuits"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "circuits.json"
CENSUS = Path(__file__).resolve().parents[1] / "analyses" / "results" / "census_trust" / "census_seed0.csv"

pytestmark = pytest.mark.slow


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def test_induction_results_rank_previous_token_heads_first_into_the_induction_keys():
    summary = _json("induction.json")
    census = pd.read_csv(CENSUS).set_index(["layer", "head"])
    senders = pd.read_csv(RESULTS / "induction_k_senders.csv")
    assert summary["heads"] == ["L9H8", "L9H13", "L11H12"]
    for head in summary["heads"]:
        part = senders[senders.receiver == head].sort_values("exact_rank")
        layer = int(head[1 : head.index("H")])
        assert len(part) == 1 + 15 * layer  # every sender into the k input, path patched
        assert summary["k_senders"][head]["top_exact"][0]["sender"] == part.sender.iloc[0]
        for k in ("5", "10"):
            assert 0 <= summary["k_senders"][head]["recall_eap_ig"][k] <= 1
    top = senders[(senders.receiver == "L9H8") & (senders.exact_rank == 1)].iloc[0]
    assert top.sender_label == "previous_token" and census.loc[(8, 7), "label"] == "previous_token"


def test_faithfulness_files_agree_with_their_summaries():
    check_faithfulness(RESULTS, ("induction", "ioi"))


def check_faithfulness(results: Path, studies) -> None:
    """Each faithfulness curve of ``studies`` in ``results`` has the areas (CPR, CMD) its summary states and reaches 1
    with every edge kept."""
    summaries = {study: json.loads((results / f"{study}.json").read_text()) for study in studies}
    frames = {study: pd.read_csv(results / f"{study}_faithfulness.csv") for study in studies}
    parts = []
    if "induction" in studies:
        parts += [("induction", "ablation", a, summaries["induction"]["circuits"][a]["faithfulness"])
                  for a in ("mean", "resample")]  # fmt: skip
    if "ioi" in studies:
        parts += [("ioi", "ranking", order, summaries["ioi"]["faithfulness"][order]) for order in ("abs", "signed")]
    for study, column, key, stats in parts:
        sub = frames[study][frames[study][column] == key]
        for method, values in stats.items():
            c = sub[sub.method == method].sort_values("k")
            assert len(c) == 10
            assert area(c.fraction, c.faithfulness) == pytest.approx(values["cpr"], abs=1e-3)
            assert area(c.fraction, (1 - c.faithfulness).abs()) == pytest.approx(values["cmd"], abs=1e-3)
            assert c[c.k == 100].faithfulness.iloc[0] == pytest.approx(1.0, abs=1e-4)


def test_ioi_circuit_reaches_the_target_and_carries_census_labels():
    summary = _json("ioi.json")
    nodes = pd.read_csv(RESULTS / "ioi_nodes.csv")
    smallest = summary["smallest_edge_circuit"]
    assert summary["clean_metric"] > 1 and smallest["faithfulness"] >= 0.8
    assert [n for n, f in smallest["probes"] if f >= 0.8 and n < smallest["n_edges"]] == []  # none smaller reached it
    assert smallest["n_edges"] < 0.01 * summary["n_edges"]
    heads = nodes[nodes.kind == "head"]
    assert heads.label.notna().all() and (heads.card.str.split().str[0] == heads.node).all()
    assert {r["node"] for r in summary["roles"]} == set(heads.node)


def test_benchmark_says_the_exact_cost_is_projected_and_reports_two_runs():
    record = json.loads(BENCH.read_text())
    assert "projected" in record["exact"] and len(record["runs"]) >= 2 and record["n_edges"] == 179749
    assert record["ratio_exact_over_eap_ig"]["min"] > 10


def test_path_patching_regenerates_committed_k_sender_effects(qwen):
    """Same task (seed 0, 4 x 21 tokens): three committed exact effects into L9H8's keys come out again."""
    from headlens.circuits.paths import path_patching
    from headlens.circuits.tasks import induction_task

    senders = pd.read_csv(RESULTS / "induction_k_senders.csv")
    part = senders[senders.receiver == "L9H8"].sort_values("exact_rank").iloc[[0, 1, -1]]
    task = induction_task(qwen, n_tokens=10, n_seqs=4, n_mean=8, seed=0)
    torch.set_num_threads(2)
    table = path_patching(qwen, task, [(s, "L9H8", "k") for s in part.sender], progress=False).table
    np.testing.assert_allclose(table.delta.to_numpy(), part.exact.to_numpy(), atol=2e-4)


def test_ioi_prompts_are_one_length_with_one_token_names(qwen):
    from headlens.circuits.tasks import ioi_task

    task = ioi_task(qwen, n_seqs=12, n_mean=4, seed=5)
    assert task.pair.clean.shape == (12, 15) == task.pair.corrupted.shape and task.mean_tokens.shape == (4, 15)
    with torch.inference_mode():
        logits = qwen(task.pair.clean)[:, -1]
    io = torch.tensor([qwen.to_single_token(" " + n) for n in task.info["io"]])
    s = torch.tensor([qwen.to_single_token(" " + n) for n in task.info["s"]])
    diff = logits[torch.arange(12), io] - logits[torch.arange(12), s]
    assert (diff > 0).float().mean() >= 0.9  # the model does IOI on these prompts
    assert task.info["examples"][0].split()[1] != task.info["examples"][1].split()[1]  # ABBA then BABA


def test_circuit_results_carry_the_committed_census_labels():
    """Every census label the circuit results print is the label of the census they read (census_seed0.csv): a
    census change that relabels heads must regenerate them (analyses/circuits.py --part induction / ioi)."""
    census = pd.read_csv(CENSUS)
    label = {f"L{a}H{b}": lab for a, b, lab in zip(census.layer, census["head"], census.label)}
    for name, node, col in (
        ("induction_composition.csv", "sender", "sender_label"),
        ("induction_composition.csv", "receiver", "receiver_label"),
        ("induction_k_senders.csv", "sender", "sender_label"),
        ("ioi_nodes.csv", "node", "label"),
        ("ioi_edges.csv", "sender", "sender_label"),
        ("ioi_edges.csv", "receiver", "receiver_label"),
    ):
        table = pd.read_csv(RESULTS / name)
        heads = table[table[node].isin(label)]
        assert len(heads), name
        stale = heads[heads[col] != heads[node].map(label)]
        assert stale.empty, (name, stale[[node, col]].head().to_dict("records"))
    roles = _json("ioi.json")["roles"]
    assert all(r["census_label"] == label[r["node"]] for r in roles)

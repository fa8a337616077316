"""The default Qwen's induction and IOI circuits (issue 26), from composition, edge attribution and exact path patching.

Induction (repeated random tokens [P A A] vs [P B A], 4 sequences x 21 tokens): for the three strongest induction
heads of the census (``analyses/results/census_trust/census_seed0.csv``) every sender into their k input is path
patched exactly (corrupted-prompt source: what the keys of that head alone lose when one sender's output comes from
the corrupted prompt); EAP, EAP-IG and K-composition are scored against that ranking (recall of the exact top 5/10).
Then the faithfulness curves of EAP, EAP-IG and exact (top EAP-IG edges checked exactly, re-ranked) with mean
ablation (means over 8 other repeated sequences) and with resample ablation.

IOI (8 generated prompts, ABBA/BABA, 6 templates, 15 tokens; metric logit(IO) − logit(S)): EAP, EAP-IG (mean
ablation over 16 other IOI prompts), exact check of the top 150 EAP-IG edges, faithfulness curves with edges ranked
by |score| and by signed score, the smallest edge circuit reaching faithfulness 0.8 (bisection between grid points), the smallest circuit of top nodes reaching 0.8,
and the roles of its heads from their attention (END -> IO / S1 / S2; S2 -> S1, S1 + 1) and their place in the graph,
beside their census labels.

    python analyses/circuits.py                 # every part, ~45 min on 2 shared CPU cores (seed 0)
    python analyses/circuits.py --part ioi      # one part (toy: seconds; induction ~14 min; ioi ~29 min)
    python analyses/circuits.py --model tiny-qwen2 --part induction --out /tmp/c   # the same code on a tiny Qwen
                                                # (IOI needs a word-level vocabulary such as Qwen's)

The toy part (seconds) runs the trained toy model's circuit with both ablations (toy.json), the worked example of
docs/circuits.md.

Writes analyses/results/circuits/: toy.json, induction.json, induction_k_senders.csv, induction_composition.csv,
induction_faithfulness.csv, ioi.json, ioi_edges.csv, ioi_nodes.csv, ioi_faithfulness.csv.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import study_args, study_model, write_summary  # noqa: E402

from headlens.census.run import run_census  # noqa: E402
from headlens.circuits.composition import composition_scores  # noqa: E402
from headlens.circuits.edges import edge_attribution  # noqa: E402
from headlens.circuits.faithfulness import (  # noqa: E402
    circuit_metric,
    exact_key,
    faithfulness,
    node_circuit,
    smallest_circuit,
)
from headlens.circuits.graph import Graph, node_head  # noqa: E402
from headlens.circuits.study import exact_edges, find_circuit, recall_at, receiver_senders  # noqa: E402
from headlens.circuits.tasks import induction_task, ioi_positions, ioi_task  # noqa: E402
from headlens.io import write_csv  # noqa: E402
from headlens.models import DEFAULT_MODEL  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "circuits"
CENSUS = Path(__file__).resolve().parent / "results" / "census_trust" / "census_seed0.csv"
N_INDUCTION_HEADS = 3
IG_STEPS = 5
NODE_GRID = (5, 10, 20, 30, 40, 60, 80, 120, 160, 240, 361)


def _r(x: float, nd: int = 4) -> float:
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def _faith_summary(result) -> dict:
    out = {}
    for method, v in result.faithfulness.summary.items():
        out[method] = {k: (_r(x) if isinstance(x, float) else x) for k, x in v.items()}
    return out


# ---------------------------------------------------------------- induction


def induction_study(model, census: pd.DataFrame, seed: int, out: Path) -> dict:
    started = time.perf_counter()
    graph = Graph.of(model)
    labelled = census[census.label == "induction"]
    if not len(labelled):  # a tiny random model: its strongest in the last layer (senders enough for recall@10)
        labelled = census[census.layer == census.layer.max()]
    heads = labelled.nlargest(N_INDUCTION_HEADS, "induction")
    names = [f"L{int(r.layer)}H{int(r['head'])}" for _, r in heads.iterrows()]
    task = induction_task(model, n_tokens=10, n_seqs=4, n_mean=8, seed=seed)
    timings = {}

    t = time.perf_counter()
    comp = composition_scores(model, census=census, seed=seed)
    timings["composition_all_pairs"] = time.perf_counter() - t
    write_csv(comp[comp.receiver.isin(names)].reset_index(drop=True), out / "induction_composition.csv")

    scores = {}
    for ablation in ("resample", "mean"):
        for method in ("eap", "eap-ig"):
            t = time.perf_counter()
            scores[ablation, method] = edge_attribution(
                model,
                task,
                method=method,
                steps=IG_STEPS if method == "eap-ig" else None,
                ablation=ablation,
                graph=graph,
            )
            timings[f"{method}_{ablation}"] = time.perf_counter() - t

    # every sender into the k input of each head, path patched exactly (resample)
    s, r = receiver_senders(graph, [(n, "k") for n in names])
    t = time.perf_counter()
    exact = exact_edges(model, task, s, r, ablation="resample")
    timings["exact_k_senders"] = time.perf_counter() - t
    idx = (torch.as_tensor(s), torch.as_tensor(r))
    kcomp = comp[comp.composition == "k"].set_index(["sender", "receiver"])
    labels = {(int(a), int(b)): lab for a, b, lab in zip(census.layer, census["head"], census.label)}
    table = pd.DataFrame(
        {
            "receiver": [graph.slots[j].node for j in r],
            "sender": [graph.senders[i] for i in s],
            "exact": exact,
            "eap": scores["resample", "eap"][idx].double().numpy(),
            "eap_ig": scores["resample", "eap-ig"][idx].double().numpy(),
        }
    )
    table["k_composition_z"] = [
        kcomp.z.get((a, b), np.nan) if node_head(a) is not None else np.nan
        for a, b in zip(table.sender, table.receiver)
    ]
    table["sender_label"] = [
        labels.get(tuple(node_head(a)), "") if node_head(a) is not None else a.rstrip("0123456789").lower()
        for a in table.sender
    ]
    table["exact_rank"] = table.groupby("receiver").exact.rank(method="first").astype(int)  # most negative first
    table = table.sort_values(["receiver", "exact_rank"]).reset_index(drop=True)
    write_csv(table, out / "induction_k_senders.csv")
    per_head = {}
    for name in names:
        part = table[table.receiver == name]
        heads_only = part[part.k_composition_z.notna()]
        per_head[name] = {
            "n_senders": len(part),
            "top_exact": [
                {"sender": a, "label": lab, "exact": _r(e), "eap_ig": _r(g), "k_composition_z": _r(z, 2)}
                for a, lab, e, g, z in part.head(5)[
                    ["sender", "sender_label", "exact", "eap_ig", "k_composition_z"]
                ].itertuples(index=False)
            ],
            "recall_eap_ig": {str(k): recall_at(part.exact, part.eap_ig, k) for k in (5, 10)},
            "recall_eap": {str(k): recall_at(part.exact, part.eap, k) for k in (5, 10)},
            "recall_k_composition_heads_only": {
                str(k): recall_at(heads_only.exact, heads_only.k_composition_z.clip(lower=0), k) for k in (5, 10)
            },
            "chance_recall": {str(k): k / len(part) for k in (5, 10)},
            "spearman_eap_ig_vs_exact": _r(spearmanr(part.exact, part.eap_ig).statistic),
            "spearman_eap_vs_exact": _r(spearmanr(part.exact, part.eap).statistic),
        }
    pooled = {
        str(k): {"eap_ig": recall_at(table.exact, table.eap_ig, k), "eap": recall_at(table.exact, table.eap, k)}
        for k in (10, 20)
    }

    # faithfulness of EAP, EAP-IG and exact (top EAP-IG edges checked exactly) with both ablations
    faith, circuits = [], {}
    for ablation, check in (("mean", 200), ("resample", 200)):
        t = time.perf_counter()
        result = find_circuit(
            model,
            task,
            check=check,
            ablation=ablation,
            census=census,
            scores={m: scores[ablation, m] for m in ("eap", "eap-ig")},
            progress=False,
        )
        timings[f"find_circuit_{ablation}"] = time.perf_counter() - t
        faith.append(result.faithfulness.table.assign(ablation=ablation))
        top = result.circuit_edges().head(15)
        circuits[ablation] = {
            "clean_metric": _r(result.info["clean_metric"]),
            "all_edges_ablated_metric": _r(result.info["ablated_metric"]),
            "faithfulness": _faith_summary(result),
            "circuit": {k: result.info[k] for k in ("circuit_method", "circuit_k", "circuit_edges")},
            "checked": result.info["checked"],
            "top_edges": [
                {
                    "edge": f"{a} -> {b}[{i}]",
                    "labels": f"{la} -> {lb}",
                    "score": _r(sc),
                    "exact": _r(ex),
                }
                for a, b, i, la, lb, sc, ex in top[
                    ["sender", "receiver", "input", "sender_label", "receiver_label", "score", "exact"]
                ].itertuples(index=False)
            ],
        }
    write_csv(pd.concat(faith, ignore_index=True), out / "induction_faithfulness.csv")
    summary = {
        "model": model.cfg.model_name,
        "task": {k: v for k, v in task.info.items()},
        "seq_len": task.seq_len,
        "n_edges": graph.n_edges,
        "heads": names,
        "head_census_induction": [_r(x) for x in heads.induction],
        "composition_baseline": {"mean": _r(comp["baseline"].iloc[0]), "std": _r(comp["baseline_std"].iloc[0])},
        "k_senders": per_head,
        "pooled_recall_over_all_k_senders": pooled,
        "circuits": circuits,
        "ig_steps": IG_STEPS,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_summary(out / "induction.json", summary)
    return summary


# ---------------------------------------------------------------- IOI


def _attention_stats(model, task, heads: list[str]) -> pd.DataFrame:
    """Per head, mean attention (over prompts) from END to IO, S1, S2 and from S2 to S1, S1 + 1, and previous-token
    attention at S1 + 1 (to S1)."""
    pos = ioi_positions(model, task)
    layers = sorted({node_head(h).layer for h in heads})
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    with torch.inference_mode():
        _, cache = model.run_with_cache(task.pair.clean, names_filter=lambda n: n in names)
    rows = []
    b = torch.arange(task.n_seqs)
    for h in heads:
        head = node_head(h)
        p = cache[f"blocks.{head.layer}.attn.hook_pattern"][:, head.head].float().cpu()  # batch q k
        end, io, s1, s2 = pos["END"], pos["IO"], pos["S1"], pos["S2"]
        rows.append(
            {
                "node": h,
                "end_to_io": float(p[b, end, io].mean()),
                "end_to_s1": float(p[b, end, s1].mean()),
                "end_to_s2": float(p[b, end, s2].mean()),
                "s2_to_s1": float(p[b, s2, s1].mean()),
                "s2_to_s1_plus_1": float(p[b, s2, s1 + 1].mean()),
                "s1_plus_1_to_s1": float(p[b, s1 + 1, s1].mean()),
            }
        )
    return pd.DataFrame(rows)


def _roles(nodes: pd.DataFrame, edges: pd.DataFrame, attention: pd.DataFrame, empty_gap: float) -> pd.DataFrame:
    """A role per circuit head from its direct effect on the logits, its attention, and whom it feeds.

    - name mover: its direct edge to the logits lowers logit(IO) − logit(S) when ablated by >= 5 % of the clean −
      ablated gap, and at END it attends to IO more than to S1 and S2;
    - negative name mover: the same edge raises the metric when ablated (>= 5 %), attending IO;
    - S-inhibition: attends END -> S2 (or S1) more than to IO and feeds a name mover's q input;
    - induction / duplicate token / previous token: at S2 attends S1 + 1 / S1, or at S1 + 1 attends S1 (>= 0.3);
    - other: none of these.
    """
    att = attention.set_index("node")
    direct = edges[edges.input == "logits"].set_index("sender").score
    movers = set()
    rows = []
    for name in nodes.node:
        a = att.loc[name]
        d = float(direct.get(name, 0.0))
        role = "other"
        if d <= -0.05 * empty_gap and a.end_to_io > max(a.end_to_s1, a.end_to_s2):
            role = "name mover"
        elif d >= 0.05 * empty_gap and a.end_to_io > max(a.end_to_s1, a.end_to_s2):
            role = "negative name mover"
        rows.append({"node": name, "role": role, "direct_logit_score": d})
        if role == "name mover":
            movers.add(name)
    into_movers = edges[(edges.receiver.isin(movers)) & (edges.input == "q")].groupby("sender").score.sum()
    for row in rows:
        if row["role"] != "other":
            continue
        a = att.loc[row["node"]]
        if float(into_movers.get(row["node"], 0.0)) < 0 and max(a.end_to_s2, a.end_to_s1) > a.end_to_io:
            row["role"] = "S-inhibition"
        elif a.s2_to_s1_plus_1 >= 0.3:
            row["role"] = "induction"
        elif a.s2_to_s1 >= 0.3:
            row["role"] = "duplicate token"
        elif a.s1_plus_1_to_s1 >= 0.3:
            row["role"] = "previous token"
    return pd.DataFrame(rows)


def ioi_study(model, census: pd.DataFrame, seed: int, out: Path) -> dict:
    started = time.perf_counter()
    graph = Graph.of(model)
    task = ioi_task(model, n_seqs=8, n_mean=16, seed=seed)
    timings = {}
    t = time.perf_counter()
    result = find_circuit(model, task, check=150, ablation="mean", census=census, steps=IG_STEPS, progress=False)
    timings["find_circuit"] = time.perf_counter() - t
    full, empty = result.info["clean_metric"], result.info["ablated_metric"]
    # the same rankings ordered by signed score (edges whose ablation lowers logit(IO) - logit(S) first)
    checked = ~torch.isnan(result.scores["exact"])
    signed_rankings = {
        "eap": result.scores["eap"],
        "eap-ig": result.scores["eap-ig"],
        "exact": exact_key(result.scores["eap-ig"], torch.nan_to_num(result.scores["exact"]), checked, signed=True),
    }
    t = time.perf_counter()
    signed = faithfulness(model, task, signed_rankings, ablation="mean", signed=True, progress=False)
    timings["faithfulness_signed"] = time.perf_counter() - t
    curves = pd.concat(
        [result.faithfulness.table.assign(ranking="abs"), signed.table.assign(ranking="signed")], ignore_index=True
    )
    write_csv(curves, out / "ioi_faithfulness.csv")
    summary_f = {
        "abs": _faith_summary(result),
        "signed": {
            m: {k: (_r(x) if isinstance(x, float) else x) for k, x in v.items()} for m, v in signed.summary.items()
        },
    }

    # the smallest edge circuit reaching 0.8: bisection below the first grid point that reaches it, for the ranking
    # (method and order) that reaches it with the fewest edges
    hits = [
        (v["n_edges_at_target"], order, m)
        for order, methods in summary_f.items()
        for m, v in methods.items()
        if v["n_edges_at_target"] is not None
    ]
    smallest = None
    if hits:
        high, order, best = min(hits)
        frame = (result.faithfulness if order == "abs" else signed).table
        curve = frame[frame.method == best]
        below = curve[curve.n_edges < high]
        low = int(below.n_edges.max()) if len(below) else 0
        if order == "signed":
            key = signed_rankings[best]
        elif best == "exact":
            key = exact_key(result.scores["eap-ig"], torch.nan_to_num(result.scores["exact"]), checked)
        else:
            key = result.scores[best]
        t = time.perf_counter()
        found = smallest_circuit(model, task, key, low, int(high), ablation="mean", signed=order == "signed")
        timings["bisection"] = time.perf_counter() - t
        smallest = {
            "method": best,
            "ranking": order,
            "n_edges": found["n"],
            "percent_of_edges": _r(100 * found["n"] / graph.n_edges, 3),
            "faithfulness": _r(found["faithfulness"]),
            "probes": [(n, _r(f)) for n, f in found["probes"]],
        }

    # the smallest circuit of top nodes (by |outgoing EAP-IG|) reaching 0.8
    nodes = result.nodes[result.nodes.kind.isin(["head", "mlp"])]
    order = nodes.sort_values("abs_score", ascending=False).node.tolist()
    t = time.perf_counter()
    node_curve, node_hit = [], None
    for m in NODE_GRID:
        chosen = order[: min(m, len(order))]
        f = circuit_metric(model, task, node_circuit(graph, chosen), ablation="mean")["faithfulness"]
        node_curve.append((len(chosen), _r(f)))
        if f >= 0.8:
            node_hit = chosen
            break
    timings["node_circuit"] = time.perf_counter() - t

    circuit_nodes = node_hit or order[:30]
    heads = [n for n in circuit_nodes if node_head(n) is not None]
    attention = _attention_stats(model, task, heads)
    roles = _roles(result.nodes[result.nodes.node.isin(heads)], result.edges, attention, abs(full - empty))
    table = (
        result.nodes[result.nodes.node.isin(circuit_nodes)]
        .merge(roles, on="node", how="left")
        .merge(attention, on="node", how="left")
    )
    table["role"] = table["role"].fillna(table["kind"])
    table = table.sort_values("abs_score", ascending=False).reset_index(drop=True)
    write_csv(table, out / "ioi_nodes.csv")
    edges = result.edges
    keep = edges.exact.notna() | (edges["rank"] <= 1000)
    write_csv(edges[keep].reset_index(drop=True), out / "ioi_edges.csv")
    head_rows = table[table.kind == "head"]
    crosstab = pd.crosstab(head_rows.role, head_rows.label)
    summary = {
        "model": model.cfg.model_name,
        "task": {k: v for k, v in task.info.items() if k not in ("io", "s")},
        "seq_len": task.seq_len,
        "n_edges": graph.n_edges,
        "clean_metric": _r(full),
        "corrupted_metric_resample": None,
        "all_edges_mean_ablated_metric": _r(empty),
        "faithfulness": summary_f,
        "grid_circuit": {k: result.info[k] for k in ("circuit_method", "circuit_k", "circuit_edges")},
        "smallest_edge_circuit": smallest,
        "node_circuit": {
            "reached_0.8": node_hit is not None,
            "curve": node_curve,
            "nodes": circuit_nodes,
        },
        "roles": [
            {
                "node": r.node,
                "role": r.role,
                "census_label": r.label,
                "card": r.card,
                "direct_logit_score": _r(r.direct_logit_score),
                "end_to_io": _r(r.end_to_io, 3),
                "end_to_s1": _r(r.end_to_s1, 3),
                "end_to_s2": _r(r.end_to_s2, 3),
            }
            for r in head_rows.itertuples()
        ],
        "role_by_census_label": {role: {k: int(v) for k, v in row.items() if v} for role, row in crosstab.iterrows()},
        "top_edges": [
            {"edge": f"{a} -> {b}[{i}]", "labels": f"{la} -> {lb}", "eap_ig": _r(sc), "exact": _r(ex)}
            for a, b, i, la, lb, sc, ex in edges.head(20)[
                ["sender", "receiver", "input", "sender_label", "receiver_label", "score", "exact"]
            ].itertuples(index=False)
        ],
        "checked": result.info["checked"],
        "ig_steps": IG_STEPS,
        "seconds": {
            **{k: round(v, 1) for k, v in timings.items()},
            **{f"find_{k}": round(v, 1) for k, v in result.info["seconds"].items()},
        },
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    with torch.inference_mode():
        corrupted = task.pair.metric.full(model(task.pair.corrupted))
    summary["corrupted_metric_resample"] = _r(float(corrupted))
    write_summary(out / "ioi.json", summary)
    return summary


# ---------------------------------------------------------------- the toy model (ground truth, seconds)


def toy_study(seed: int, out: Path) -> dict:
    """The trained toy model's circuit with both ablations: what the notebook and docs/circuits.md walk through."""
    from headlens.analysis.toy import circuit_heads, load_induction_model, toy_probes
    from headlens.census import run_census
    from headlens.circuits.paths import path_patching

    model = load_induction_model()
    table = run_census(model, toy_probes(model, seed=seed), progress=False).table
    prev = "L{}H{}".format(*circuit_heads()["previous_token"])
    ind = "L{}H{}".format(*circuit_heads()["induction"])
    task = induction_task(model, n_tokens=12, n_seqs=8, n_mean=16, seed=seed)
    comp = composition_scores(model, census=table, seed=seed)
    into = comp[comp.receiver == ind].sort_values("z", ascending=False).head(4)
    pp = path_patching(model, task, [(prev, ind, kind) for kind in "qkv"], progress=False)
    out_json = {
        "previous_token_head": prev,
        "induction_head": ind,
        "task": task.info,
        "composition_baseline": {"mean": _r(comp["baseline"].iloc[0]), "std": _r(comp["baseline_std"].iloc[0])},
        "top_composition_into_induction_head": [
            {"sender": a, "composition": c, "score": _r(x), "z": _r(z, 2)}
            for a, c, x, z in into[["sender", "composition", "score", "z"]].itertuples(index=False)
        ],
        "path_patching_prev_to_induction": {
            "clean": _r(pp.clean),
            "corrupted": _r(pp.corrupted),
            **{i: _r(d) for i, d in zip(pp.table.input, pp.table.delta)},
        },
    }
    for ablation in ("resample", "mean"):
        result = find_circuit(model, task, check=81, ablation=ablation, census=table, progress=False)
        edges = result.edges
        into_ind = edges[edges.receiver == ind]
        out_json[ablation] = {
            "clean_metric": _r(result.info["clean_metric"]),
            "all_edges_ablated_metric": _r(result.info["ablated_metric"]),
            "top_edge_into_induction_head": {
                col: f"{into_ind.loc[into_ind[col].abs().idxmax(), 'sender']}[{into_ind.loc[into_ind[col].abs().idxmax(), 'input']}]"
                for col in ("eap", "eap_ig", "exact")
            },
            "top_edges": [
                {"edge": f"{a} -> {b}[{i}]", "eap": _r(e), "eap_ig": _r(g), "exact": _r(x)}
                for a, b, i, e, g, x in edges.head(6)[
                    ["sender", "receiver", "input", "eap", "eap_ig", "exact"]
                ].itertuples(index=False)
            ],
            "faithfulness": _faith_summary(result),
            "curves": result.faithfulness.table.pivot_table(index="k", columns="method", values="faithfulness")
            .round(4)
            .to_dict(),
            "circuit": {k: result.info[k] for k in ("circuit_method", "circuit_k", "circuit_edges")},
        }
    write_summary(out / "toy.json", out_json)
    return out_json


def main() -> None:
    def extra(parser):
        parser.add_argument("--part", choices=("toy", "induction", "ioi", "all"), default="all")

    args = study_args(__doc__, out=OUT, extra=extra)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    if args.part in ("toy", "all"):
        s = toy_study(args.seed, args.out)
        print(f"toy: top edges into {s['induction_head']}: {s['resample']['top_edge_into_induction_head']}", flush=True)
        if args.part == "toy":
            return
    model = study_model(args.model)
    # the committed census of the default Qwen; another model (e.g. the smoke run's tiny-qwen2) gets its own census
    default = model.cfg.model_name == DEFAULT_MODEL
    census = pd.read_csv(CENSUS) if default else run_census(model, progress=False, n_boot=0).table
    if args.part in ("induction", "all"):
        s = induction_study(model, census, args.seed, args.out)
        print(f"induction: {s['total_seconds']} s; heads {s['heads']}", flush=True)
    if args.part in ("ioi", "all"):
        s = ioi_study(model, census, args.seed, args.out)
        print(f"ioi: {s['total_seconds']} s; smallest circuit {s['smallest_edge_circuit']}", flush=True)


if __name__ == "__main__":
    main()

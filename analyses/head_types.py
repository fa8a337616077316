"""New head types on the default Qwen: scores, labelled heads and a causal check for each type.

Types (definitions in docs/head_types.md): copy_suppression, successor, positional, bracket_matching,
closer_to_opener, identifier, retrieval (opt-in long probe). For each: every head's score (on the ``score`` split of
the corpus, as the census), the heads at or above the threshold (when none: the 5 highest, reported as "absent"),
and mean-ablating those heads together vs ``--n-random`` sets of as many heads drawn from the same layers
(``headlens.interventions.ablation.compare_to_random``, ``match_layers=True``) on the type's task, evaluated on the
``eval`` split with ablation means from the ``reference`` split (``headlens.census.validate.task_data``: other files
than the scores', and than each other):

- copy_suppression: probability mass on tokens that already occurred earlier in the text but are not the
  next token (held-out prose; ablating copy-suppression heads should RAISE it);
- successor: log-probability of the next ordinal after three ("Monday Tuesday Wednesday" -> " Thursday");
- positional: next-token loss on held-out prose;
- bracket_matching: log-probability of the correct closing-bracket token on held-out stdlib code windows
  (``--code-windows``, default 24);
- closer_to_opener: log-probability of the token after each closing bracket, same windows;
- identifier: log-probability of the token after a re-used name, same windows;
- retrieval: log-probability of the needle words in 1,024-token needle-in-a-haystack prompts (other needles and
  depths than the scoring prompts, the same haystack text: retrieval is no census label).

The code checks are repeated on three disjoint evaluation draws (``causal_draws.csv``: seed ``s`` takes block ``s`` of
the ``eval`` and ``reference`` splits' windows; the same heads and random sets): how much a verdict depends on the
text it was measured on.

    python analyses/head_types.py                  # ~1 h on 2 CPU cores
    python analyses/head_types.py --code-draws     # only causal_draws.csv, from the committed scores.csv (~25 min)
    python analyses/head_types.py --model tiny-qwen2 --out /tmp/ht --n-random 3 --n-random-bracket 3 --code-windows 4
                                                   # the same code on a tiny random Qwen (_harness.SMOKE_SHAPE)

Writes analyses/results/head_types/: scores.csv, causal.csv, causal_draws.csv, ablation_sets.csv, bracket_depth.csv,
summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import study_model  # noqa: E402

from headlens.census.code_heads import THRESHOLDS as CODE_THRESHOLDS
from headlens.census.code_heads import bracket_by_depth, code_scores
from headlens.census.ov import THRESHOLDS, copy_suppression_scores, heads_above, successor_scores
from headlens.census.positional import THRESHOLD as POSITIONAL_THRESHOLD
from headlens.census.positional import positional_scores
from headlens.census.retrieval import THRESHOLD as RETRIEVAL_THRESHOLD
from headlens.census.retrieval import needle_metric, needle_probe, retrieval_scores
from headlens.census.validate import ratio_interval, strongest, task_data
from headlens.data.code import code_probe, python_version
from headlens.data.probes import DEFAULT_SIZES
from headlens.heads import format_heads
from headlens.interventions.ablation import compare_to_random, custom_metric
from headlens.io import write_text

OUT = Path(__file__).resolve().parent / "results" / "head_types"
SEED = 0
CODE_CHECKS = (
    ("bracket_matching", "code_closer"),
    ("closer_to_opener", "code_after_closer"),
    ("identifier", "code_after_name"),
)
NEEDLE_LEN = 1024
DRAW_SEEDS = (SEED, 1, 2)
"""Evaluation draws of the code checks (draw 0 is causal.csv's: a full run reuses its rows)."""


def held_out_closers(model, n_seqs: int) -> int:
    """Closing brackets whose log-prob the bracket check reads (held-out windows)."""
    return int(code_probe(model, seq_len=128, n_seqs=n_seqs, seed=SEED, split="eval", min_pairs=1).closer[:, :-1].sum())


def repeat_earlier_metric(tokens: torch.Tensor):
    """Mean probability on tokens seen earlier in the sequence that are not the next token (copy suppression's target)."""

    def fn(logits, toks):
        probs = logits[:, :-1].softmax(-1)
        seen = torch.zeros_like(probs).scatter_(-1, toks[:, :-1, None], 1.0).cummax(1).values  # tokens 0..i at step i
        seen.scatter_(-1, toks[:, 1:, None], 0.0)  # the right next token is not a wrong repeat
        return (probs * seen).sum(-1)[:, 8:].mean()

    return custom_metric(tokens, fn, name="prob_on_earlier_wrong_tokens", higher_is_better=False)


def copy_suppression_heads(scores):
    """Both halves: attends to earlier copies of the predicted token AND ranks tokens at the bottom of their own OV output."""
    ok = scores[scores.negative_copying >= THRESHOLDS["negative_copying"]]
    return heads_above(ok, "attention_to_predicted", THRESHOLDS["attention_to_predicted"])


def causal(model, name, scores, score_col, threshold, data, n_random, top_if_none=5, max_heads=20, found=None):
    """Ablate the type's heads (at most ``max_heads``, at most half of a layer) vs layer-matched random sets on the
    held-out ``data`` (a :class:`headlens.census.validate.TaskData`: metric and ablation reference); ``ratio`` of the
    effects with its interval over the random sets, as the census's causal checks report it."""
    found = heads_above(scores, score_col, threshold) if found is None else found
    ranked = found if found else heads_above(scores, score_col, -float("inf"))
    frame = pd.DataFrame([{"layer": l, "head": h, "label": "x", "label_score": -i} for i, (l, h) in enumerate(ranked)])
    heads = strongest(frame, "x", max_heads if found else top_if_none, model.cfg.n_heads)
    metric = data.metric
    result = compare_to_random(
        model, metric, heads, n_random=n_random, method="mean", match_layers=True, reference=data.reference,
        seed=SEED, progress=False,
    )  # fmt: skip
    table = result.table
    rand = table[table.kind == "random"]
    target = table[table.kind == "target"].iloc[0]
    beats = (rand.worsening < target.worsening).all()
    row = {
        "type": name,
        "threshold": threshold,
        "n_labelled": len(found),
        "found": bool(found),
        "heads_ablated": format_heads(heads),
        "eval_windows": len(data.eval_sources),
        "metric": metric.name,
        "clean": round(result.clean, 5),
        "target_effect": round(float(target.effect), 5),
        "random_effect_min": round(float(rand.effect.min()), 5),
        "random_effect_max": round(float(rand.effect.max()), 5),
        "random_effect_mean": round(float(rand.effect.mean()), 5),
        **{k: round(v, 3) for k, v in ratio_interval(float(target.effect), rand.effect, seed=SEED).items()},
        "p_random_ge": round(result.p_random_ge, 3),
        "n_random": int(len(rand)),
        "target_worse_than_every_random": bool(beats),
        "z": round(result.z, 3),
    }
    print(json.dumps(row), flush=True)
    return row, table.assign(type=name)


def draw_row(seed: int, row: dict, data) -> dict:
    """A :func:`causal` row as a row of ``causal_draws.csv``: its draw and the evaluation windows it read."""
    return {"draw": seed, **row, "eval_sources": " ".join(data.eval_sources)}


def code_draws(model, scores, *, n_windows: int, n_random: dict[str, int], seeds=DRAW_SEEDS) -> pd.DataFrame:
    """The code checks of :func:`causal` on evaluation draw ``seed`` for each of ``seeds`` (disjoint windows of the
    ``eval`` split, ablation means from the ``reference`` split's block ``seed``): one row per draw and type."""
    rows = []
    for seed in seeds:
        for name, task in CODE_CHECKS:
            data = task_data(model, task, n_seqs=n_windows, seed=seed)
            row, _ = causal(model, name, scores, name, CODE_THRESHOLDS[name], data, n_random[name])
            rows.append(draw_row(seed, row, data))
    return pd.DataFrame(rows)


def rope_change(new_summary: pd.DataFrame) -> dict:
    """Old (eta^2 on raw attention) vs new (excess over uniform) RoPE summary for the heads head_report named.

    The old values are kept in ``rope_eta2_named_heads.csv`` (head_report's named_heads.csv as of commit 4731f52, with
    the labels of the census of that time), so the comparison survives head_report's regeneration."""
    old = pd.read_csv(Path(__file__).resolve().parent / "results" / "head_types" / "rope_eta2_named_heads.csv")
    label = "label"
    new = new_summary[new_summary.probe == "constant"][["layer", "head", "positional_score", "peak_distance"]]
    both = (
        old[["layer", "head", label, "positional_score", "peak_distance"]]
        .drop_duplicates(["layer", "head"])
        .merge(new, on=["layer", "head"], suffixes=("_old", "_new"))
    )
    return {
        "note": "old: head_report.py's named heads, constant probe 4 x 64 tokens, eta^2 of weight on distance and "
        "raw-attention peak; new: this run, constant probe 4 x 128 tokens, excess over the uniform causal baseline "
        "on non-sink keys",
        "heads": [
            f"L{r.layer}H{r.head} {getattr(r, label)}: positional {r.positional_score_old:.2f} -> "
            f"{r.positional_score_new:.2f}, peak {r.peak_distance_old:g} -> {r.peak_distance_new:g}"
            for r in both.itertuples()
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-random", type=int, default=10)
    ap.add_argument("--n-random-bracket", type=int, default=20)
    ap.add_argument("--skip-retrieval", action="store_true")
    ap.add_argument("--model", default="qwen", help="smoke test: tiny-qwen2 (with --out elsewhere)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--needle-len", type=int, help=f"default {NEEDLE_LEN}, or half the context of a shorter model")
    ap.add_argument("--code-windows", type=int, default=24, help="held-out code windows for bracket and identifier")
    ap.add_argument(
        "--reuse-scores", action="store_true", help="read scores.csv/rope_summary.csv of --out, redo the rest"
    )
    ap.add_argument("--code-draws", action="store_true", help="only causal_draws.csv, from scores.csv of --out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = study_model(args.model)
    if args.needle_len is None:
        args.needle_len = min(NEEDLE_LEN, model.cfg.n_ctx // 2)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    n_random = {"bracket_matching": args.n_random_bracket, "closer_to_opener": args.n_random_bracket,
                "identifier": args.n_random}  # fmt: skip
    if args.code_draws:
        draws = code_draws(model, pd.read_csv(out / "scores.csv"), n_windows=args.code_windows, n_random=n_random)
        write_text(out / "causal_draws.csv", draws.to_csv(index=False))
        return

    timings = {}
    ret, before = None, {}
    if args.reuse_scores:  # the scores of an earlier run of this script (same seed), e.g. after a failed causal step
        scores = pd.read_csv(out / "scores.csv")
        rope = pd.read_csv(out / "rope_summary.csv")
        probe = code_probe(model, seed=SEED, n_seqs=DEFAULT_SIZES["code"], min_pairs=1)
        before = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        timings = before.get("score_seconds", {})
    else:
        t = time.perf_counter()
        cs = copy_suppression_scores(model, seed=SEED)
        timings["copy_suppression"] = time.perf_counter() - t
        t = time.perf_counter()
        succ = successor_scores(model)
        timings["successor"] = time.perf_counter() - t
        t = time.perf_counter()
        pos = positional_scores(model, seed=SEED)
        timings["positional"] = time.perf_counter() - t
        write_text(out / "rope_summary.csv", pos.attrs["rope_summary"].round(6).to_csv(index=False))
        t = time.perf_counter()
        probe = code_probe(model, seed=SEED, n_seqs=DEFAULT_SIZES["code"], min_pairs=1)  # the census's code probe
        code = code_scores(model, probe)
        timings["code"] = time.perf_counter() - t
        scores = cs.merge(pos, on=["layer", "head"]).merge(code.drop(columns="kv_head"), on=["layer", "head"])
        scores["successor"] = succ.double().flatten().numpy().round(6)
        if not args.skip_retrieval:
            t = time.perf_counter()
            needles = needle_probe(model, seq_len=args.needle_len, seed=SEED)
            ret = retrieval_scores(model, needles)
            timings["retrieval"] = time.perf_counter() - t
            scores = scores.merge(ret[["layer", "head", "retrieval"]], on=["layer", "head"])
        rope = pos.attrs["rope_summary"]
        write_text(out / "scores.csv", scores.to_csv(index=False))

    rows, tables = [], []
    code = {t: task_data(model, t, n_seqs=args.code_windows, seed=SEED) for _, t in CODE_CHECKS}
    prose = task_data(model, "prose_loss", n_seqs=4, seed=SEED)
    earlier = dataclasses.replace(prose, metric=repeat_earlier_metric(prose.metric.tokens))
    checks = [
        ("copy_suppression", "copy_suppression_score", THRESHOLDS["attention_to_predicted"], earlier, args.n_random),
        ("successor", "successor", THRESHOLDS["successor"], task_data(model, "successor", seed=SEED), args.n_random),
        ("positional", "positional", POSITIONAL_THRESHOLD, prose, args.n_random),
        *((name, name, CODE_THRESHOLDS[name], code[task], n_random[name]) for name, task in CODE_CHECKS),
    ]
    if not args.skip_retrieval:
        needles = needle_metric(model, needle_probe(model, seq_len=args.needle_len, seed=SEED + 1))
        checks.append(("retrieval", "retrieval", RETRIEVAL_THRESHOLD, dataclasses.replace(prose, metric=needles), 5))
    for name, col, thr, data, n_sets in checks:
        found = copy_suppression_heads(scores) if name == "copy_suppression" else None
        row, table = causal(model, name, scores, col, thr, data, n_sets, found=found)
        rows.append(row)
        tables.append(table)
        write_text(out / "causal.csv", pd.DataFrame(rows).to_csv(index=False))

    bracket_heads = heads_above(scores, "bracket_matching", CODE_THRESHOLDS["bracket_matching"])[:20]
    depth_rows = []
    if bracket_heads:
        by_depth, counts = bracket_by_depth(model, bracket_heads, probe)
        for i, (l, h) in enumerate(bracket_heads):
            depth_rows.append({"layer": l, "head": h, **{f"depth_{d}": round(by_depth[d][i], 4) for d in (1, 2, 3)}})
        depth_rows.append({"layer": -1, "head": -1, **{f"depth_{d}": counts[d] for d in (1, 2, 3)}})  # pair counts
    write_text(out / "bracket_depth.csv", pd.DataFrame(depth_rows).to_csv(index=False))
    by_type = {r["type"]: r for r in rows}
    first = [draw_row(SEED, by_type[name], code[task]) for name, task in CODE_CHECKS]  # draw 0: the checks above
    rest = code_draws(model, scores, n_windows=args.code_windows, n_random=n_random, seeds=DRAW_SEEDS[1:])
    write_text(out / "causal_draws.csv", pd.concat([pd.DataFrame(first), rest]).to_csv(index=False))
    write_text(out / "ablation_sets.csv", pd.concat(tables).to_csv(index=False))

    summary = {
        "model": "Qwen2.5-Coder-0.5B-Instruct" if args.model == "qwen" else model.cfg.model_name,
        "seed": SEED,
        "python": python_version(),
        "code_windows": list(probe.sources),
        "held_out_code_windows": list(code["code_closer"].eval_sources),
        "ablation_reference_code_windows": list(code["code_closer"].reference_sources),
        "held_out_closers": held_out_closers(model, args.code_windows),
        "thresholds": {
            **THRESHOLDS,
            "positional": POSITIONAL_THRESHOLD,
            **CODE_THRESHOLDS,
            "retrieval": RETRIEVAL_THRESHOLD,
        },
        "counts": {r["type"]: r["n_labelled"] for r in rows},
        "top_heads": {
            col: [f"L{r.layer}H{r.head} ({getattr(r, col):.2f})" for r in scores.nlargest(3, col).itertuples()]
            for col in (
                "copy_suppression_score",
                "negative_copying",
                "attention_to_predicted",
                "successor",
                "positional",
                "bracket_matching",
                "closer_to_opener",
                "identifier",
            )
            + (() if args.skip_retrieval else ("retrieval",))
        },
        "causal": rows,
        "score_seconds": {k: round(v, 1) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv[1:],
    }
    if args.model == "qwen":
        summary["rope_change"] = rope_change(rope)
    if ret is not None:
        summary["needle_accuracy_clean"] = ret.attrs["accuracy"]
    elif args.reuse_scores and "needle_accuracy_clean" in before:  # a property of the reused retrieval scores
        summary["needle_accuracy_clean"] = before["needle_accuracy_clean"]
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

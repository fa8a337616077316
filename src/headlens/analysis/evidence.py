"""Causal evidence for census labels, by default: each label's verdict and its top heads' single-head effects.

A label says what a head looks like on a probe. Whether the heads carrying it matter is
:func:`headlens.census.validate.causal_validation`'s test: the label's heads are ablated together on the label's task
and compared with layer-matched random head sets. :func:`label_evidence` runs it at sizes that fit the default
``headlens census`` budget and adds, for the ``top_k`` heads of each tested label (by ``label_score``), the effect of
ablating that head alone on the same task. A label without a task is *descriptive (no causal claim)*.

Tasks, heads, random sets, held-out data and verdicts are :mod:`headlens.census.validate`'s (one table,
:data:`~headlens.census.validate.LABEL_TASKS`): ``supported`` when the target effect has the expected sign and no
random set reaches it (``p_random_ge`` = 0: with :data:`N_RANDOM` = 6 sets a label whose heads are no different from
random ones still passes 1 time in 7), ``no evidence`` otherwise, ``descriptive (no causal claim)`` for a label no
task tests. The default sizes are small
because the test runs in every ``headlens census``; ``causal_validation(..., n_random=20, n_seqs=8)`` is the study
size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from headlens.census import validate
from headlens.census.run import check_census_table
from headlens.errors import check_count, check_model
from headlens.heads import head_name
from headlens.interventions.ablation import Replacement, ablated_metrics

N_RANDOM = 6
"""Random head sets per label in the default census (the budget: the whole CLI census within 1.5x its time before
evidence; benchmarks/results/cli_census_evidence_ab.json)."""
N_SEQS = 2
"""Sequences in each task metric of the default census."""
TOP_K = 2
"""Heads per label whose single-head effect the default census measures."""
BATCH_SIZE = 32
"""Sequences per stacked forward of the ablated sets (16 sets of 2 sequences)."""
DESCRIPTIVE = "descriptive (no causal claim)"


@dataclass
class LabelEvidence:
    """What :func:`label_evidence` returns.

    - ``labels``: one row per label of the census: ``label, verdict, task`` and, for a tested label,
      :func:`~headlens.census.validate.causal_validation`'s columns (``n_heads, target_effect, random_mean, ratio,
      ratio_lo, ratio_hi, p_random_ge, ...``);
    - ``heads``: the single-head effects: ``label, layer, head, task, label_score, effect`` (metric with the head
      ablated minus clean, in the task's unit), one row per top head of each tested label;
    - ``settings``: ``n_random, n_seqs, top_k, method, seed``.
    """

    labels: pd.DataFrame
    heads: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def verdict(self, label: str) -> str:
        part = self.labels[self.labels["label"] == label]
        return str(part["verdict"].iloc[0]) if len(part) else DESCRIPTIVE

    def sentences(self, label: str, layer: int, head: int) -> tuple[str | None, str | None]:
        """(the label's causal verdict, this head's single-head effect) as card sentences; None where not applicable."""
        if label == "other":
            return None, None
        part = self.labels[self.labels["label"] == label]
        if part.empty or part["verdict"].iloc[0] == DESCRIPTIVE:
            return f"Causal: {DESCRIPTIVE}; no task tests the {label} label", None
        r = part.iloc[0]
        verdict = (
            f"Causal: {r['verdict']} — ablating the {int(r['n_heads'])} {label} heads changes {r['task']} by "
            f"{r['target_effect']:+.3f} vs {r['random_mean']:+.3f} for layer-matched random sets (ratio {r['ratio']:.1f} "
            f"[{r['ratio_lo']:.1f}, {r['ratio_hi']:.1f}], {r['p_random_ge']:.0%} of {int(r['n_random'])} random sets as strong)"
        )
        mine = self.heads[(self.heads["layer"] == layer) & (self.heads["head"] == head)]
        single = (
            f"Ablating {head_name(layer, head)} alone changes {mine['task'].iloc[0]} by {mine['effect'].iloc[0]:+.3f}"
            if len(mine)
            else None
        )
        return verdict, single


def label_evidence(
    model: HookedTransformer,
    table: pd.DataFrame,
    *,
    n_random: int = N_RANDOM,
    n_seqs: int = N_SEQS,
    top_k: int = TOP_K,
    method: str = "mean",
    seed: int = 0,
    labels: list[str] | None = None,
    n_boot: int = 2000,
    progress: bool = True,
) -> LabelEvidence:
    """Each label's causal verdict and the single-head effects of its ``top_k`` heads (module docstring); ``labels``
    restricts it to those labels (``headlens head`` tests just its head's).

    The test is :func:`headlens.census.validate.causal_validation`'s — its task per label (``LABEL_TASKS``), the
    held-out evaluation data and reference-split ablation means (``task_data``), the same heads and layer-matched
    random sets (``label_plan``) and the same row (``causal_row``) — but every ablated set of a task runs in one batched
    pass (:func:`headlens.interventions.ablation.ablated_metrics`: one clean run, each set restarting at its first
    ablated layer, only the metric's positions unembedded) instead of a full forward per set, which is what lets
    it run in every ``headlens census``. tests/test_cards.py checks both give the same numbers.
    """
    check_model(model)
    n_random = check_count("n_random", n_random, minimum=2, why="an interval needs two random sets")
    top_k = check_count("top_k", top_k, why="single-head effects per label")
    check_census_table(table, model)
    labels = validate.chosen_labels(table, labels)
    present = [lb for lb in dict.fromkeys(table["label"]) if lb != "other" and (labels is None or lb in labels)]
    tested = [lb for lb in present if lb in validate.LABEL_TASKS and validate.LABEL_TASKS[lb].task]
    score = table.set_index(["layer", "head"])["label_score"]
    rows, singles, plans, data = {}, [], {}, {}
    for task in dict.fromkeys(validate.LABEL_TASKS[lb].task for lb in tested):
        plan = plans[task] = []  # (label, kind, heads) of every ablated set of this task, in order
        for label in (lb for lb in tested if validate.LABEL_TASKS[lb].task == task):
            heads, drawn = validate.label_plan(model, table, label, n_random, seed)
            plan += [(label, "target", heads), *((label, "random", hs) for hs in drawn)]
            top = table[table["label"] == label]
            top = top.sort_values(["label_score", "layer", "head"], ascending=[False, True, True]).head(top_k)
            plan += [(label, "single", [(int(r.layer), int(r.head))]) for r in top.itertuples()]
        data[task] = validate.task_data(model, task, n_seqs=n_seqs, seed=seed)
    replacements = _shared_replacements(model, data, plans, method, seed)
    for task, plan in plans.items():
        clean, values = ablated_metrics(
            model, data[task].metric, [hs for _, _, hs in plan], method=method, seed=seed, batch_size=BATCH_SIZE,
            progress=progress, replacement=replacements[task],
        )  # fmt: skip
        done = [(lb, kind, hs, v - clean) for (lb, kind, hs), v in zip(plan, values)]
        for label in dict.fromkeys(lb for lb, _, _, _ in done):
            mine = [d for d in done if d[0] == label]
            (_, _, heads, target), rand = mine[0], np.array([e for _, kind, _, e in mine if kind == "random"])
            rows[label] = validate.causal_row(label, heads, clean, target, rand, data[task], seed=seed, n_boot=n_boot)
            singles += [
                {"label": label, "layer": hs[0][0], "head": hs[0][1], "task": task, "label_score": float(score[hs[0]]),
                 "effect": e}
                for _, kind, hs, e in mine if kind == "single"
            ]  # fmt: skip
    out = [
        {
            "label": lb,
            "task": validate.LABEL_TASKS[lb].task,
            "behaviour": validate.LABEL_TASKS[lb].behaviour,
            "n_label_heads": int((table["label"] == lb).sum()),
            **rows[lb],
        }
        if lb in rows
        else {"label": lb, "verdict": DESCRIPTIVE}
        for lb in present
    ]
    settings = {"n_random": int(n_random), "n_seqs": int(n_seqs), "top_k": int(top_k), "method": method, "seed": seed}
    return LabelEvidence(
        pd.DataFrame(out, columns=["label", "verdict", "task", *CAUSAL_COLUMNS]),
        pd.DataFrame(singles, columns=["label", "layer", "head", "task", "label_score", "effect"]),
        settings,
    )


def _shared_replacements(model, data: dict, plans: dict, method: str, seed: int) -> dict[str, Replacement]:
    """One :class:`~headlens.interventions.ablation.Replacement` per distinct reference (the three code tasks share
    theirs, as do prose and successor), covering the layers of every task that uses it: one reference forward
    each instead of one per task; the values are the same."""
    groups: dict[tuple, list[str]] = {}
    for task, d in data.items():
        ref = d.reference
        groups.setdefault((tuple(ref.shape), tuple(ref.flatten().tolist())), []).append(task)
    out = {}
    for tasks in groups.values():
        layers = {layer for t in tasks for _, _, heads in plans[t] for layer, _ in heads}
        reference = None if method == "zero" else data[tasks[0]].reference  # zero ablation reads none
        shared = Replacement(model, method, reference, layers, seed=seed)
        out |= dict.fromkeys(tasks, shared)
    return out


CAUSAL_COLUMNS = (
    "behaviour", "n_label_heads", "metric", "n_heads", "clean", "target_effect", "random_mean", "random_min", "random_max", "ratio", "ratio_lo",
    "ratio_hi", "expected_sign", "p_random_ge", "n_random", "heads", "eval_sequences", "eval_files",
)  # fmt: skip
"""The columns of :func:`headlens.census.validate.causal_validation` after ``label, verdict, task``."""


def verdict_table(evidence: LabelEvidence | None, labels) -> pd.DataFrame:
    """One row per label for the report and the console: ``label, verdict, task, heads ratio`` (text)."""
    rows = []
    for label in labels:
        if label == "other":
            continue
        if evidence is None:
            rows.append({"label": label, "causal verdict": "not run (--no-causal)", "task": "", "ratio vs random": ""})
            continue
        part = evidence.labels[evidence.labels["label"] == label]
        if part.empty or part["verdict"].iloc[0] == DESCRIPTIVE:
            rows.append({"label": label, "causal verdict": DESCRIPTIVE, "task": "", "ratio vs random": ""})
            continue
        r = part.iloc[0]
        ratio = (
            f"{r['ratio']:.1f} [{r['ratio_lo']:.1f}, {r['ratio_hi']:.1f}], p {r['p_random_ge']:.2f}"
            if np.isfinite(r["ratio"])
            else ""
        )
        rows.append({"label": label, "causal verdict": r["verdict"], "task": r["task"], "ratio vs random": ratio})
    return pd.DataFrame(rows, columns=["label", "causal verdict", "task", "ratio vs random"])

"""Causal evidence for census labels, by default: each label's verdict and its top heads' single-head effects.

A label says what a head looks like on a probe. Whether the heads carrying it matter comes from
:func:`headlens.census.validate.causal_validation`: the label's heads are ablated together on the label's task and
compared with layer-matched random head sets. :func:`label_evidence` runs it at sizes that fit the default
``headlens census`` budget and adds, for the ``top_k`` heads of each tested label (by ``label_score``), the effect of
ablating that head alone on the same task. A label without a task is *descriptive (no causal claim)*.

Verdicts: ``supported`` when the target effect has the expected sign and no random set reaches it (``p_random_ge`` = 0:
with :data:`N_RANDOM` = 6 sets a label whose heads are no different from random ones still passes 1 time in 7),
``not supported`` otherwise, ``descriptive (no causal claim)`` for a label no task tests. The default sizes are small
because the test runs in every ``headlens census``; ``causal_validation(..., n_random=20, n_seqs=8)`` is the study
size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from headlens.census import validate
from headlens.heads import head_name
from headlens.interventions.ablation import ablated_metrics

N_RANDOM = 6
"""Random head sets per label in the default census (the budget: the whole CLI census within 1.5x its time before
evidence; benchmarks/results/cli_census_evidence.json)."""
N_SEQS = 2
"""Sequences in each task metric of the default census."""
TOP_K = 3
"""Heads per label whose single-head effect the default census measures."""
ALPHA = 0.0
"""Largest share of random sets as strong as the label's heads for a ``supported`` verdict (none of them)."""
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


def verdict(row) -> str:
    """``supported`` or ``not supported`` for one row of ``causal_validation`` (module docstring)."""
    sign = int(row.get("expected_sign", 1) or 1)
    effect, p = float(row["target_effect"]), float(row["p_random_ge"])
    return "supported" if sign * effect > 0 and p <= ALPHA else "not supported"


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
    progress: bool = True,
) -> LabelEvidence:
    """Each label's causal verdict and the single-head effects of its ``top_k`` heads (module docstring); ``labels``
    restricts it to those labels (``headlens head`` tests just its head's)."""
    present = [lb for lb in dict.fromkeys(table["label"]) if lb != "other" and (labels is None or lb in labels)]
    testable = [lb for lb in present if lb in validate.TASKS]
    causal = validate.causal_validation(
        model, table, labels=testable, n_random=n_random, method=method, n_seqs=n_seqs, seed=seed, progress=progress
    )
    tested = {r["label"]: r for r in causal.to_dict("records")}
    rows = []
    for label in present:
        if label in tested:
            rows.append({"label": label, "verdict": verdict(tested[label]), **tested[label]})
        else:
            rows.append({"label": label, "verdict": DESCRIPTIVE, "task": ""})
    heads = _single_heads(model, table, causal, n_seqs=n_seqs, top_k=top_k, method=method, seed=seed)
    settings = {"n_random": int(n_random), "n_seqs": int(n_seqs), "top_k": int(top_k), "method": method, "seed": seed}
    table_rows = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["label", "verdict", "task"])
    return LabelEvidence(table_rows, heads, settings)


def _single_heads(model, table, causal: pd.DataFrame, *, n_seqs, top_k, method, seed) -> pd.DataFrame:
    """The effect of ablating each of the top heads of every tested label alone, on that label's task."""
    rows = []
    if causal.empty:
        return pd.DataFrame(rows, columns=["label", "layer", "head", "task", "label_score", "effect"])
    for task, group in causal.groupby("task", sort=False):
        labels = list(group["label"])
        top = []
        for label in labels:
            part = table[table["label"] == label].sort_values(
                ["label_score", "layer", "head"], ascending=[False, True, True]
            )
            top += [(label, int(r.layer), int(r.head), float(r.label_score)) for r in part.head(top_k).itertuples()]
        if not top:
            continue
        metric = validate.task_metric(model, task, n_seqs=n_seqs, seed=seed)
        clean, values = ablated_metrics(model, metric, [[(l, h)] for _, l, h, _ in top], method=method, seed=seed)
        rows += [
            {"label": lb, "layer": l, "head": h, "task": task, "label_score": s, "effect": v - clean}
            for (lb, l, h, s), v in zip(top, values)
        ]
    return pd.DataFrame(rows, columns=["label", "layer", "head", "task", "label_score", "effect"])


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

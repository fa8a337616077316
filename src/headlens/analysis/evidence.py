"""Causal evidence for census labels, by default: each label's verdict and its top heads' single-head effects.

A label says what a head looks like on a probe. Whether the heads carrying it matter is
:func:`headlens.census.validate.causal_validation`'s test: the label's heads are ablated together on the label's task
and compared with layer-matched random head sets. :func:`label_evidence` runs it at sizes that fit the default
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
from headlens.errors import HeadlensError
from headlens.heads import format_heads, head_name, random_heads
from headlens.interventions.ablation import ablated_metrics

N_RANDOM = 6
"""Random head sets per label in the default census (the budget: the whole CLI census within 1.5x its time before
evidence; benchmarks/results/cli_census_evidence.json)."""
N_SEQS = 2
"""Sequences in each task metric of the default census."""
TOP_K = 2
"""Heads per label whose single-head effect the default census measures."""
BATCH_SIZE = 32
"""Sequences per stacked forward of the ablated sets (16 sets of 2 sequences)."""
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
    n_boot: int = 2000,
    progress: bool = True,
) -> LabelEvidence:
    """Each label's causal verdict and the single-head effects of its ``top_k`` heads (module docstring); ``labels``
    restricts it to those labels (``headlens head`` tests just its head's).

    The test is :func:`headlens.census.validate.causal_validation`'s — its task and metric per label
    (``validate.TASKS``, ``validate.task_metric``), its expected signs, the same layer-matched random sets (draw
    ``i`` seeded ``seed * 1000 + i``) and the same columns — but every ablated set of a task runs in one batched
    pass (:func:`headlens.interventions.ablation.ablated_metrics`: one clean run, each set restarting at its first
    ablated layer, only the metric's positions unembedded) instead of a full forward per set, which is what lets
    it run in every ``headlens census``. tests/test_cards.py checks both give the same numbers.
    """
    if int(n_random) < 2:
        raise HeadlensError(f"n_random must be >= 2 for an interval (got {n_random})")
    present = [lb for lb in dict.fromkeys(table["label"]) if lb != "other" and (labels is None or lb in labels)]
    tested = [lb for lb in present if lb in validate.TASKS]
    rows, singles = {}, []
    for task in dict.fromkeys(validate.TASKS[lb] for lb in tested):
        plan = []  # (label, kind, heads) of every ablated set of this task, in order
        for label in (lb for lb in tested if validate.TASKS[lb] == task):
            part = table[table["label"] == label]
            heads = [(int(r.layer), int(r.head)) for r in part.itertuples()]
            plan.append((label, "target", heads))
            plan += [
                (label, "random", random_heads(model, len(heads), like=heads, exclude=heads, seed=int(seed) * 1000 + i))
                for i in range(int(n_random))
            ]
            top = part.sort_values(["label_score", "layer", "head"], ascending=[False, True, True]).head(top_k)
            plan += [(label, "single", [(int(r.layer), int(r.head))]) for r in top.itertuples()]
        metric = validate.task_metric(model, task, n_seqs=n_seqs, seed=seed)
        clean, values = ablated_metrics(
            model, metric, [hs for _, _, hs in plan], method=method, seed=seed, batch_size=BATCH_SIZE, progress=progress
        )
        done = [(lb, kind, hs, v - clean) for (lb, kind, hs), v in zip(plan, values)]
        for label in dict.fromkeys(lb for lb, _, _, _ in done):
            mine = [d for d in done if d[0] == label]
            (_, _, heads, target), rand = mine[0], np.array([e for _, kind, _, e in mine if kind == "random"])
            rows[label] = _causal_row(label, task, heads, clean, target, rand, seed=seed, n_boot=n_boot)
            score = table.set_index(["layer", "head"])["label_score"]
            singles += [
                {"label": label, "layer": hs[0][0], "head": hs[0][1], "task": task, "label_score": float(score[hs[0]]),
                 "effect": e}
                for _, kind, hs, e in mine if kind == "single"
            ]  # fmt: skip
    out = [
        {"label": lb, "verdict": verdict(rows[lb]), **rows[lb]} if lb in rows else {"label": lb, "verdict": DESCRIPTIVE}
        for lb in present
    ]
    settings = {"n_random": int(n_random), "n_seqs": int(n_seqs), "top_k": int(top_k), "method": method, "seed": seed}
    return LabelEvidence(
        pd.DataFrame(out, columns=["label", "verdict", *CAUSAL_COLUMNS]),
        pd.DataFrame(singles, columns=["label", "layer", "head", "task", "label_score", "effect"]),
        settings,
    )


CAUSAL_COLUMNS = (
    "task", "n_heads", "clean", "target_effect", "random_mean", "random_min", "random_max", "ratio", "ratio_lo",
    "ratio_hi", "expected_sign", "p_random_ge", "n_random", "heads",
)  # fmt: skip
"""The columns of :func:`headlens.census.validate.causal_validation`, in its order."""


def _causal_row(label, task, heads, clean, target, rand: np.ndarray, *, seed: int, n_boot: int) -> dict:
    """One label's row, computed as ``causal_validation`` computes it (ratio interval: the random draws resampled)."""
    g = np.random.default_rng(int(seed))
    boot = rand[g.integers(0, len(rand), (int(n_boot), len(rand)))].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = target / boot
    sign = validate.EXPECTED_SIGN.get(label, 1)
    return {
        "task": task,
        "n_heads": len(heads),
        "clean": clean,
        "target_effect": target,
        "random_mean": float(rand.mean()),
        "random_min": float(rand.min()),
        "random_max": float(rand.max()),
        "ratio": float(target / rand.mean()) if rand.mean() != 0 else float("nan"),
        "ratio_lo": float(np.nanpercentile(ratios, 2.5)),
        "ratio_hi": float(np.nanpercentile(ratios, 97.5)),
        "expected_sign": sign,
        "p_random_ge": float((sign * rand >= sign * target).mean()),
        "n_random": len(rand),
        "heads": format_heads(heads),
    }


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

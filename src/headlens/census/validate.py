"""Causal validation of census labels: ablate a label's heads vs random head sets matched to their layers.

For each label with a natural task (``TASKS``) the label's heads are mean-ablated together and the
task metric's change is compared with ``n_random`` draws of as many heads from the same layers
(``random_heads(model, n, like=heads, exclude=heads)``; a layer with too few other heads is filled
from its nearest layers). Same tokens, same ablation, same metric for target and control.

- ``induction``: loss on the repeated half of repeated random tokens (in-context copying) — should rise.
- ``copy_suppression``: the same repeated-half loss — suppressing the copied token hurts copying, so
  ablating these heads should *lower* it (a negative effect is the expected sign).
- ``duplicate_token``: the repeated-half loss too (duplicate detection feeds copying).
- ``previous_token``: next-token loss on natural text (the Python reference docs prose).

``ratio`` = target effect / mean random effect; its 95 % interval comes from resampling the random
draws (the target is one fixed set), so it says how much the control's spread matters.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from headlens.data.corpus import prose_documents
from headlens.errors import HeadlensError
from headlens.interventions.ablation import ablated_metric, clean_metric, loss_metric, random_heads, repeat_loss_metric
from headlens.progress import tqdm

TASKS = {
    "induction": "repeat_loss",
    "copy_suppression": "repeat_loss",
    "duplicate_token": "repeat_loss",
    "previous_token": "text_loss",
}
EXPECTED_SIGN = {"induction": 1, "copy_suppression": -1, "duplicate_token": 1, "previous_token": 1}


def task_metric(model: HookedTransformer, task: str, *, n_seqs: int = 8, seed: int = 0):
    """The metric of a task: ``repeat_loss`` (repeated-half loss, half-length 32) or ``text_loss`` (prose loss)."""
    if task == "repeat_loss":
        return repeat_loss_metric(model, n_seqs=n_seqs, half_len=32, seed=1000 + int(seed))
    if task == "text_loss":
        text = "\n\n".join(d.text for d in sorted(prose_documents(), key=lambda d: d.name))
        return loss_metric(model, n_seqs=n_seqs, seq_len=64, text=text)
    raise HeadlensError(f"unknown task {task!r}; known: repeat_loss, text_loss")


def causal_validation(
    model: HookedTransformer,
    table: pd.DataFrame,
    *,
    labels: list[str] | None = None,
    n_random: int = 20,
    method: str = "mean",
    n_seqs: int = 8,
    seed: int = 0,
    n_boot: int = 2000,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per label with a task: heads, target effect, random effects (mean, min, max), ratio with interval.

    ``p_random_ge``: share of random draws whose effect is at least the target's in the expected direction.
    """
    labels = [lb for lb in TASKS if lb in set(table["label"])] if labels is None else list(labels)
    unknown = [lb for lb in labels if lb not in TASKS]
    if unknown:
        raise HeadlensError(f"no causal task for labels {unknown}; tasks exist for {', '.join(TASKS)}")
    if int(n_random) < 2:
        raise HeadlensError(f"n_random must be >= 2 for an interval (got {n_random})")
    metrics, cleans, rows = {}, {}, []
    for label in labels:
        heads = [(int(r.layer), int(r.head)) for r in table.itertuples() if r.label == label]
        if not heads:
            continue
        task = TASKS[label]
        if task not in metrics:
            metrics[task] = task_metric(model, task, n_seqs=n_seqs, seed=seed)
            cleans[task] = clean_metric(model, metrics[task])
        metric, clean = metrics[task], cleans[task]
        target = ablated_metric(model, metric, heads, method=method, seed=seed) - clean
        rand = []
        for i in tqdm(range(int(n_random)), desc=f"validate {label}", disable=not progress, leave=False):
            drawn = random_heads(model, len(heads), like=heads, exclude=heads, seed=int(seed) * 1000 + i)
            rand.append(ablated_metric(model, metric, drawn, method=method, seed=seed) - clean)
        rand = np.asarray(rand)
        g = np.random.default_rng(int(seed))
        boot = rand[g.integers(0, len(rand), (int(n_boot), len(rand)))].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = target / boot
        sign = EXPECTED_SIGN[label]
        rows.append(
            {
                "label": label,
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
                "n_random": int(n_random),
                "heads": " ".join(f"L{l}H{h}" for l, h in heads),
            }
        )
    return pd.DataFrame(rows)

"""Head census: score every (layer, head) on seeded probes and give each head one label.

Patterns are reduced to per-head numbers inside the attention hooks (``headlens.capture``), one
batch and one layer at a time, so memory is one layer's pattern, never a cache.

Which probe each score is measured on (``SCORE_PROBES``): previous-token, first-token, local and
entropy on natural text; delimiter on delimiter-rich text; duplicate-token and induction on repeated
random tokens. ``copying`` comes from the weights alone.

Labels. A head is a *candidate* for every label whose score reaches its threshold
(``THRESHOLDS``; ``broad`` uses the normalised entropy). Labels come in tiers (``TIERS``), from
specific mechanisms to generic behaviour:

1. ``induction``, ``duplicate_token``, ``previous_token``, ``delimiter``
2. ``first_token``, ``local``
3. ``broad``

The first tier holding a candidate decides; inside it the candidate with the largest score/threshold
ratio wins (exact ties go to the label listed first). No candidate: ``other``. So a previous-token
head (which is also local) is ``previous_token``, an induction head that also sinks on natural
text is ``induction``, and a head that mostly sinks is ``first_token``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from transformer_lens import HookedTransformer

from headlens import scores
from headlens.capture import stream_patterns
from headlens.errors import HeadlensError
from headlens.models import kv_heads
from headlens.probes import Probe, ProbeSet, check_probes, default_probes
from headlens.progress import tqdm

SCORES = ("previous_token", "duplicate_token", "induction", "copying", "first_token", "delimiter", "local", "entropy")
COLUMNS = ("layer", "head", "kv_head", *SCORES, "label")
LABELS = ("previous_token", "induction", "duplicate_token", "delimiter", "first_token", "local", "broad", "other")

SCORE_PROBES = {
    "previous_token": "natural",
    "first_token": "natural",
    "local": "natural",
    "entropy": "natural",
    "delimiter": "delimiter",
    "duplicate_token": "repeated",
    "induction": "repeated",
}

THRESHOLDS = {
    "induction": 0.3,
    "duplicate_token": 0.3,
    "previous_token": 0.4,
    "delimiter": 0.3,
    "first_token": 0.6,
    "local": 0.6,
    "broad": 0.7,
}
"""Score a head must reach to be a candidate for a label (``broad``: normalised entropy); override per call."""

TIERS = (("induction", "duplicate_token", "previous_token", "delimiter"), ("first_token", "local"), ("broad",))
LABEL_SCORE = {"broad": "entropy"}


def census(
    model: HookedTransformer,
    probes: ProbeSet | None = None,
    *,
    seed: int = 0,
    batch_size: int = 8,
    thresholds: dict[str, float] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (layer, head): kv head, the eight scores and a label (see the module docstring).

    ``probes`` defaults to :func:`headlens.probes.default_probes` with ``seed``; scores of probe
    kinds the set lacks are NaN. ``thresholds`` overrides entries of :data:`THRESHOLDS`.
    """
    limits = _thresholds(thresholds)
    probes = default_probes(model, seed=seed) if probes is None else probes
    check_probes(model, probes)
    if int(batch_size) < 1:
        raise HeadlensError(f"batch_size must be >= 1 (got {batch_size})")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    table = {name: torch.full((L, H), float("nan")) for name in SCORES}
    for probe in tqdm(list(probes), desc="census", disable=not progress, leave=False):
        table.update(probe_scores(model, probe, batch_size=batch_size, progress=progress))
    table["copying"] = scores.copying(model)
    frame = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), H),
            "head": np.tile(np.arange(H), L),
            "kv_head": np.tile(np.asarray(kv_heads(model)), L),
            **{name: table[name].double().flatten().numpy().round(6) for name in SCORES},
        }
    )
    frame["label"] = label_heads(frame, limits)
    return frame[list(COLUMNS)]


def probe_scores(
    model: HookedTransformer, probe: Probe, *, batch_size: int = 8, progress: bool = True
) -> dict[str, torch.Tensor]:
    """The scores ``SCORE_PROBES`` assigns to ``probe.kind``, each ``[layer, head]``, streamed batch by batch."""
    fns = _score_fns(probe)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sums = {name: torch.zeros(L, H, dtype=torch.float64) for name in fns}

    def reducer(layer, pattern, rows):
        weight = rows.stop - rows.start
        for name, fn in fns.items():
            sums[name][layer] += fn(pattern, rows).double().cpu() * weight

    stream_patterns(model, probe.tokens, reducer, batch_size=batch_size, progress=progress, desc=f"census {probe.kind}")
    return {name: total / probe.batch for name, total in sums.items()}


def label_heads(frame: pd.DataFrame, thresholds: dict[str, float] | None = None) -> list[str]:
    """The label of each row of a census table (tiers, then score/threshold ratio; see the module docstring)."""
    limits = _thresholds(thresholds)
    labels = []
    for row in frame.itertuples(index=False):
        label = "other"
        for tier in TIERS:
            ratios = [
                (getattr(row, LABEL_SCORE.get(name, name)) / limits[name], -i, name) for i, name in enumerate(tier)
            ]
            passed = [r for r in ratios if np.isfinite(r[0]) and r[0] >= 1.0]
            if passed:
                label = max(passed)[2]
                break
        labels.append(label)
    return labels


def _score_fns(probe: Probe) -> dict:
    wanted = [name for name, kind in SCORE_PROBES.items() if kind == probe.kind]
    fns = {
        "previous_token": lambda p, rows: scores.previous_token(p),
        "first_token": lambda p, rows: scores.first_token(p),
        "local": lambda p, rows: scores.local(p),
        "entropy": lambda p, rows: scores.entropy(p),
        "delimiter": lambda p, rows: scores.delimiter(p, probe.is_delim[rows]),
        "duplicate_token": lambda p, rows: scores.duplicate_token(p, probe.n),
        "induction": lambda p, rows: scores.induction(p, probe.n),
    }
    return {name: fns[name] for name in wanted}


def _thresholds(overrides: dict[str, float] | None) -> dict[str, float]:
    limits = dict(THRESHOLDS)
    for name, value in (overrides or {}).items():
        if name not in THRESHOLDS:
            raise HeadlensError(f"unknown threshold {name!r}; known: {', '.join(THRESHOLDS)}")
        if not np.isfinite(value) or value <= 0:
            raise HeadlensError(f"threshold {name!r} must be a positive number (got {value})")
        limits[name] = float(value)
    return limits


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per label: how many heads, and the (layer, head) list ordered by layer."""
    rows = []
    for label in LABELS:
        part = frame[frame["label"] == label]
        if len(part):
            heads = " ".join(f"L{l}H{h}" for l, h in zip(part["layer"], part["head"]))
            rows.append({"label": label, "n_heads": len(part), "heads": heads})
    return pd.DataFrame(rows, columns=["label", "n_heads", "heads"])

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

from dataclasses import replace
from functools import partial

import numpy as np
import pandas as pd
import torch
from transformer_lens import HookedTransformer

from headlens import scores
from headlens.capture import stream_patterns
from headlens.errors import HeadlensError
from headlens.models import kv_heads
from headlens.probes import Probe, ProbeSet, check_probes, default_probes

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
    executor=None,
) -> pd.DataFrame:
    """One row per (layer, head): kv head, the eight scores and a label (see the module docstring).

    ``probes`` defaults to :func:`headlens.probes.default_probes` with ``seed``; scores of probe
    kinds the set lacks are NaN. ``thresholds`` overrides entries of :data:`THRESHOLDS`.
    ``executor`` (:mod:`headlens.executor`, e.g. a ``RayExecutor``) runs the probe batches; the
    table is the same whichever runs them.
    """
    limits = _thresholds(thresholds)
    probes = default_probes(model, seed=seed) if probes is None else probes
    check_probes(model, probes)
    if int(batch_size) < 1:
        raise HeadlensError(f"batch_size must be >= 1 (got {batch_size})")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    table = {name: torch.full((L, H), float("nan")) for name in SCORES}
    table.update(_sharded_scores(model, list(probes), batch_size, progress, executor))
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
    model: HookedTransformer, probe: Probe, *, batch_size: int = 8, progress: bool = True, executor=None
) -> dict[str, torch.Tensor]:
    """The scores ``SCORE_PROBES`` assigns to ``probe.kind``, each ``[layer, head]``, streamed batch by batch."""
    return _sharded_scores(model, [probe], batch_size, progress, executor)


def probe_batches(probe: Probe, batch_size: int) -> list[Probe]:
    """``probe`` cut into consecutive sub-probes of at most ``batch_size`` sequences (the census's shards)."""
    return [
        replace(probe, tokens=probe.tokens[i : i + batch_size], is_delim=probe.is_delim[i : i + batch_size])
        for i in range(0, probe.batch, batch_size)
    ]


def batch_sums(model: HookedTransformer, probe: Probe, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """One forward over ``probe``: each of its scores, ``[layer, head]`` float64, summed over its sequences.

    Patterns are scored in float32 whatever the model's dtype. The census adds these shard by shard
    in order and divides by the probe's size, so any executor gives the same numbers.
    """
    fns = _score_fns(probe)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sums = {name: torch.zeros(L, H, dtype=torch.float64) for name in fns}

    def reducer(layer, pattern, rows):
        weight = rows.stop - rows.start
        for name, fn in fns.items():
            sums[name][layer] += fn(pattern.float(), rows).double().cpu() * weight

    stream_patterns(
        model, probe.tokens, reducer, batch_size=probe.batch, progress=progress, desc=f"census {probe.kind}"
    )
    return sums


def _sharded_scores(model, probes: list[Probe], batch_size: int, progress: bool, executor) -> dict[str, torch.Tensor]:
    from headlens.executor import resolve

    shards = [(p, sub) for p in probes for sub in probe_batches(p, int(batch_size))]
    parts = resolve(executor).map(
        partial(batch_sums, progress=progress),
        model,
        [sub for _, sub in shards],
        key="headlens.census.batch_sums",
        desc="census",
        progress=progress,
    )
    out: dict[str, torch.Tensor] = {}
    for probe in probes:
        mine = [part for (p, _), part in zip(shards, parts) if p is probe]
        for name in mine[0]:
            total = torch.zeros_like(mine[0][name])
            for part in mine:
                total += part[name]
            out[name] = total / probe.batch
    return out


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

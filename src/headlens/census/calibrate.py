"""Null distributions for census scores: what each score reaches when there is no mechanism to find.

Two nulls, same probes as the census:

- ``random_weights``: the same architecture with randomly initialised weights (``HookedTransformer(cfg)``,
  seeded). Its heads have no learned behaviour, so their scores show chance level for this shape
  (sequence length, causal mask, RoPE) — e.g. how much a nearly uniform head puts on i-1 or on a
  delimiter. Scored with the real model's probes (token ids), so the inputs are identical.
- ``shuffled``: the *real* model on repeated probes whose second half is permuted (same tokens,
  nothing to copy in order). A head scoring high on induction there reads position, not content.

:func:`null_levels` gives, per labelled head type, its threshold and the nulls' largest and 99th
percentile head scores (sink-aware, as labels read them); ``clears`` says the threshold lies above
every null maximum. A threshold that does not clear its null is flagged and should be raised.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from headlens.census.registry import WEIGHTS, head_types
from headlens.census.run import _effective, _means, collect
from headlens.data.probes import ProbeSet, check_probes, default_probes, probe_kinds, repeated_tokens
from headlens.errors import HeadlensError, check_count, check_model
from headlens.models import private_rng


def random_weights_model(model: HookedTransformer, *, seed: int = 0) -> HookedTransformer:
    """The same architecture as ``model`` with freshly initialised weights (TransformerLens' own init, seeded)."""
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    cfg = model.cfg
    with private_rng(seed):  # the config's seed reseeds torch, numpy and random: the caller's generators come back
        null = HookedTransformer(
            cfg.__class__(**{**cfg.to_dict(), "seed": int(seed), "init_weights": True}), move_to_device=False
        )
    if model.tokenizer is not None:  # weights scores (successor, positional, ...) pick their tokens with it
        null.set_tokenizer(model.tokenizer, default_padding_side=model.tokenizer.padding_side)
    return null.to(cfg.device).eval()


def null_scores(
    model: HookedTransformer,
    probes: ProbeSet | None = None,
    *,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Sink-aware head scores (as labels read them) under each null: ``{"random_weights": {...}, "shuffled": {...}}``."""
    batch_size = check_count("batch_size", batch_size)
    types = head_types()
    if probes is None:
        needed = {t.probe for t in types.values() if t.score is not None and t.probe != WEIGHTS}
        probes = default_probes(model, seed=seed, kinds=[k for k in probes_kinds(needed)])
    check_probes(model, probes)
    n = model.cfg.n_layers * model.cfg.n_heads
    null_model = random_weights_model(model, seed=seed)
    per = collect(null_model, probes, types, batch_size=batch_size, progress=progress)
    out = {"random_weights": _effective(_means(per, types, {}, n), types)}
    del null_model
    if "repeated" in probes:
        rep = probes["repeated"]
        n_max = int(rep.n_per_seq.max())
        shuffled = repeated_tokens(
            model,
            n=n_max,
            n_min=int(rep.n_per_seq.min()) if rep.n_per_seq.unique().numel() > 1 else None,
            n_seqs=rep.n_seqs,
            seed=seed,
            shuffled=True,
            prefix=rep.seq_len - 2 * n_max,
        )
        rep_types = {k: t for k, t in types.items() if t.probe == "repeated"}
        per = collect(model, ProbeSet(repeated=shuffled), rep_types, batch_size=batch_size, progress=progress)
        out["shuffled"] = _effective(_means(per, rep_types, {}, n), rep_types)
    return out


def probes_kinds(needed) -> list[str]:

    return [k for k in probe_kinds() if k in needed]


def null_levels(nulls: dict[str, dict[str, np.ndarray]], thresholds: dict[str, float] | None = None) -> pd.DataFrame:
    """Per labelled type: threshold, each null's max and 99th percentile over heads, and whether the threshold clears them."""
    types = head_types()
    rows = []
    for name, t in types.items():
        if not t.label:
            continue
        limit = (thresholds or {}).get(name, t.threshold)
        row = {"label": name, "score": t.column, "threshold": limit}
        worst = -np.inf
        for null, scores in nulls.items():
            values = scores.get(t.column)
            if values is None or not np.isfinite(values).any():
                continue
            values = values[np.isfinite(values)]
            row[f"{null}_max"] = float(values.max())
            row[f"{null}_q99"] = float(np.quantile(values, 0.99))
            worst = max(worst, float(values.max()))
        if worst == -np.inf:
            if all(scores.get(t.column) is None for scores in nulls.values()):
                raise HeadlensError(f"no null scores for {name!r}: run null_scores with the probe kind {t.probe!r}")
            # the probes define no score for it (e.g. code windows without a re-used name): nothing to clear
            rows.append({**row, "null_max": np.nan, "clears": np.nan})
            continue
        row["null_max"] = worst
        row["clears"] = bool(limit > worst)
        rows.append(row)
    return pd.DataFrame(rows)

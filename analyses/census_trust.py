"""A census you can trust, held out (issues 13 and 24), on the default Qwen.

Development and measurement are kept apart. Every probe size and threshold was chosen on development seeds 0, 1, 2
(``dev_sizes.csv``, ``dev_thresholds.csv``), then frozen (the commit that says so); stability is measured on fresh
seeds 3, 4, 5 that no choice ever saw. Seeds draw disjoint data: each text kind takes seed ``s``'s own stretch of the
``score`` split's windows (``headlens.data.corpus.window_block``), repeated random tokens come from the seed's own
generator; ``sources.json`` lists every window and a test checks that no two seeds share one. Causal checks evaluate on
the ``eval`` split (other files) with ablation means from the ``reference`` split (a third set of files).

Writes analyses/results/census_trust/:
- dev_sizes.csv             development seeds 0-2: agreement at each number of sequences per probe kind
- dev_thresholds.csv        development seeds 0-2: agreement and `other` share at other thresholds
- dev_rules.csv             development seeds 0-2: agreement of other labelling rules (RULES) at code sizes 48-80
- dev_scaling.csv           development seeds 0-2: labels that change across seeds at 0.25-1.67x the frozen sizes
- rule_check.csv            the census's rule and the rule development picked (CANDIDATE_RULE) on fresh seeds 3-5 and
                            on seeds 6-8, scored only after that choice (step unseen)
- census_seed{0..8}.csv     the census at the frozen settings (seeds 0-2 development, 3-5 fresh, 6-8 unseen)
- stability.json            fresh seeds 3-5 (and development seeds 0-2, unseen seeds 6-8): labels kept, over all heads,
                            over heads with a specific label, per label, bulk labels separately, and what a
                            confident label promises at another seed (confident_kept)
- stability_by_label.csv    the per-label part of stability.json as a table
- sources.json              every probe window of every seed (file@token)
- counts.csv                heads per label at seed 0 with 95 % bootstrap intervals
- null.csv                  each label's threshold vs its null (random-weights Qwen, shuffled repeats)
- causal.csv                label -> behaviour -> task/metric -> verdict (headlens.census.validate.causal_validation)
- key_path.csv              previous-token heads ablated only on the path into the induction heads' keys
- causal_draws.csv          every causal check of causal.csv (draw 0) again on draws 1 and 2: other evaluation and
                            reference data, other random head sets, the same labelled heads (step draws)
- noise_model.csv           agreement of three seeds predicted from sampling noise alone at 1-32x the probe data,
                            and at 16x of one probe kind or of all but one (from the nine census_seed tables: step
                            noise needs no model)
- census_scaled_seed{9..11}.csv, scaled.json, scaled_sources.json
                            a third fresh triple at several times the frozen probe sizes, as many as the score split
                            holds for three seeds (scaled_plan), beside what the noise model predicted (step scaled)
- summary.json              the headline numbers, timings, provenance

Steps, each resumable (per-sequence scores are cached in /tmp/headlens_census_trust; run each under the lock):

    python analyses/census_trust.py --step dev       # one development seed per call (0, 1, 2), development sizes
    python analyses/census_trust.py --step fresh     # one fresh seed per call (3, 4, 5), frozen sizes
    python analyses/census_trust.py --step unseen    # one seed per call (6, 7, 8), frozen sizes: the rule check
    python analyses/census_trust.py --step null
    python analyses/census_trust.py --step causal    # one label per call (--budget-s 300: more while it lasts)
    python analyses/census_trust.py --step keypath
    python analyses/census_trust.py --step write     # every result file from the cached steps (seconds)
    python analyses/census_trust.py --step draws     # one (draw, label) of causal_draws.csv per call (--budget-s)
    python analyses/census_trust.py --step scaled    # one scaled seed per call (9, 10, 11), then its files
    python analyses/census_trust.py --step noise     # noise_model.csv from the committed census_seed tables
    python analyses/census_trust.py                  # all missing steps, then write
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlens import load_model
from headlens.census.calibrate import null_levels, null_scores
from headlens.census.registry import WEIGHTS, head_types
from headlens.census.run import (
    PerSequence,
    _effective,
    _label,
    _means,
    build_table,
    collect,
    label_names,
    label_thresholds,
)
from headlens.census.validate import LABEL_TASKS, causal_validation, key_path_effects, task_data
from headlens.data.code import code_capacity
from headlens.data.corpus import SEED_STRIDE, provenance
from headlens.data.probes import DEFAULT_SIZES, ProbeSet, default_probes, window_capacity
from headlens.io import code_version, weights_sha256, write_csv, write_json

OUT = Path(__file__).parent / "results" / "census_trust"
CACHE = Path("/tmp/headlens_census_trust")  # per-sequence scores and partial results (not committed)
DEV_SEEDS = (0, 1, 2)
FRESH_SEEDS = (3, 4, 5)
UNSEEN_SEEDS = (6, 7, 8)
"""Seeds scored only to check a labelling rule chosen on the development seeds (``rule_check.csv``), after the choice."""
CANDIDATE_RULE = "interval"
"""The rule ``dev_rules.csv`` picks by the criterion fixed before it ran: the highest agreement over specifically
labelled heads at the frozen sizes on development seeds (ties: the census's ``point``). Not the census default yet."""
DEV_SIZES = {"repeated": 48, "natural": 80, "delimiter": 80, "code": 80}
"""Development runs score this many sequences per kind; the sizes tried are their leading subsets (the same windows
a smaller census at that seed draws)."""
SIZE_GRID = [
    {"repeated": r, "natural": t, "delimiter": t, "code": c}
    for r in (24, 48)
    for t in (48, 64, 80)
    for c in (48, 64, 80)
]
FROZEN = {k: DEFAULT_SIZES[k] for k in DEV_SIZES}
"""The frozen census sizes (the default census's), measured on fresh seeds."""
BULK = ("first_token", "local", "other")
CAUSAL_FIRST = ("previous_token", "closer_to_opener", "bracket_matching", "induction", "delimiter")
"""The causal step's order (each label is a resumable unit of a few minutes): the issue's must-show labels first."""
CAUSAL_SEQS = 16
N_RANDOM = 20
DRAWS = (1, 2)
"""The causal checks' other evaluation draws (causal.csv is draw 0): seed ``s`` of ``causal_validation`` takes block
``s`` of the ``eval`` and ``reference`` splits (other random-token generators for the repeat task; the successor
prompts are fixed, so only its reference and random sets change) and its own layer-matched random sets."""


SCALED_SEEDS = (9, 10, 11)
"""A third fresh triple, with more probe data (step scaled): seeds no step used before, every probe kind at
:func:`scaled_plan`'s multiple of its frozen size. The text kinds' windows come after every window the development
seeds read; windows of seeds 3-8 (only ever measured) may be read again: the score split is too small for more."""
MAX_SCALE = 16
"""The most probe data :func:`scaled_plan` asks for: what the noise model says the targets need."""


# ---------------------------------------------------------------- agreement


def agreement(tables: list[pd.DataFrame]) -> dict:
    """Labels kept across seeds: over all heads; over heads with a specific label (not first_token, local or other)
    in any seed; per label (heads with that label in any seed that keep it in every seed); heads confident >= 0.9."""
    labels = np.stack([t["label"].to_numpy() for t in tables])
    same = (labels == labels[0]).all(0)
    specific = ~np.isin(labels, BULK).all(0)
    out = {
        "n_heads": int(len(same)),
        "same_label": float(same.mean()),
        "n_same": int(same.sum()),
        "n_specific_any_seed": int(specific.sum()),
        "n_specific_same": int((same & specific).sum()),
        "specific_same_label": float(same[specific].mean()) if specific.any() else None,
    }
    per = {}
    for label in sorted(set(labels.flatten())):
        anywhere = (labels == label).any(0)
        per[label] = {
            "n_any_seed": int(anywhere.sum()),
            "n_every_seed": int((labels == label).all(0).sum()),
            "kept": float((labels == label).all(0)[anywhere].mean()),
            "bulk": label in BULK,
        }
    out["by_label"] = per
    if all("confidence" in t and t["confidence"].notna().all() for t in tables):
        confident = np.stack([t["confidence"].to_numpy() >= 0.9 for t in tables]).all(0)
        out["n_confident_all_seeds"] = int(confident.sum())
        out["same_label_among_confident"] = float(same[confident].mean()) if confident.any() else None
        out.update(confident_kept(tables))
    return out


def confident_kept(tables: list[pd.DataFrame], level: float = 0.9) -> dict:
    """What a confident label promises on other data: over ordered pairs of seeds (a, b), the heads whose label at
    ``a`` has confidence >= ``level``, and the share of them with the same label at ``b`` (all such heads, and those
    whose label at ``a`` is specific). Unlike ``same_label_among_confident`` it does not pick heads by the outcome."""
    labels = np.stack([t["label"].to_numpy() for t in tables])
    sure = np.stack([t["confidence"].to_numpy() >= level for t in tables])
    specific = sure & ~np.isin(labels, BULK)
    pairs = list(itertools.permutations(range(len(tables)), 2))
    agree = [labels[a] == labels[b] for a, b in pairs]
    kept = sum(int((same & sure[a]).sum()) for same, (a, _) in zip(agree, pairs))
    kept_specific = sum(int((same & specific[a]).sum()) for same, (a, _) in zip(agree, pairs))
    n = sum(int(sure[a].sum()) for a, _ in pairs)
    n_specific = sum(int(specific[a].sum()) for a, _ in pairs)
    return {
        "confident_level": level,
        "n_confident_pairs": n,
        "confident_kept_pairwise": kept / n if n else None,
        "n_confident_specific_pairs": n_specific,
        "confident_specific_kept_pairwise": kept_specific / n_specific if n_specific else None,
    }


RULES = ("point", "modal", "interval")
"""Labelling rules compared on development seeds only (``dev_rules.csv``): ``point`` is the census's (the label of the
mean scores); ``modal`` the label most bootstrap resamples give; ``interval`` lets a type be a candidate only where the
2.5th percentile of its (sink-aware) score over resamples reaches the threshold."""


def rule_labels(per: PerSequence, types, limits, *, seed: int, L: int, H: int, n_boot: int = 200) -> dict:
    """``{rule: label per head}`` for :data:`RULES` (the bootstrap is the census's: same generator and resamples)."""
    names = np.asarray(label_names(types))
    means = _means(per, types, {k: None for k in per.by_kind}, L * H)
    eff = _effective(means, types)
    rng = np.random.default_rng(int(seed) + 12345)
    boots, effs = [], []
    for _ in range(n_boot):
        picks = {k: rng.integers(0, v["_sink"].shape[0], v["_sink"].shape[0]) for k, v in per.by_kind.items()}
        m = _means(per, types, picks, L * H)
        boots.append(_label(m, types, limits))
        effs.append(_effective(m, types))
    boots = np.stack(boots)
    clears = {
        t.name: np.percentile(np.stack([e[t.column] for e in effs]), 2.5, axis=0) >= limits[t.name]
        for t in types.values()
        if t.label and t.column in eff
    }
    out = {
        "point": _label(means, types, limits),
        "modal": np.array([np.bincount(boots[:, i], minlength=len(names)).argmax() for i in range(L * H)]),
        "interval": _label(means, types, limits, clears),
    }
    return {rule: names[v] for rule, v in out.items()}


def flat(a: dict) -> dict:
    """An :func:`agreement` without its per-label part (one table row)."""
    return {k: v for k, v in a.items() if not isinstance(v, dict)}


def rule_agreement(pers, seeds, rules, types, limits, *, L: int, H: int) -> dict[str, dict]:
    """``{rule: agreement across seeds}`` of the labels :func:`rule_labels` gives each seed's per-sequence scores."""
    by_seed = [rule_labels(p, types, limits, seed=s, L=L, H=H) for p, s in zip(pers, seeds)]
    return {rule: agreement([pd.DataFrame({"label": labels[rule]}) for labels in by_seed]) for rule in rules}


def dev_rules(dev, seeds, types, limits, *, L: int, H: int) -> pd.DataFrame:
    """Development seeds only: agreement across seeds of each rule at code probe sizes 48, 64 and 80 (other kinds at
    the frozen sizes). Groundwork for the next frozen settings, which must then be measured on seeds never seen."""
    rows = []
    for code in sorted({FROZEN["code"], 64, 80}):
        sizes = dict(FROZEN, code=code)
        pers = [subset(p, sizes) for p, _, _ in dev]
        for rule, a in rule_agreement(pers, seeds, RULES, types, limits, L=L, H=H).items():
            rows.append({"code": code, "rule": rule, "frozen": code == FROZEN["code"] and rule == "point", **flat(a)})
    out = pd.DataFrame(rows)
    # the criterion fixed before the run: best specific-label agreement at the frozen sizes, ties to the census's rule
    at = out[out["code"] == FROZEN["code"]].sort_values("rule", key=lambda r: r != "point", kind="stable")
    out["picked"] = out.index == at["specific_same_label"].fillna(-1).idxmax()
    return out


SCALES = (0.25, 0.5, 0.75, 1.0, 1.33, 1.67)
"""Probe sizes tried by :func:`dev_scaling`, as multiples of the frozen sizes (capped at ``DEV_SIZES``)."""


def dev_scaling(dev, seeds, types, limits, *, L: int, H: int) -> pd.DataFrame:
    """Development seeds only: heads whose label changes across seeds when every probe kind gets ``scale`` times its
    frozen number of sequences (the leading windows of each seed), under the census's rule and the candidate rule.
    Says how far more probe data alone moves agreement: sampling noise shrinks like 1/sqrt(sequences)."""
    rows = []
    for scale in SCALES:
        sizes = {k: min(DEV_SIZES[k], round(FROZEN[k] * scale)) for k in FROZEN}
        pers = [subset(p, sizes) for p, _, _ in dev]
        for rule, a in rule_agreement(pers, seeds, ("point", CANDIDATE_RULE), types, limits, L=L, H=H).items():
            rows.append({"scale": scale, **sizes, "rule": rule, "n_changed": a["n_heads"] - a["n_same"],
                         "n_specific_changed": a["n_specific_any_seed"] - a["n_specific_same"], **flat(a)})  # fmt: skip
    return pd.DataFrame(rows)


def scaling_fit(scaling: pd.DataFrame) -> dict:
    """Per rule, least squares of changed heads (all; specific) on 1/sqrt(scale): ``[intercept, slope]``. Sampling
    noise alone would give an intercept near 0 (no changes at unlimited data); a larger one is what more data of the
    same kind cannot remove."""
    out = {}
    for rule, part in scaling.groupby("rule", sort=False):
        x = np.c_[np.ones(len(part)), 1 / np.sqrt(part["scale"].to_numpy(dtype=float))]
        out[rule] = {
            col: [round(float(v), 2) for v in np.linalg.lstsq(x, part[col].to_numpy(dtype=float), rcond=None)[0]]
            for col in ("n_changed", "n_specific_changed")
        }
    return out


NOISE_SCALES = (1, 2, 4, 8, 16, 32)
"""Multiples of the frozen probe sizes at which :func:`noise_model` predicts agreement."""
KIND_SCALE = 16
"""noise_model.csv's per-kind rows: one probe kind at this multiple (the others at 1x), and every kind but one."""


def table_means(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """A census table's mean scores as the labelling rule reads them (``_label`` gives back the table's labels)."""
    means = {c: table[c].to_numpy(float) for c in table.columns if table[c].dtype.kind == "f"}
    means.update({f"_sink:{c.removeprefix('sink_')}": means[c] for c in table.columns if c.startswith("sink_")})
    return means


def noise_plans(types, scales=NOISE_SCALES) -> list[tuple[str, float, tuple[str, ...] | None]]:
    """(``kinds`` name, scale, probe kinds scaled; None: every score) of each noise_model.csv row: every kind at each
    of ``scales``, then each kind alone and every kind but one at :data:`KIND_SCALE` (which probes the data is for)."""
    kinds = sorted({t.probe for t in types.values() if t.probe != WEIGHTS and t.score is not None} - {"predicted"})
    plans = [("all", scale, None) for scale in scales]
    plans += [(kind, KIND_SCALE, (kind,)) for kind in kinds]
    return plans + [(f"all but {kind}", KIND_SCALE, tuple(k for k in kinds if k != kind)) for kind in kinds]


def noise_model(tables, types, limits, *, plans=None, n_sim: int = 200, seed: int = 0) -> pd.DataFrame:
    """Agreement of three seeds that sampling noise alone predicts, with more probe data: one row per plan of
    ``plans`` (default :func:`noise_plans`; the first plan's numbers do not depend on the ones after it).

    A head's true score is its mean over ``tables`` (every scored seed); a simulated seed draws each score column
    from a normal around it with the census's bootstrap standard error ((hi - lo) / 3.92, averaged over ``tables``)
    divided by the square root of the scale of its probe kind, columns independently, sink shares fixed; labels by
    the census's rule. Rows: the 5th, 50th and 95th percentile over ``n_sim`` simulated triples of
    :func:`agreement`'s ``same_label`` and ``specific_same_label``, and the mean number of heads with a specific label
    in any seed. The 1x row checks the model against the measured triples; the others say how much more data, and
    of which probe kinds, the targets would need."""
    names = np.asarray(label_names(types))
    means = [table_means(t) for t in tables]
    truth = {k: np.mean([m[k] for m in means], 0) for k in means[0]}
    noisy = [c.removesuffix("_lo") for c in tables[0].columns if c.endswith("_lo")]  # every _lo has its _hi
    se = {c: np.nan_to_num(np.mean([(t[f"{c}_hi"] - t[f"{c}_lo"]).to_numpy(float) for t in tables], 0) / 3.92)
          for c in noisy}  # fmt: skip
    kind_of = {c: types[c.removesuffix("_nosink")].probe for c in noisy if c.removesuffix("_nosink") in types}
    rng = np.random.default_rng(seed)
    rows = []
    for name, scale, kinds in noise_plans(types) if plans is None else plans:
        factor = {c: scale if kinds is None or kind_of.get(c) in kinds else 1.0 for c in noisy}
        got = []
        for _ in range(n_sim):
            labels = []
            for _ in range(3):
                drawn = {
                    **truth,
                    **{c: truth[c] + rng.standard_normal(len(se[c])) * se[c] / np.sqrt(factor[c]) for c in noisy},
                }
                labels.append(pd.DataFrame({"label": names[_label(drawn, types, limits)]}))
            a = agreement(labels)
            got.append((a["same_label"], a["specific_same_label"], a["n_specific_any_seed"]))
        got = np.array(got, dtype=float)
        row = {"kinds": name, "scale": scale, "n_sim": n_sim}
        for i, key in enumerate(("same_label", "specific_same_label")):
            row.update({f"{key}_p{q}": float(np.percentile(got[:, i], q)) for q in (5, 50, 95)})
        rows.append({**row, "n_specific_any_seed": float(got[:, 2].mean())})
    return pd.DataFrame(rows)


SCORED_SEEDS = DEV_SEEDS + FRESH_SEEDS + UNSEEN_SEEDS
"""Every seed with a committed census table at the frozen sizes: what the noise model reads."""


def scored_tables(out: Path | None = None) -> list[pd.DataFrame]:
    """The committed census tables of :data:`SCORED_SEEDS` in ``out`` (default :data:`OUT`)."""
    return [pd.read_csv((OUT if out is None else out) / f"census_seed{s}.csv") for s in SCORED_SEEDS]


def write_noise_model(types, limits) -> pd.DataFrame:
    """noise_model.csv from the committed census tables of every scored seed."""
    model = noise_model(scored_tables(), types, limits)
    write_csv(model.assign(seeds=" ".join(map(str, SCORED_SEEDS))), OUT / "noise_model.csv")
    return model


def subset(per: PerSequence, sizes: dict) -> PerSequence:
    """The per-sequence scores of the first ``sizes[kind]`` sequences of each kind (what a smaller census draws)."""
    return PerSequence({k: {c: v[: sizes[k]] for c, v in cols.items()} for k, cols in per.by_kind.items()}, per.weights)


# ---------------------------------------------------------------- cached steps


def cache_path(name: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE / name


def check_cache(model) -> None:
    """The cached steps belong to this model, this headlens code and these sizes (``stamp.json``), or the run stops:
    a step cached by other code or for another model would be mixed into the results without a word."""
    stamp = {
        "model": model.cfg.model_name,
        "weights": weights_sha256(model),
        "code": code_version(),
        "sizes": {"dev": DEV_SIZES, "frozen": FROZEN, "grid": SIZE_GRID, "causal": CAUSAL_SEQS, "random": N_RANDOM},
    }
    stamp = json.loads(json.dumps(stamp))
    path = cache_path("stamp.json")
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = [k for k in stamp if saved.get(k) != stamp[k]]
        if differ:
            raise SystemExit(f"error: {CACHE} holds steps made with another {', '.join(differ)}: delete it to rerun")
    elif any(CACHE.iterdir()):
        raise SystemExit(f"error: {CACHE} holds steps of unknown origin (no stamp.json): delete it to rerun")
    write_json(path, stamp)


def save_per(path: Path, per: PerSequence, sources: dict, seconds: float) -> None:
    arrays = {f"{k}|{c}": v for k, d in per.by_kind.items() for c, v in d.items()}
    np.savez(path.with_suffix(".tmp.npz"), **arrays, **{f"{WEIGHTS}|{c}": v for c, v in per.weights.items()})
    path.with_suffix(".tmp.npz").replace(path)
    write_json(path.with_suffix(".json"), {"sources": sources, "seconds": seconds})


def load_per(path: Path) -> tuple[PerSequence, dict, float]:
    per = PerSequence({}, {})
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            kind, col = key.split("|", 1)
            (per.weights if kind == WEIGHTS else per.by_kind.setdefault(kind, {}))[col] = z[key]
    meta = json.loads(path.with_suffix(".json").read_text())
    return per, meta["sources"], meta["seconds"]


def probes_for(model, seed: int, sizes: dict) -> ProbeSet:
    """The census probes of ``seed`` with ``sizes[kind]`` sequences per kind."""
    return ProbeSet(
        {kind: default_probes(model, seed=seed, n_seqs=n, kinds=[kind])[kind] for kind, n in sizes.items()}, seed=seed
    )


def census_step(model, seed: int, sizes: dict, name: str) -> None:
    """Score the census probes of ``seed`` (``sizes`` sequences per kind) and cache the per-sequence scores."""
    start = time.perf_counter()
    probes = probes_for(model, seed, sizes)
    per = collect(model, probes, head_types(), batch_size=8, progress=False)
    sources = {k: list(p.sources) for k, p in probes.items() if p.sources}
    save_per(cache_path(name), per, sources, time.perf_counter() - start)
    print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)


# ---------------------------------------------------------------- steps


def scored(prefix: str, seeds) -> bool:
    """Every seed of ``seeds`` has its cached per-sequence scores."""
    return all(cache_path(f"{prefix}_seed{s}.npz").exists() for s in seeds)


def step_seeds(model, prefix: str, seeds, sizes: dict) -> bool:
    """Score the next seed of ``seeds`` whose cache is missing (False: none left)."""
    for seed in seeds:
        name = f"{prefix}_seed{seed}.npz"
        if not cache_path(name).exists():
            census_step(model, seed, sizes, name)
            return True
    return False


def step_dev(model) -> bool:
    return step_seeds(model, "dev", DEV_SEEDS, DEV_SIZES)


def step_fresh(model) -> bool:
    return step_seeds(model, "fresh", FRESH_SEEDS, FROZEN)


def step_unseen(model) -> bool:
    return step_seeds(model, "unseen", UNSEEN_SEEDS, FROZEN)


def rule_check(types, limits, *, L: int, H: int) -> pd.DataFrame:
    """The census's rule and :data:`CANDIDATE_RULE` on seeds no choice saw: fresh 3-5 and unseen 6-8 (frozen sizes)."""
    rows = []
    for prefix, seeds in (("fresh", FRESH_SEEDS), ("unseen", UNSEEN_SEEDS)):
        if not scored(prefix, seeds):
            continue
        pers = [subset(load_per(cache_path(f"{prefix}_seed{s}.npz"))[0], FROZEN) for s in seeds]
        for rule, a in rule_agreement(pers, seeds, ("point", CANDIDATE_RULE), types, limits, L=L, H=H).items():
            rows.append({"seeds": f"{prefix} {seeds[0]}-{seeds[-1]}", "rule": rule, **flat(a),
                         "meets_97_95": bool(a["same_label"] >= 0.97 and (a["specific_same_label"] or 0) >= 0.95)})  # fmt: skip
    return pd.DataFrame(rows)


def step_null(model) -> bool:
    path = cache_path("nulls.npz")
    if path.exists():
        return False
    start = time.perf_counter()
    probes = probes_for(model, 0, FROZEN)
    nulls = null_scores(model, probes, seed=0, progress=False)
    np.savez(path.with_suffix(".tmp.npz"), **{f"{k}|{c}": v for k, d in nulls.items() for c, v in d.items()})
    path.with_suffix(".tmp.npz").replace(path)
    write_json(path.with_suffix(".json"), {"seconds": time.perf_counter() - start})
    print(f"null: {time.perf_counter() - start:.1f} s")
    return True


def seed_tables(model, seeds, prefix: str, sizes: dict, limits, n_boot: int = 200) -> list[pd.DataFrame]:
    types = head_types()
    out = []
    for seed in seeds:
        per, _, _ = load_per(cache_path(f"{prefix}_seed{seed}.npz"))
        out.append(build_table(model, subset(per, sizes), types, limits, seed=seed, n_boot=n_boot)[0])
    return out


def step_causal(model, table: pd.DataFrame) -> bool:
    path = cache_path("causal_rows.csv")
    done = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["label"])
    for label in causal_order(LABEL_TASKS):
        if label in set(done["label"]) or label not in set(table["label"]):
            continue
        start = time.perf_counter()
        row = causal_validation(
            model, table, labels=[label], n_random=N_RANDOM, n_seqs=CAUSAL_SEQS, seed=0, progress=False
        )
        row["seconds"] = time.perf_counter() - start
        write_csv(pd.concat([done, row], ignore_index=True), path)
        print(row.drop(columns=["behaviour", "metric"]).to_string(), flush=True)
        return True
    if not path.exists():
        write_csv(pd.DataFrame(columns=["label", "verdict", "seconds"]), path)
    return False


def causal_order(labels) -> list[str]:
    """``labels`` in the causal steps' order (:data:`CAUSAL_FIRST` first, then :data:`LABEL_TASKS`' order)."""
    return sorted(labels, key=lambda lb: CAUSAL_FIRST.index(lb) if lb in CAUSAL_FIRST else len(CAUSAL_FIRST))


def step_draws(model, table: pd.DataFrame) -> bool:
    """The next missing (draw, label) of :data:`DRAWS` (False: none left), then causal_draws.csv: draw 0 is
    causal.csv (written by step write), each row with the evaluation windows it read."""
    path = cache_path("causal_draws_rows.csv")
    done = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["draw", "label"])
    tested = causal_order(lb for lb in LABEL_TASKS if lb in set(table["label"]) and LABEL_TASKS[lb].task)
    for draw, label in itertools.product(DRAWS, tested):
        if ((done["draw"] == draw) & (done["label"] == label)).any():
            continue
        start = time.perf_counter()
        row = causal_validation(
            model, table, labels=[label], n_random=N_RANDOM, n_seqs=CAUSAL_SEQS, seed=draw, progress=False
        )
        row.insert(0, "draw", draw)
        row["eval_sources"] = eval_sources(model, label, draw)
        row["seconds"] = time.perf_counter() - start
        write_csv(pd.concat([done, row], ignore_index=True), path)
        print(row.drop(columns=["behaviour", "metric", "eval_sources"]).to_string(), flush=True)
        return True
    first = pd.read_csv(OUT / "causal.csv")
    first = first[first["label"].isin(tested)].assign(draw=0)
    first["eval_sources"] = [eval_sources(model, lb, 0) for lb in first["label"]]
    draws = pd.concat([first, done.drop(columns="seconds")], ignore_index=True)
    draws["order"] = draws["label"].map({lb: i for i, lb in enumerate(tested)})
    draws = draws.sort_values(["order", "draw"]).drop(columns="order")
    counts = ["n_label_heads", "n_heads", "expected_sign", "n_random", "eval_sequences", "eval_files"]
    draws[counts] = draws[counts].astype(int)  # causal.csv's are floats (its descriptive rows leave them empty)
    write_csv(draws[["draw", *(c for c in draws.columns if c != "draw")]], OUT / "causal_draws.csv")
    return False


def eval_sources(model, label: str, draw: int) -> str:
    """The evaluation windows (or random-token sequences) of ``label``'s task at ``draw``, space-separated."""
    return " ".join(task_data(model, LABEL_TASKS[label].task, n_seqs=CAUSAL_SEQS, seed=draw).eval_sources)


def step_keypath(model, table: pd.DataFrame) -> bool:
    path = cache_path("key_path.csv")
    if path.exists():
        return False
    senders = [(int(r.layer), int(r.head)) for r in table.itertuples() if r.label == "previous_token"]
    receivers = [(int(r.layer), int(r.head)) for r in table.itertuples() if r.label == "induction"]
    start = time.perf_counter()
    if senders and receivers:
        paths = key_path_effects(model, senders, receivers, n_random=N_RANDOM, n_seqs=CAUSAL_SEQS // 2, seed=0)
    else:  # nothing to send or to receive (not the default Qwen)
        paths = pd.DataFrame(columns=["kind", "heads", "metric", "effect"])
    write_csv(paths.assign(seconds=time.perf_counter() - start), path)
    print(paths.to_string())
    return True


def capacity(model) -> dict[str, int]:
    """Windows each text probe kind's score split holds (all that seeds which never share one can ask for)."""
    return {
        "natural": window_capacity(model, "natural"),
        "delimiter": window_capacity(model, "delimiter"),
        "code": code_capacity(model),
    }


def scaled_plan(held: dict[str, int]) -> dict:
    """The scaled triple's probes, from what the score split holds (``held``, :func:`capacity`) and nothing else: the
    largest whole multiple (at most :data:`MAX_SCALE`) of the frozen sizes at which each text kind gives the three
    seeds their own window blocks (:func:`headlens.data.corpus.window_block`), all after the development seeds'."""
    for scale in range(MAX_SCALE, 0, -1):
        sizes = {k: scale * n for k, n in FROZEN.items()}
        blocks = {}
        for kind, n in held.items():
            stride = max(SEED_STRIDE, sizes[kind])
            dev_end = max(s * max(SEED_STRIDE, DEV_SIZES[kind]) + DEV_SIZES[kind] for s in DEV_SEEDS)
            first = -(-dev_end // stride)
            if (first + len(SCALED_SEEDS) - 1) * stride + sizes[kind] > n:
                break
            blocks[kind] = [first + i for i in range(len(SCALED_SEEDS))]
        else:
            return {"scale": scale, "sizes": sizes, "blocks": blocks, "capacity": held}
    raise SystemExit(f"error: the score split holds too few windows for three scaled seeds ({held})")


def scaled_probes(model, seed: int, plan: dict) -> ProbeSet:
    """Seed ``seed`` of :data:`SCALED_SEEDS`: repeated tokens of its own generator, text windows of its blocks."""
    i = SCALED_SEEDS.index(seed)
    block = {kind: b[i] for kind, b in plan["blocks"].items()}
    return ProbeSet(
        {
            kind: default_probes(model, seed=block.get(kind, seed), n_seqs=n, kinds=[kind])[kind]
            for kind, n in plan["sizes"].items()
        },
        seed=seed,
    )


def step_scaled(model) -> bool:
    """Score the next scaled seed whose cache is missing; when all are scored, write the scaled triple's results
    (False: nothing left to score)."""
    plan = None
    for seed in SCALED_SEEDS:
        path = cache_path(f"scaled_seed{seed}.npz")
        if path.exists():
            continue
        plan = plan or scaled_plan(capacity(model))
        start = time.perf_counter()
        probes = scaled_probes(model, seed, plan)
        per = collect(model, probes, head_types(), batch_size=8, progress=False)
        sources = {k: list(p.sources) for k, p in probes.items() if p.sources}
        save_per(path, per, sources, time.perf_counter() - start)
        write_json(cache_path(f"scaled_seed{seed}.plan.json"), plan)
        print(f"scaled seed {seed} ({plan['scale']}x): {time.perf_counter() - start:.1f} s", flush=True)
        return True
    write_scaled(model)
    return False


def write_scaled(model) -> None:
    """scaled.json, census_scaled_seed{9,10,11}.csv and scaled_sources.json from the cached scaled seeds, beside the
    noise model's prediction for that much data (from the nine census_seed tables, made before)."""
    types = head_types()
    limits = label_thresholds(types, None)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    plans = [json.loads(cache_path(f"scaled_seed{s}.plan.json").read_text()) for s in SCALED_SEEDS]
    if any(p != plans[0] for p in plans):
        raise SystemExit(f"error: the scaled seeds in {CACHE} were scored with different plans: delete them to rerun")
    plan = plans[0]
    cached = [load_per(cache_path(f"scaled_seed{s}.npz")) for s in SCALED_SEEDS]
    tables = [
        build_table(model, per, types, limits, seed=s, n_boot=200)[0] for (per, _, _), s in zip(cached, SCALED_SEEDS)
    ]
    sources = {str(s): src for s, (_, src, _) in zip(SCALED_SEEDS, cached)}
    # windows read before: the development seeds' (all DEV_SIZES of them, rebuilt), then each later seed's
    text = {kind: DEV_SIZES[kind] for kind in plan["blocks"]}
    seen = {"development": {w for s in DEV_SEEDS for p in probes_for(model, s, text).values() for w in p.sources}}
    earlier = json.loads((OUT / "sources.json").read_text())
    seen.update({s: {w for ws in earlier[s].values() for w in ws} for s in earlier if int(s) not in DEV_SEEDS})
    mine = {w for by_kind in sources.values() for ws in by_kind.values() for w in ws}
    predicted = noise_model(scored_tables(), types, limits, plans=[("all", plan["scale"], None)]).iloc[0]
    measured = agreement(tables)
    interval = rule_agreement([p for p, _, _ in cached], SCALED_SEEDS, (CANDIDATE_RULE,), types, limits, L=L, H=H)
    scaled = {
        "seeds": list(SCALED_SEEDS),
        **plan,
        "windows_shared": {s: len(mine & w) for s, w in seen.items()},  # development: 0 by the plan
        "predicted": {k: float(v) for k, v in predicted.items() if k.startswith(("same_label", "specific_same"))},
        "measured": measured,
        "rule_" + CANDIDATE_RULE: flat(interval[CANDIDATE_RULE]),
        "targets_met": bool(measured["same_label"] >= 0.97 and (measured["specific_same_label"] or 0) >= 0.95),
        "seconds": {str(s): round(sec, 1) for s, (_, _, sec) in zip(SCALED_SEEDS, cached)},
    }
    for seed, table in zip(SCALED_SEEDS, tables):  # every file once everything is computed
        write_csv(table, OUT / f"census_scaled_seed{seed}.csv")
    write_json(OUT / "scaled_sources.json", sources)
    write_json(OUT / "scaled.json", scaled)


# ---------------------------------------------------------------- results


def write_results(model) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    types = head_types()
    limits = label_thresholds(types, None)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    frozen = FROZEN
    dev_seeds = tuple(s for s in DEV_SEEDS if scored("dev", [s]))
    complete = dev_seeds == DEV_SEEDS  # development comparisons need all three development seeds

    dev = [load_per(cache_path(f"dev_seed{s}.npz")) for s in dev_seeds]
    rows = []
    for sizes in SIZE_GRID:
        tables = [
            build_table(model, subset(p, sizes), types, limits, seed=s, n_boot=0)[0]
            for (p, _, _), s in zip(dev, dev_seeds)
        ]
        a = agreement(tables)
        rows.append({**sizes, "frozen": sizes == frozen, **flat(a)})
    if complete:
        write_csv(pd.DataFrame(rows), OUT / "dev_sizes.csv")

    dev_tables = seed_tables(model, dev_seeds, "dev", frozen, limits)
    fresh_tables = seed_tables(model, FRESH_SEEDS, "fresh", frozen, limits)
    unseen = UNSEEN_SEEDS if scored("unseen", UNSEEN_SEEDS) else ()
    unseen_tables = seed_tables(model, unseen, "unseen", frozen, limits)
    for seed, table in zip(dev_seeds + FRESH_SEEDS + unseen, dev_tables + fresh_tables + unseen_tables):
        write_csv(table, OUT / f"census_seed{seed}.csv")

    fresh = agreement(fresh_tables)
    development = (
        agreement(dev_tables) if complete else {"by_label": {}, "note": f"development seeds cached: {dev_seeds}"}
    )
    stability = {
        "settings": {"sizes": frozen, "thresholds": limits},
        "fresh_seeds": list(FRESH_SEEDS),
        "fresh": fresh,
        "development_seeds": list(dev_seeds),
        "development": development,
        "unseen_seeds": list(unseen),  # scored after every choice, the labelling rule's included: a second fresh triple
        "unseen": agreement(unseen_tables) if unseen else {"by_label": {}, "note": "unseen seeds not scored"},
        "targets": {"same_label": 0.97, "specific_same_label": 0.95},
        "targets_met_on_fresh_seeds": bool(fresh["same_label"] >= 0.97 and (fresh["specific_same_label"] or 0) >= 0.95),
        "label_counts_by_seed": {
            s: t["label"].value_counts().to_dict() for s, t in zip(dev_seeds + FRESH_SEEDS, dev_tables + fresh_tables)
        },
    }
    write_json(OUT / "stability.json", stability)
    by_label = pd.DataFrame(
        [{"seeds": "fresh 3-5", "label": k, **v} for k, v in fresh["by_label"].items()]
        + [{"seeds": "development 0-2", "label": k, **v} for k, v in development["by_label"].items()]
    )
    write_csv(by_label, OUT / "stability_by_label.csv")
    if unseen:
        write_noise_model(types, limits)

    sources = {}
    for prefix, seeds in (("dev", dev_seeds), ("fresh", FRESH_SEEDS), ("unseen", unseen)):
        for seed in seeds:
            _, src, _ = load_per(cache_path(f"{prefix}_seed{seed}.npz"))
            sources[str(seed)] = {k: v[: frozen[k]] for k, v in src.items()}
    write_json(OUT / "sources.json", sources)

    threshold_rows = []
    grid = {
        "local": (0.3, 0.4),
        "first_token": (0.3, 0.4),
        "closer_to_opener": (0.1, 0.12, 0.15),
        "bracket_matching": (0.25, 0.3),
    }
    for name, values in grid.items():
        for value in values:
            alt = label_thresholds(types, {name: value})
            tables = [
                build_table(model, subset(p, frozen), types, alt, seed=s, n_boot=0)[0]
                for (p, _, _), s in zip(dev, dev_seeds)
            ]
            a = agreement(tables)
            threshold_rows.append(
                {
                    "threshold": name,
                    "value": value,
                    "frozen": limits[name] == value,
                    "same_label": a["same_label"],
                    "specific_same_label": a["specific_same_label"],
                    "other_share_seed0": float((tables[0]["label"] == "other").mean()),
                    "n_label_seed0": int((tables[0]["label"] == name).sum()),
                }
            )
    if complete:
        write_csv(pd.DataFrame(threshold_rows), OUT / "dev_thresholds.csv")
        write_csv(dev_rules(dev, dev_seeds, types, limits, L=L, H=H), OUT / "dev_rules.csv")
        scaling = dev_scaling(dev, dev_seeds, types, limits, L=L, H=H)
        write_csv(scaling, OUT / "dev_scaling.csv")
    check = rule_check(types, limits, L=L, H=H)
    if len(check):
        write_csv(check, OUT / "rule_check.csv")

    seed0, counts = build_table(model, subset(dev[0][0], frozen), types, limits, seed=0)
    write_csv(counts, OUT / "counts.csv")

    # the causal, key-path and null steps are written when they have run (a partial write says which are missing)
    levels = pd.DataFrame(columns=["label", "clears"])
    if cache_path("nulls.npz").exists():
        with np.load(cache_path("nulls.npz"), allow_pickle=False) as z:
            nulls = {}
            for key in z.files:
                null, col = key.split("|", 1)
                nulls.setdefault(null, {})[col] = z[key]
        levels = null_levels(nulls)
        write_csv(levels, OUT / "null.csv")
    causal = pd.DataFrame(columns=["label", "verdict", "seconds"])
    if cache_path("causal_rows.csv").exists():
        causal = pd.read_csv(cache_path("causal_rows.csv"))
        order = {lb: i for i, lb in enumerate(LABEL_TASKS)}
        causal = causal.sort_values("label", key=lambda s: s.map(order)).reset_index(drop=True)
        write_csv(causal.drop(columns="seconds"), OUT / "causal.csv")
    paths = pd.DataFrame(columns=["kind", "effect", "seconds"])
    if cache_path("key_path.csv").exists():
        paths = pd.read_csv(cache_path("key_path.csv"))
        write_csv(paths.drop(columns="seconds"), OUT / "key_path.csv")
    missing = [s for s in ("nulls.npz", "causal_rows.csv", "key_path.csv") if not cache_path(s).exists()]
    missing += [f"causal: {lb}" for lb in LABEL_TASKS if lb in set(seed0["label"]) and lb not in set(causal["label"])]

    timings = {
        f"census_{p}_seed{s}_s": round(load_per(cache_path(f"{p}_seed{s}.npz"))[2], 1)
        for p, ss in (("dev", dev_seeds), ("fresh", FRESH_SEEDS))
        for s in ss
    }
    timings["causal_s"] = round(float(causal["seconds"].sum()), 1)
    rand = paths[paths.kind == "random"]["effect"]
    target = float(paths[paths.kind == "target"]["effect"].iloc[0]) if len(paths) else None
    summary = {
        "model": "Qwen2.5-Coder-0.5B-Instruct (fp32, CPU)",
        "steps_missing": missing,
        "sizes": frozen,
        "seq_len": 128,
        "stability_fresh_seeds": {k: v for k, v in fresh.items() if k != "by_label"},
        "stability_development_seeds": {k: v for k, v in development.items() if k != "by_label"},
        "stability_unseen_seeds": {k: v for k, v in stability["unseen"].items() if k != "by_label"},
        "targets_met_on_fresh_seeds": stability["targets_met_on_fresh_seeds"],
        "dev_scaling_fit": scaling_fit(scaling) if complete else None,
        "other_share_seed0": float((seed0["label"] == "other").mean()),
        "labels_clear_null": {r.label: None if pd.isna(r.clears) else bool(r.clears) for r in levels.itertuples()},
        "verdicts": dict(zip(causal["label"], causal["verdict"])),
        "causal": {
            r.label: {"ratio": r.ratio, "lo": r.ratio_lo, "hi": r.ratio_hi, "n_heads": r.n_heads, "verdict": r.verdict}
            for r in causal.itertuples()
            if r.verdict != "descriptive"
        },
        "previous_token_key_path": {
            "effect": target,
            "random_mean": float(rand.mean()),
            "random_max": float(rand.max()),
            "p_random_ge": float((rand >= target).mean()),
        }
        if target is not None
        else None,
        "timings_s": timings,
        "provenance": {
            **provenance(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "argv": sys.argv,
            "seed_units_shared": shared_units(sources),
        },
    }
    write_json(OUT / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=2, default=float))


def shared_units(sources: dict) -> int:
    """Windows (file@token) that two seeds share: 0 by construction."""
    seen, shared = set(), 0
    for by_kind in sources.values():
        windows = {w for ws in by_kind.values() for w in ws}
        shared += len(windows & seen)
        seen |= windows
    return shared


STEPS = ("dev", "fresh", "unseen", "null", "causal", "keypath", "write", "draws", "scaled", "noise")


def main(argv=None, model=None) -> None:
    """Run one step (``--step``) or every missing step, then write; ``model``: default the real Qwen."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=STEPS, help="one step (default: every missing step, then write)")
    parser.add_argument("--budget-s", type=float, default=0, help="--step: repeat it (next seed, label) this long")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    if args.step == "noise":  # from the committed tables: no model, no cache
        types = head_types()
        print(write_noise_model(types, label_thresholds(types, None)).round(3).to_string(index=False))
        return

    def again() -> bool:
        return not args.step or time.perf_counter() - begin < args.budget_s

    if model is None:
        torch.set_num_threads(2)
        model = load_model()
    check_cache(model)
    limits = label_thresholds(head_types(), None)
    frozen = FROZEN
    todo = [args.step] if args.step else [s for s in STEPS if s != "noise"]  # write writes the noise model
    for step in todo:
        if step == "dev":
            while step_dev(model) and again():
                pass
        elif step == "fresh":
            while step_fresh(model) and again():
                pass
        elif step == "unseen":
            while step_unseen(model) and again():
                pass
        elif step == "null":
            step_null(model)
        elif step == "scaled":
            while step_scaled(model) and again():
                pass
        elif step in ("causal", "keypath", "draws"):
            per, _, _ = load_per(cache_path("dev_seed0.npz"))
            table = build_table(model, subset(per, frozen), head_types(), limits, seed=0, n_boot=0)[0]
            run = {"causal": step_causal, "keypath": step_keypath, "draws": step_draws}[step]
            while run(model, table) and again():
                pass
        else:
            write_results(model)


if __name__ == "__main__":
    main()

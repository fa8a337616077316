"""Head census: score every (layer, head) on seeded probes, label each head, and say how sure the label is.

What is scored comes from the head-type registry (:mod:`headlens.census.registry`): every registered type
with a score function adds a column, measured on the probe kind it names (or on the weights). The
built-in columns: ``previous_token``, ``first_token``, ``local`` and ``entropy`` on natural text (the
Python reference docs); ``delimiter`` on the Python standard library's code; ``duplicate_token`` and
``induction`` on repeated random tokens whose half-length varies per sequence; ``copying`` from the
weights. Patterns are reduced inside the attention hooks (``headlens.engine.capture``), one batch and one
layer at a time, to one number per *sequence*, so memory is one layer's pattern, never a cache. A sequence with
nothing to score (code without a re-used name) is NaN and left out of that column's mean.

Sink. Qwen prepends no BOS, yet most heads park attention on position 0. Each type registered with
``nosink=True`` also gets a ``<name>_nosink`` column: the score on the pattern with key 0 removed and
every query row renormalised over its other keys (TransformerLens' ``exclude_bos``). A head *sinks*
on a probe when its mean attention to position 0 there is at least ``SINK`` (0.3); labels then use the
``_nosink`` score, unless the head puts less than ``MIN_NONSINK`` (5 %) of its attention elsewhere
(then there is nothing left to read and the raw score is used).

Labels. A head is a *candidate* for every label whose (sink-aware) score reaches its threshold and
whose ``requires`` holds (``copy_suppression`` is prefix matching by a head whose OV circuit pushes down the
token it reads — ``negative_copying`` >= 0.5, or a negative eigenvalue copying score for models without a
tokenizer — and ``induction`` is prefix matching by any other head). The lowest tier holding a candidate decides; inside it the
largest score/threshold ratio wins (ties: the type registered first). No candidate: ``other``.

Confidence. Sequences are resampled with replacement (``n_boot`` times, per probe kind, no extra
forwards): ``confidence`` is the share of resamples that give the head the same label;
``<score>_lo``/``<score>_hi`` are 95 % percentile intervals; ``label_counts`` gives counts with intervals.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import partial

import numpy as np
import pandas as pd
import torch
from transformer_lens import HookedTransformer

from headlens.census import scores
from headlens.census.registry import WEIGHTS, HeadType, head_types
from headlens.data.corpus import provenance as corpus_provenance
from headlens.data.probes import Probe, ProbeSet, check_probes, default_probes, probe_kinds
from headlens.engine.capture import stream_patterns
from headlens.engine.executor import resolve
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import Head, check_head_table, format_heads, head_name, kv_heads
from headlens.io import atomic_path, code_version, provenance, weights_sha256

SCORES = ("previous_token", "duplicate_token", "induction", "copying", "first_token", "delimiter", "local", "entropy")
"""The eight built-in score columns (values unchanged since the first version, except ``delimiter``: key 0 no longer
counts and its uniform baseline spreads over keys 1..i)."""
SINK = 0.3
MIN_NONSINK = 0.05
N_BOOT = 200


def score_columns(types: dict[str, HeadType] | None = None) -> list[str]:
    """Score columns of a census over ``types`` (default: the registry), in registration order."""
    types = head_types() if types is None else types
    cols = []
    for t in types.values():
        if t.score is not None:
            cols.append(t.name)
            if t.nosink:
                cols.append(f"{t.name}_nosink")
    return cols


def label_names(types: dict[str, HeadType] | None = None) -> tuple[str, ...]:
    """Labels in tier order (registration order inside a tier), then ``other``."""
    types = head_types() if types is None else types
    named = sorted((t for t in types.values() if t.label), key=lambda t: t.tier)
    return (*(t.name for t in named), "other")


def columns(types: dict[str, HeadType] | None = None) -> tuple[str, ...]:
    """The leading columns of a census table (interval columns ``<score>_lo/_hi`` follow them)."""
    return ("layer", "head", "kv_head", *score_columns(types), "label", "confidence", "label_score")


COLUMNS = columns()
LABELS = label_names()
THRESHOLDS = {t.name: t.threshold for t in head_types().values() if t.label}
"""Built-in label thresholds (docs/head_types.md and analyses/results/census_trust/null.csv say why each sits where
it does)."""
LABEL_SCORE = {t.name: t.column for t in head_types().values() if t.label}
"""The score column each built-in label is decided by (its own, except ``copy_suppression``, which reads ``induction``)."""
TIERS = tuple(
    tuple(t.name for t in head_types().values() if t.label and t.tier == tier)
    for tier in sorted({t.tier for t in head_types().values() if t.label})
)
"""Built-in labels by tier (see :func:`headlens.census.registry.head_types` for what is registered now)."""


@dataclass
class PerSequence:
    """Per-sequence scores ``{column: [seq, layer*head]}`` per probe kind, the weights scores, and each kind's sink mass."""

    by_kind: dict[str, dict[str, np.ndarray]]
    weights: dict[str, np.ndarray]


@dataclass
class CensusResult:
    """What :func:`run_census` returns: the census table and what it was computed from.

    Fields:

    - ``table``: one row per (layer, head): ``layer, head, kv_head``, every registered score (and ``<score>_nosink``),
      ``label``, ``confidence``, ``label_score`` (the score that decided the label: ``<score>_nosink`` where the head
      sinks), each probe's sink mass ``sink_<kind>`` (what decides raw vs ``_nosink``: :func:`table_scores` reads it
      back), then the 95 % intervals ``<score>_lo``/``<score>_hi`` and ``label_score_lo``/``_hi``.
    - ``label_counts``: heads per label with the bootstrap's 95 % interval (``label, n_heads, lo, hi``).
    - ``probes``: the :class:`~headlens.data.probes.ProbeSet` that was scored (None for a census read from disk).
    - ``seed``: the probe seed; ``thresholds``: the label thresholds used.
    - ``provenance``: the model's identity and the settings (:func:`headlens.io.provenance`), what the CLI checks
      before it reuses a census file.
    """

    table: pd.DataFrame
    label_counts: pd.DataFrame
    probes: ProbeSet | None
    seed: int
    thresholds: dict[str, float]
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: pd.DataFrame, *, seed: int = 0, provenance: dict | None = None) -> CensusResult:
        """A result for a census table read back from disk (counts approximated from ``confidence``)."""
        table = check_census_table(table)
        return cls(table, label_counts(table), None, int(seed), dict(THRESHOLDS), dict(provenance or {}))

    def summary(self) -> pd.DataFrame:
        """Per label: how many heads (with the 95 % interval) and the heads themselves, ordered by layer."""
        counts = self.label_counts.set_index("label")
        frame = self.table
        rows = []
        names = label_names()
        for label in [lb for lb in names if lb in counts.index] + sorted(set(counts.index) - set(names)):
            part = frame[frame["label"] == label]
            rows.append(
                {
                    "label": label,
                    "n_heads": len(part),
                    "lo": int(counts.loc[label, "lo"]),
                    "hi": int(counts.loc[label, "hi"]),
                    "heads": format_heads(zip(part["layer"], part["head"])),
                }
            )
        return pd.DataFrame(rows, columns=["label", "n_heads", "lo", "hi", "heads"])


def check_census_table(table: pd.DataFrame, model: HookedTransformer | None = None) -> pd.DataFrame:
    """``table`` when it is a census table: one row per head (:func:`headlens.heads.check_head_table`, heads of
    ``model`` when given) and a text label on every row; one clear error otherwise."""
    check_head_table(table, model, what="the census table")
    if "label" not in table.columns:
        raise HeadlensError("the census table lacks a 'label' column: pass a table from run_census or headlens census")
    bad = table.loc[~table["label"].map(lambda v: isinstance(v, str))]
    if len(bad):
        row = bad.iloc[0]
        raise HeadlensError(
            f"the census table gives {head_name(row['layer'], row['head'])} the label {row['label']!r}: every head needs a "
            "text label (rerun the census)"
        )
    return table


def heads_with_label(census: CensusResult | pd.DataFrame, label: str) -> list[Head]:
    """The heads a census (a :class:`CensusResult` or its table) labels ``label`` (e.g. ``"induction"``), sorted.

    A label no registered head type gives (and the table does not hold) is an error, not an empty list."""
    result = census if isinstance(census, CensusResult) else None
    table = census if result is None else result.table
    if not isinstance(table, pd.DataFrame) or not {"layer", "head", "label"} <= set(table.columns):
        raise HeadlensError(
            "heads_with_label needs a CensusResult or a census table with layer, head and label columns"
        )
    check_census_table(table)
    names = label_names()
    given = set(table["label"]) | set(() if result is None else result.thresholds)  # labels: text (checked above)
    known = [*names, *sorted(given - set(names))]
    if label not in known:
        close = difflib.get_close_matches(str(label), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HeadlensError(f"unknown label {label!r}: {hint}known labels: {', '.join(known)}")
    part = table[table["label"] == label]
    return sorted(Head(int(l), int(h)) for l, h in zip(part["layer"], part["head"]))


def census_settings(
    seed: int = 0, probes: ProbeSet | None = None, thresholds: dict | None = None, n_boot: int = N_BOOT
) -> dict:
    """What a census depends on besides the model and the code (both in its provenance): the seed, whether the probes
    are the defaults, the thresholds in force, the registered head types and the bootstrap resamples behind its
    confidence and intervals, so a census is reused only by a run that would compute the same table."""
    types = head_types()
    return {
        "seed": int(seed),
        "probes": "default" if probes is None else "custom",
        "thresholds": label_thresholds(types, thresholds),
        "types": list(types),
        "n_boot": int(n_boot),
    }


def run_census(
    model: HookedTransformer,
    probes: ProbeSet | None = None,
    *,
    seed: int = 0,
    batch_size: int = 8,
    thresholds: dict[str, float] | None = None,
    progress: bool = True,
    n_boot: int = N_BOOT,
    executor=None,
) -> CensusResult:
    """Score and label every head; see :class:`CensusResult` for what comes back.

    ``probes`` defaults to :func:`headlens.data.probes.default_probes` with ``seed`` (the kinds the registered
    types need); scores of kinds the set lacks are NaN. ``thresholds`` overrides label thresholds.
    ``batch_size`` sequences go through one forward. ``executor`` (:mod:`headlens.engine.executor`, e.g. a
    ``RayExecutor``) runs the probe batches; the table is the same whichever runs them.
    """
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    types = head_types()
    limits = label_thresholds(types, thresholds)
    batch_size = check_count("batch_size", batch_size)
    n_boot = check_count("n_boot", n_boot, minimum=0, why="bootstrap resamples (0: no intervals)")
    settings = census_settings(seed, probes, thresholds, n_boot)
    needed = {t.probe for t in types.values() if t.score is not None and t.probe != WEIGHTS}
    if probes is None:
        probes = default_probes(model, seed=seed, kinds=[k for k in probe_kinds() if k in needed])
    check_probes(model, probes)
    unread = [k for k in probes.keys() if k not in needed]
    if unread:
        raise HeadlensError(
            f"no registered head type reads a {unread[0]!r} probe (kinds read: {', '.join(sorted(needed))}): "
            "drop it or register a HeadType with that probe kind"
        )
    per_seq = collect(model, probes, types, batch_size=batch_size, progress=progress, executor=executor)
    table, counts = build_table(model, per_seq, types, limits, seed=seed, n_boot=n_boot)
    return CensusResult(table, counts, probes, int(seed), limits, provenance(model, **settings))


def collect(
    model: HookedTransformer,
    probes: ProbeSet,
    types: dict[str, HeadType],
    *,
    batch_size: int = 8,
    progress: bool = True,
    executor=None,
) -> PerSequence:
    """Stream every probe once and keep each type's per-sequence scores (plus the weights scores).

    The probes are cut into shards of ``batch_size`` sequences that ``executor`` (:mod:`headlens.engine.executor`;
    default: in this process) scores in any order; shards are joined in order, so the table is the same.
    """
    check_model(model)

    items = list(probes.items())
    shards = [(kind, sub) for kind, p in items for sub in probe_batches(p, int(batch_size))]
    wanted = {k: {n: t for n, t in types.items() if t.probe == k and t.score is not None} for k, _ in items}
    parts = resolve(executor).map(
        partial(_shard_scores, wanted=wanted, progress=progress),
        model,
        [sub for _, sub in shards],
        key="headlens.census.run.batch_scores:" + ",".join(types),
        desc="census",
        progress=progress,
    )
    by_kind = {}
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for kind, _ in items:
        mine = [part for (k, _), part in zip(shards, parts) if k == kind]
        by_kind[kind] = {c: torch.cat([m[c] for m in mine]).reshape(-1, L * H).numpy() for c in mine[0]}
    return PerSequence(by_kind, weights_scores(model, types))


def weights_scores(model: HookedTransformer, types: dict[str, HeadType]) -> dict[str, np.ndarray]:
    """``{name: [layer * head]}`` of the ``types`` scored on the weights alone.

    They depend on nothing but the weights, the tokenizer, the text corpus (the Python standard library the
    positional score reads) and headlens' code, so the built-in ones are kept in the headlens cache
    (``HEADLENS_CACHE/scores/<key>.npz``) under a key of exactly those: the weights digest, the tokenizer's digest, the
    corpus's Python version and place, and headlens' code version (:func:`headlens.io.code_version`). A census of
    the same model computes them once (about 14 s for Qwen); a type of the user's own is computed every time.
    """
    check_model(model)
    wanted = {n: t for n, t in types.items() if t.probe == WEIGHTS and t.score is not None}
    stored = {n for n, t in wanted.items() if getattr(t.score, "__module__", "").startswith("headlens.")}
    path = _scores_path(model, sorted(stored)) if stored else None
    out = _read_scores(path, stored, model.cfg.n_layers * model.cfg.n_heads) if path else {}
    missing = {n: wanted[n].score(model).double().flatten().cpu().numpy() for n in wanted if n not in out}
    if path and set(missing) & stored:
        # a read-only or full cache only costs a recomputation (atomic_path says a failed write as a HeadlensError)
        with contextlib.suppress(OSError, HeadlensError), atomic_path(path) as tmp:
            np.savez(tmp, **{n: v for n, v in {**out, **missing}.items() if n in stored})
    return {n: out[n] if n in out else missing[n] for n in wanted}


def _scores_path(model: HookedTransformer, names: list[str]):
    from headlens.models import cache_dir

    key = hashlib.sha256()
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        vocab = ""
    elif getattr(tokenizer, "backend_tokenizer", None) is not None:  # a fast tokenizer: its whole definition
        vocab = tokenizer.backend_tokenizer.to_str()
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    corpus = json.dumps(corpus_provenance(), sort_keys=True)
    for part in (weights_sha256(model), hashlib.sha256(vocab.encode()).hexdigest(), corpus, code_version(), *names):
        key.update(f"{part}\n".encode())
    try:
        return cache_dir() / "scores" / f"{key.hexdigest()}.npz"
    except HeadlensError:  # an unusable HEADLENS_CACHE: compute, as without a cache
        return None


def _read_scores(path, names: set[str], size: int) -> dict[str, np.ndarray]:
    """The stored scores, or {} when the file is missing, unreadable or not what this key needs (recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {n: z[n] for n in names if n in z.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}
    ok = len(out) == len(names) and all(v.shape == (size,) and v.dtype == np.float64 for v in out.values())
    return out if ok else {}


def probe_batches(probe: Probe, batch_size: int) -> list[Probe]:
    """``probe`` cut into consecutive sub-probes of at most ``batch_size`` sequences (the census's shards).

    Every per-sequence field is cut — tensors and tuples whose first dimension is the batch — so probe kinds
    with their own metadata (``headlens.data.code.CodeProbe``, ...) shard too."""

    def cut(value, rows):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == probe.n_seqs:
            return value[rows]
        if isinstance(value, tuple) and len(value) == probe.n_seqs:
            return value[rows]
        return value

    out = []
    for i in range(0, probe.n_seqs, batch_size):
        rows = slice(i, i + batch_size)
        out.append(replace(probe, **{f.name: cut(getattr(probe, f.name), rows) for f in fields(probe) if f.init}))
    return out


def _shard_scores(
    model: HookedTransformer, probe: Probe, *, wanted: dict, progress: bool = False
) -> dict[str, torch.Tensor]:
    return batch_scores(model, probe, wanted[probe.kind], progress=progress)


def probe_scores(
    model: HookedTransformer,
    probe: Probe,
    types: dict[str, HeadType] | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Per-sequence scores ``{column: [seq, layer*head]}`` of the ``types`` measured on ``probe`` (+ ``_sink``)."""
    check_model(model)
    if types is None:
        types = {n: t for n, t in head_types().items() if t.probe == probe.kind and t.score is not None}
    L, H = model.cfg.n_layers, model.cfg.n_heads
    parts = [batch_scores(model, sub, types, progress=progress) for sub in probe_batches(probe, int(batch_size))]
    return {c: torch.cat([p[c] for p in parts]).reshape(-1, L * H).numpy() for c in parts[0]}


def batch_scores(
    model: HookedTransformer, probe: Probe, types: dict[str, HeadType], *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """One forward over ``probe``: per-sequence scores ``{column: [seq, layer, head]}`` float64 (+ ``_sink``).

    Patterns are scored in float32 whatever the model's dtype.
    """
    check_model(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    cols = ["_sink", *(c for n, t in types.items() for c in ([n, f"{n}_nosink"] if t.nosink else [n]))]
    out = {c: torch.zeros(probe.n_seqs, L, H, dtype=torch.float64) for c in cols}
    any_nosink = any(t.nosink for t in types.values())

    def reducer(layer, pattern, rows):
        pattern = pattern.float()
        out["_sink"][rows, layer] = scores.first_token_seq(pattern).double().cpu()
        clean = scores.without_sink(pattern) if any_nosink else None
        for name, t in types.items():
            out[name][rows, layer] = _checked(t.score(pattern, probe, rows), pattern, name).double().cpu()
            if t.nosink:
                out[f"{name}_nosink"][rows, layer] = t.score(clean, probe, rows).double().cpu()

    stream_patterns(
        model, probe.tokens, reducer, batch_size=probe.n_seqs, progress=progress, desc=f"census {probe.kind}"
    )
    return out


def _checked(value, pattern, name):
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(pattern.shape[:2]):
        raise HeadlensError(
            f"head type {name!r}: score must return a [batch, head] tensor (got "
            f"{getattr(value, 'shape', type(value).__name__)}) — one number per sequence and head"
        )
    return value


def build_table(
    model: HookedTransformer,
    per_seq: PerSequence,
    types: dict[str, HeadType],
    limits: dict[str, float],
    *,
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The census table from per-sequence scores (means, labels, bootstrap confidence and intervals) and its
    label counts with bootstrap intervals."""
    check_model(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    cols = score_columns(types)
    means = _means(per_seq, types, {k: None for k in per_seq.by_kind}, L * H)
    label_idx = _label(means, types, limits)
    names = np.array(label_names(types))
    frame = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), H),
            "head": np.tile(np.arange(H), L),
            "kv_head": np.tile(np.asarray(kv_heads(model)), L),
            **{c: means[c].round(6) for c in cols},
        }
    )
    frame["label"] = names[label_idx]
    eff = _effective(means, types)
    own = np.array([_label_column(types, lb) for lb in frame["label"]], dtype=object)
    frame["label_score"] = np.array([eff[c][i] if c else np.nan for i, c in enumerate(own)]).round(6)
    for kind in per_seq.by_kind:  # each probe's sink mass: what decides raw vs _nosink (table_scores reads it back)
        frame[f"sink_{kind}"] = means[f"_sink:{kind}"].round(6)
    rng = np.random.default_rng(int(seed) + 12345)
    boots_label, boots = [], {c: [] for c in cols}
    boots_eff = []
    for _ in range(int(n_boot)):
        picks = {k: rng.integers(0, v["_sink"].shape[0], v["_sink"].shape[0]) for k, v in per_seq.by_kind.items()}
        m = _means(per_seq, types, picks, L * H)
        boots_label.append(_label(m, types, limits))
        e = _effective(m, types)
        boots_eff.append(np.array([e[c][i] if c else np.nan for i, c in enumerate(own)]))
        for c in cols:
            boots[c].append(m[c])
    if n_boot:
        stack = np.stack(boots_label)
        frame["confidence"] = (stack == label_idx[None]).mean(0).round(4)
        eff_stack = np.stack(boots_eff)
        eff_stack = np.where(np.isfinite(eff_stack).all(0, keepdims=True), eff_stack, np.nan)
        with np.errstate(invalid="ignore"):
            lo_hi = {
                "label_score_lo": np.percentile(eff_stack, 2.5, axis=0),
                "label_score_hi": np.percentile(eff_stack, 97.5, axis=0),
            }
        for c in cols:
            arr = np.stack(boots[c])
            # a resample without a sequence that defines the score (no re-used name drawn) has no estimate to rank
            pct = np.nanpercentile if np.isnan(arr).any() else np.percentile
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: the score is undefined for the head
                frame[f"{c}_lo"] = pct(arr, 2.5, axis=0).round(6)
                frame[f"{c}_hi"] = pct(arr, 97.5, axis=0).round(6)
        for k, v in lo_hi.items():
            frame[k] = np.round(v, 6)
        boot_counts = np.stack([(stack == i).sum(1) for i in range(len(names))], axis=1)  # [boot, label]
        counts = _count_table(names, np.bincount(label_idx, minlength=len(names)), boot_counts)
    else:
        frame["confidence"] = np.nan
    lead = list(columns(types))
    frame = frame[lead + [c for c in frame.columns if c not in lead]]
    return frame, (label_counts(frame) if not n_boot else counts[counts.n_heads > 0].reset_index(drop=True))


def _label_column(types, label: str) -> str | None:
    t = types.get(label)
    return t.column if t is not None else None


def _means(per_seq: PerSequence, types, picks: dict, n: int) -> dict[str, np.ndarray]:
    """Column means over (resampled) sequences; ``_sink:<kind>`` holds each kind's sink mass."""
    out = {c: np.full(n, np.nan) for c in score_columns(types)}
    for kind, cols in per_seq.by_kind.items():
        idx = picks.get(kind)
        for c, v in cols.items():
            out[f"_sink:{kind}" if c == "_sink" else c] = _mean_defined(v if idx is None else v[idx])
    out.update(per_seq.weights)
    return out


def _mean_defined(per_seq: np.ndarray) -> np.ndarray:
    """Mean over the sequences where a score is defined: a sequence with nothing to score (no re-used name, no
    closer) is NaN and left out, as the score's definition says ("mean over uses"), rather than counted as 0.
    NaN only for a head no sequence scores."""
    if not np.isnan(per_seq).any():
        return per_seq.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(per_seq, 0) / (~np.isnan(per_seq)).sum(0)


def _effective(means: dict[str, np.ndarray], types) -> dict[str, np.ndarray]:
    """Each score column as labels read it: the ``_nosink`` score where the head sinks on that probe (module docstring)."""
    eff = dict(means)
    for name, t in types.items():
        if t.nosink and t.score is not None:
            sink = means.get(f"_sink:{t.probe}")
            if sink is None:
                continue
            use = (sink >= SINK) & (1.0 - sink >= MIN_NONSINK) & np.isfinite(means[f"{name}_nosink"])
            eff[name] = np.where(use, means[f"{name}_nosink"], means[name])
    return eff


def label_ratios(
    eff: dict[str, np.ndarray], types, limits: dict[str, float]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per label type: (score / threshold, is a candidate) of every head, from sink-aware scores ``eff``.

    A candidate reaches its threshold and meets its ``requires``; :func:`_label` picks among candidates by tier and
    ratio, and the head cards (``headlens.analysis.cards``) read the same numbers to say why a runner-up lost."""
    out = {}
    for t in (t for t in types.values() if t.label):
        score = eff.get(t.column)
        if score is None:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.asarray(score, dtype=float) / limits[t.name]
            ok = np.isfinite(ratio) & (ratio >= 1.0)
            if t.requires is not None:
                ok &= np.asarray(t.requires(eff), dtype=bool)
        out[t.name] = (ratio, ok)
    return out


def _label(
    means: dict[str, np.ndarray], types, limits: dict[str, float], candidates: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """Index into :func:`label_names` of each head's label (vectorised over heads); ``candidates``: an extra mask per
    type that a candidate must also meet (analyses/census_trust.py compares labelling rules with it)."""
    eff = _effective(means, types)
    names = label_names(types)
    n = len(next(iter(means.values())))
    out = np.full(n, len(names) - 1)
    decided = np.zeros(n, dtype=bool)
    ratios = label_ratios(eff, types, limits)
    labelled = [t for t in types.values() if t.label]
    for tier in sorted({t.tier for t in labelled}):
        best = np.full(n, -np.inf)
        best_idx = np.full(n, -1)
        for t in (t for t in labelled if t.tier == tier and t.name in ratios):
            ratio, ok = ratios[t.name]
            if candidates is not None and t.name in candidates:
                ok = ok & candidates[t.name]
            better = ok & (ratio > best)
            best = np.where(better, ratio, best)
            best_idx = np.where(better, names.index(t.name), best_idx)
        take = ~decided & (best_idx >= 0)
        out[take] = best_idx[take]
        decided |= take
    return out


def _count_table(names, counts: np.ndarray, boot: np.ndarray) -> pd.DataFrame:
    lo, hi = np.percentile(boot, 2.5, axis=0).round(), np.percentile(boot, 97.5, axis=0).round()
    rows = [
        {"label": str(n), "n_heads": int(c), "lo": int(a), "hi": int(b)} for n, c, a, b in zip(names, counts, lo, hi)
    ]
    return pd.DataFrame(rows, columns=["label", "n_heads", "lo", "hi"])


def label_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Heads per label of a census table with an approximate 95 % interval: ``label, n_heads, lo, hi``.

    For a table read back from disk (a fresh :class:`CensusResult` carries the bootstrap's ``label_counts``): each
    head keeps its label with probability ``confidence`` (losses only, normal approximation), so ``hi`` is the
    count itself.
    """
    if "label" not in table.columns:
        raise HeadlensError("label_counts needs a census table with a 'label' column")
    rows = []
    order = [lb for lb in LABELS if lb in set(table.label)] + sorted(set(table.label) - set(LABELS))
    for lb in order:
        part = table[table.label == lb]
        conf = part["confidence"].to_numpy(dtype=float) if "confidence" in part else np.ones(len(part))
        conf = np.nan_to_num(conf, nan=1.0)
        mean, sd = conf.sum(), np.sqrt((conf * (1 - conf)).sum())
        rows.append({"label": lb, "n_heads": len(part), "lo": int(max(0, np.floor(mean - 1.96 * sd))), "hi": len(part)})
    return pd.DataFrame(rows, columns=["label", "n_heads", "lo", "hi"])


def table_scores(frame: pd.DataFrame, types: dict[str, HeadType] | None = None) -> dict[str, np.ndarray]:
    """The score columns of a census table as the labels read them (``label_score`` is one of these).

    Each probe's sink mass comes from the ``sink_<kind>`` columns; a table without them (written before they
    existed) lets ``first_token`` stand in for every probe's sink mass, an approximation."""
    types = head_types() if types is None else types
    n = len(frame)
    means = {c: frame[c].to_numpy(dtype=float) for c in frame.columns if c in set(score_columns(types))}
    for kind in {t.probe for t in types.values()}:
        if f"sink_{kind}" in frame:
            means[f"_sink:{kind}"] = frame[f"sink_{kind}"].to_numpy(dtype=float)
        elif "first_token" in frame:
            means[f"_sink:{kind}"] = frame["first_token"].to_numpy(dtype=float)
    for c in score_columns(types):
        means.setdefault(c, np.full(n, np.nan))
    return _effective(means, types)


def label_heads(frame: pd.DataFrame, thresholds: dict[str, float] | None = None) -> list[str]:
    """The label of each row of a census table (sink-aware scores, requirements, tiers; see the module docstring),
    through :func:`table_scores`."""
    types = head_types()
    limits = label_thresholds(types, thresholds)
    if len(frame) == 0:
        return []
    eff = table_scores(frame, types)
    return np.array(label_names(types))[_label(eff, types, limits)].tolist()


def label_thresholds(types, overrides: dict[str, float] | None) -> dict[str, float]:
    """The label thresholds of ``types`` with ``overrides`` (a dict of label -> positive number) in force."""
    limits = {n: t.threshold for n, t in types.items() if t.label}
    if overrides is not None and not isinstance(overrides, Mapping):
        raise HeadlensError(
            f"thresholds must be a dict of label -> threshold, e.g. {{'induction': 0.4}} (got {type(overrides).__name__})"
        )
    for name, value in (overrides or {}).items():
        if name not in limits:
            raise HeadlensError(f"unknown threshold {name!r}; known: {', '.join(limits)}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise HeadlensError(f"threshold {name!r} must be a number, got {type(value).__name__} {value!r}")
        if not np.isfinite(value) or value <= 0:
            raise HeadlensError(f"threshold {name!r} must be a positive number (got {value})")
        limits[name] = float(value)
    return limits

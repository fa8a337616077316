"""Atlas: the head census of several models side by side, by relative depth.

``atlas(["qwen", "smollm2", "toy"])`` runs the census of every model at several probe seeds (one
shard per (model, seed), so a :class:`~headlens.engine.executor.RayExecutor` runs them in parallel, each
worker loading the models itself) and compares:

- ``depth_shares``: the share of each label among the heads of each relative-depth bin
  (relative depth of layer l = (l + 0.5) / n_layers, so models of any depth line up);
- ``positions``: where induction, previous-token and first-token (sink) heads sit: how many, their
  mean / min / max relative depth, and the heads themselves;
- ``counts``: heads per label at seed 0, with the min-max over the probe seeds (each seed draws
  new probe tokens: the interval says how much a count depends on the probe sample).

Sources: any :func:`headlens.load_model` source (``qwen``, ``smollm2``, ``tiny-qwen2``, a local HF
directory, a ``.gguf`` file), ``SOURCE+ADAPTER_DIR`` for a PEFT LoRA adapter merged into SOURCE,
and ``toy`` for the trained toy induction model (census on :func:`headlens.analysis.toy.toy_probes`).
:func:`headlens.render.atlas.write_atlas` writes the tables and one offline HTML page (figures inlined, no CDN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from headlens.analysis.toy import load_induction_model, toy_probes
from headlens.census.run import LABELS, run_census
from headlens.engine.executor import resolve
from headlens.errors import HeadlensError, check_count
from headlens.io import path_sha256
from headlens.models import _placed, load_model, resolve_device, resolve_dtype

WHERE = ("induction", "previous_token", "first_token")
"""Labels whose positions the atlas reports."""
N_BINS = 5


@dataclass(frozen=True)
class AtlasShard:
    """One census of an atlas: a model source at one probe seed."""

    source: str
    seed: int
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    files: str | None = None
    """Digest of the source's local files (model directory or file, adapter): a checkpointed shard of a file replaced
    at the same path is not reused."""


def source_files_digest(source: str) -> str | None:
    """sha256 of the local files a source names (a model directory or file, an adapter directory), None for named
    sources (their weights are checked by the cache)."""
    paths = [Path(part).expanduser() for part in source.split("+")]
    local = [p for p in paths if p.exists()]
    return "+".join(path_sha256(p) for p in local) if local else None


@dataclass
class Atlas:
    """Census tables per model (seed 0, with a ``relative_depth`` column) and the comparison tables."""

    census: dict[str, pd.DataFrame]
    counts: pd.DataFrame
    depth_shares: pd.DataFrame
    positions: pd.DataFrame
    settings: dict = field(default_factory=dict)


def parse_sources(text: str | list[str]) -> list[str]:
    """``"qwen,smollm2,toy"`` -> a checked list of sources (adapters and local paths must exist)."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s and s.strip()]
    if not items:
        raise HeadlensError("no models given: pass --models A,B,... (e.g. qwen,smollm2,toy)")
    if len(set(items)) != len(items):
        raise HeadlensError(f"a model is listed twice in {', '.join(items)}")
    for item in items:
        base, _, adapter = item.partition("+")
        if adapter and not Path(adapter).expanduser().is_dir():
            raise HeadlensError(f"{item!r}: adapter directory {adapter} does not exist (write SOURCE+ADAPTER_DIR)")
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().exists():
            raise HeadlensError(f"{item!r}: no such model file or directory {base}")
    return items


@lru_cache(maxsize=1)
def _model(source: str, device: str, dtype: str):
    """Load one atlas source (kept while its seeds run; one model per process at a time)."""

    if source == "toy":
        model = load_induction_model()
        if (device, dtype) != ("cpu", "float32"):
            model = _placed(model, resolve_device(device), resolve_dtype(dtype))
        return model
    base, _, adapter = source.partition("+")
    return load_model(base, adapter=adapter or None, device=device, dtype=dtype)


def census_shard(_model_unused, shard: AtlasShard) -> pd.DataFrame:
    """The census of ``shard.source`` at ``shard.seed`` (loads the model in this process; an executor shard function)."""

    model = _model(shard.source, shard.device, shard.dtype)
    probes = None
    if shard.source == "toy":
        probes = toy_probes(model, seed=shard.seed)
    table = run_census(model, probes, seed=shard.seed, batch_size=shard.batch_size, progress=False).table
    table.insert(0, "model", shard.source)
    table.insert(1, "seed", shard.seed)
    table.insert(4, "n_layers", model.cfg.n_layers)
    return table


def atlas(
    sources: str | list[str],
    *,
    seeds: int = 3,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    bins: int = N_BINS,
    executor=None,
    progress: bool = True,
) -> Atlas:
    """Census of every source at probe seeds 0..seeds-1 (on ``executor``) and the comparison tables (module docstring)."""

    sources = parse_sources(sources)
    seeds, bins = check_count("seeds", seeds), check_count("bins", bins)
    resolve_device(device)
    dtype = str(resolve_dtype(dtype)).removeprefix("torch.")
    files = {s: source_files_digest(s) for s in sources}
    # each source's largest seed first: a seed its probes' data cannot serve fails before the other censuses run
    shards = [
        AtlasShard(s, seed, int(batch_size), device, dtype, files[s])
        for s in sources
        for seed in reversed(range(int(seeds)))
    ]
    try:
        tables = resolve(executor).map(
            census_shard, None, shards, key="headlens.analysis.atlas.census_shard", desc="atlas", progress=progress
        )
    finally:
        _model.cache_clear()
    order = sorted(range(len(shards)), key=lambda i: (sources.index(shards[i].source), shards[i].seed))
    every = pd.concat([tables[i] for i in order], ignore_index=True)
    every["relative_depth"] = (every["layer"] + 0.5) / every["n_layers"]
    first = every[every.seed == 0]
    census = {s: first[first.model == s].reset_index(drop=True) for s in sources}
    settings = dict(
        models=sources, seeds=int(seeds), batch_size=int(batch_size), device=device, dtype=dtype, bins=int(bins)
    )
    return Atlas(census, label_counts(every), depth_shares(first, bins), positions(first), settings)


def label_counts(every: pd.DataFrame) -> pd.DataFrame:
    """Heads per (model, label) at seed 0 with min / max over seeds and the share of the model's heads."""

    per_seed = every.groupby(["model", "seed", "label"]).size().unstack("label", fill_value=0)
    per_seed = per_seed.reindex(columns=list(LABELS), fill_value=0)
    rows = []
    for model in dict.fromkeys(every.model):
        counts = per_seed.loc[model]
        n_heads = int((every.model == model).sum() / every[every.model == model].seed.nunique())
        for label in LABELS:
            col = counts[label]
            rows.append(
                {
                    "model": model,
                    "label": label,
                    "n_heads": int(col.loc[0]),
                    "min": int(col.min()),
                    "max": int(col.max()),
                    "share": float(col.loc[0]) / n_heads,
                    "of": n_heads,
                    "n_seeds": len(col),
                }
            )
    return pd.DataFrame(rows)


def depth_shares(first: pd.DataFrame, bins: int = N_BINS) -> pd.DataFrame:
    """Share of each label among the heads of each relative-depth bin, per model (seed 0)."""

    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for model, part in first.groupby("model", sort=False):
        which = np.minimum(np.digitize(part.relative_depth, edges) - 1, bins - 1)
        for b in range(bins):
            heads = part[which == b]
            for label in LABELS:
                n = int((heads.label == label).sum())
                rows.append(
                    {
                        "model": model,
                        "depth_bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}",
                        "bin": b,
                        "label": label,
                        "n": n,
                        "of": len(heads),
                        "share": n / len(heads) if len(heads) else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def positions(first: pd.DataFrame) -> pd.DataFrame:
    """Per model and label in :data:`WHERE`: count and relative depth (mean, min, max) of its heads, and the heads."""
    rows = []
    for model, part in first.groupby("model", sort=False):
        for label in WHERE:
            heads = part[part.label == label]
            depth = heads.relative_depth
            rows.append(
                {
                    "model": model,
                    "label": label,
                    "n_heads": len(heads),
                    "mean_depth": float(depth.mean()) if len(heads) else float("nan"),
                    "min_depth": float(depth.min()) if len(heads) else float("nan"),
                    "max_depth": float(depth.max()) if len(heads) else float("nan"),
                    "heads": " ".join(f"L{l}H{h}" for l, h in zip(heads["layer"], heads["head"])),
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- output

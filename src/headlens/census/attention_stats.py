"""Attention statistics beyond one score per head: entropy under other scalings, masks, head similarity.

Pure functions over shaped tensors (queries/keys after RoPE, patterns, similarity matrices) plus two
streaming drivers that run them on a model one layer at a time. They answer the questions of the
user's seed 003: why scale by sqrt(d_k), what masks look like as patterns, how alike heads are, and
whether q heads that share a GQA kv head attend alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Literal

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, utils

from headlens.census.scores import entropy
from headlens.data.probes import check_token_ids
from headlens.engine.capture import stream_patterns
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import check_layers, kv_heads
from headlens.progress import tqdm

MaskKind = Literal["full", "causal", "local", "local_causal"]
Metric = Literal["cosine", "pearson", "centered"]


# ---------------------------------------------------------------- masks and patterns


def attention_mask(n: int, kind: MaskKind = "causal", *, window: int = 3) -> Bool[Tensor, "q k"]:
    """Which keys each query may see: ``full`` (all), ``causal`` (k <= q), ``local`` (|q - k| <= window),
    ``local_causal`` (q - window <= k <= q, a sliding window)."""
    if n < 1:
        raise HeadlensError(f"mask size must be at least 1, got {n}")
    if window < 0:
        raise HeadlensError(f"window must be >= 0, got {window}")
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    masks = {
        "full": torch.ones(n, n, dtype=torch.bool),
        "causal": k <= q,
        "local": (q - k).abs() <= window,
        "local_causal": (k <= q) & (q - k <= window),
    }
    if kind not in masks:
        raise HeadlensError(f"unknown mask kind {kind!r}: choose one of {', '.join(masks)}")
    return masks[kind]


def mask_pattern(n: int, kind: MaskKind = "causal", *, window: int = 3) -> Float[Tensor, "q k"]:
    """The attention pattern a mask allows when all scores are equal: uniform over each query's visible keys."""
    mask = attention_mask(n, kind, window=window).float()
    return mask / mask.sum(-1, keepdim=True)


def attention_scores(
    q: Float[Tensor, "batch q_pos head d_head"],
    k: Float[Tensor, "batch k_pos kv_head d_head"],
    *,
    scale: float,
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """``scale * q . k`` for every q head, expanding GQA kv heads as TransformerLens does (kv head = h // group)."""
    n_heads, n_kv = q.shape[2], k.shape[2]
    if q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise HeadlensError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and d_head")
    if n_heads % n_kv:
        raise HeadlensError(f"{n_heads} q heads cannot be grouped over {n_kv} kv heads")
    k = torch.repeat_interleave(k, n_heads // n_kv, dim=2)
    return einops.einsum(q, k, "batch q head d, batch k head d -> batch head q k") * scale


def softmax_pattern(
    scores: Float[Tensor, "... q k"], *, mask: Bool[Tensor, "q k"] | None = None
) -> Float[Tensor, "... q k"]:
    """Softmax over keys after masking; ``mask=None`` means causal (the last ``q`` queries of the keys)."""
    if mask is None:
        n_q, n_k = scores.shape[-2:]
        mask = attention_mask(n_k, "causal")[n_k - n_q :]
    return scores.float().masked_fill(~mask.to(scores.device), float("-inf")).softmax(-1)


def query_entropy(pattern: Float[Tensor, "... q k"]) -> Float[Tensor, "... q"]:
    """Entropy in nats of each query's attention distribution (0 log 0 = 0)."""
    p = pattern.float()
    return -torch.special.xlogy(p, p).sum(-1)


def mean_entropy(
    pattern: Float[Tensor, "batch head q k"],
    *,
    mask: Bool[Tensor, "q k"] | None = None,
    normalize: bool = False,
) -> Float[Tensor, " head"]:
    """Per-head entropy averaged over batch and over queries that see at least two keys.

    ``normalize`` divides each query's entropy by log(#visible keys) first (1 = uniform attention), so
    early and late positions compare (with the causal mask this is ``headlens.census.scores.entropy``).
    ``mask=None`` means causal.
    """
    if pattern.ndim != 4:
        raise HeadlensError(f"pattern must be [batch, head, q, k], got shape {tuple(pattern.shape)}")
    n_q, n_k = pattern.shape[-2:]
    if mask is None and normalize and n_q == n_k:
        return entropy(pattern)
    if mask is None:
        mask = attention_mask(n_k, "causal")[n_k - n_q :]
    visible = mask.sum(-1).to(pattern.device)
    keep = visible >= 2
    if not keep.any():
        raise HeadlensError("entropy needs at least one query that sees two or more keys")
    h = query_entropy(pattern)[..., keep]
    if normalize:
        h = h / visible[keep].float().log()
    return einops.reduce(h, "batch head q -> head", "mean")


def entropy_by_scale(
    q: Float[Tensor, "batch q_pos head d_head"],
    k: Float[Tensor, "batch k_pos kv_head d_head"],
    scales: Mapping[str, float],
    *,
    mask: Bool[Tensor, "q k"] | None = None,
    normalize: bool = False,
) -> dict[str, Float[Tensor, " head"]]:
    """Mean entropy of ``softmax(scale * q k^T)`` per head for each named scale (one score matrix, reused)."""
    raw = attention_scores(q.float(), k.float(), scale=1.0)
    return {
        name: mean_entropy(softmax_pattern(raw * s, mask=mask), mask=mask, normalize=normalize)
        for name, s in scales.items()
    }


TEMPERATURE_RANGE = (1e-3, 1e3)
"""Softmax temperatures :func:`scale_settings` takes: scores times 1 / (T * sqrt(d_head)) stay finite in float32."""


def scale_settings(
    attn_scale: float, *, temperatures: Sequence[float] = (0.5, 1.0, 2.0), unscaled: bool = True
) -> dict[str, float]:
    """Named softmax scales: ``unscaled`` (1) and ``T=t`` (1 / (t * attn_scale)).

    ``attn_scale`` is the model's divisor (``model.cfg.attn_scale``, sqrt(d_head) for Qwen), so ``T=1``
    is the model's own scaling, ``T=0.5`` sharper, ``T=2`` flatter.
    """
    low, high = TEMPERATURE_RANGE
    if not all(low <= t <= high for t in temperatures):  # NaN fails too
        raise HeadlensError(
            f"temperatures must lie in {low:g}..{high:g} (got {list(temperatures)}): outside, float32 attention scores "
            "overflow or every pattern is uniform"
        )
    settings = {"unscaled": 1.0} if unscaled else {}
    settings.update({f"T={t:g}": 1.0 / (t * attn_scale) for t in temperatures})
    if len(settings) != len(temperatures) + bool(unscaled):
        raise HeadlensError(f"temperatures repeat a value (to 6 significant digits): {list(temperatures)}")
    return settings


def scale_entropy_table(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    *,
    temperatures: Sequence[float] = (0.5, 1.0, 2.0),
    unscaled: bool = True,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Entropy of every head's attention recomputed from its real queries and keys under other softmax scales.

    Hooks ``hook_rot_q``/``hook_rot_k`` (after RoPE), reduces each layer to per-head entropies inside the
    hook and drops the tensors. Setting ``T=1`` reproduces the model's own pattern (its ``attn_scale``).
    Returns one row per (layer, head, setting): ``layer, head, kv_head, setting, scale, entropy`` (nats,
    mean over queries that see >= 2 keys) and ``norm_entropy`` (each query's entropy / log(#keys), then
    averaged: 1 = uniform over the visible prefix).
    """
    check_model(model)
    batch_size = check_count("batch_size", batch_size)
    if model.cfg.positional_embedding_type != "rotary":
        raise HeadlensError("scale_entropy_table reads hook_rot_q/hook_rot_k: it needs a rotary (RoPE) model")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise HeadlensError(f"tokens must be [batch, pos] with pos >= 2, got shape {tuple(tokens.shape)}")
    check_token_ids(model, tokens)
    layers = check_layers(model, layers)
    settings = scale_settings(model.cfg.attn_scale, temperatures=temperatures, unscaled=unscaled)
    sums = {
        (layer, name, norm): torch.zeros(model.cfg.n_heads, dtype=torch.float64)
        for layer in layers
        for name in settings
        for norm in (False, True)
    }
    counts = {"n": 0}
    queries: dict[int, Tensor] = {}

    def keep_q(q, hook):
        queries[hook.layer()] = q

    def reduce_k(k, hook):
        layer = hook.layer()
        q = queries.pop(layer)
        raw = attention_scores(q.float(), k.float(), scale=1.0)
        for name, scale in settings.items():
            pattern = softmax_pattern(raw * scale)
            for norm in (False, True):
                sums[(layer, name, norm)] += mean_entropy(pattern, normalize=norm).cpu().double() * q.shape[0]

    tokens = tokens.to(model.cfg.device)
    hooks = []
    for layer in layers:
        hooks += [(utils.get_act_name("rot_q", layer), keep_q), (utils.get_act_name("rot_k", layer), reduce_k)]
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="entropy", disable=not progress, leave=False):
        n_seqs = tokens[start : start + batch_size]
        with torch.inference_mode():
            model.run_with_hooks(n_seqs, fwd_hooks=hooks, stop_at_layer=layers[-1] + 1)
        counts["n"] += n_seqs.shape[0]
    groups = _kv_groups(model)
    rows = [
        {
            "layer": layer,
            "head": h,
            "kv_head": groups[h],
            "setting": name,
            "scale": settings[name],
            "entropy": float(sums[(layer, name, False)][h] / counts["n"]),
            "norm_entropy": float(sums[(layer, name, True)][h] / counts["n"]),
        }
        for layer in layers
        for name in settings
        for h in range(model.cfg.n_heads)
    ]
    return pd.DataFrame(rows)


def token_match(pattern: Float[Tensor, "batch head q k"], tokens: Int[Tensor, "batch k"]) -> Float[Tensor, " head"]:
    """Identical-word attention on natural text: excess mass on earlier copies of the query's own token.

    For each query i with at least one earlier j < i holding the same token: mass on those j minus
    their share of keys 0..i (what uniform causal attention would give), averaged over such queries.
    The duplicate-token score measured where repeats occur naturally instead of on [A A] probes.
    """
    if (
        pattern.ndim != 4
        or tuple(tokens.shape) != (pattern.shape[0], pattern.shape[-1])
        or pattern.shape[-1] != pattern.shape[-2]
    ):
        raise HeadlensError(
            f"token_match needs pattern [batch, head, pos, pos] and tokens [batch, pos]; got {tuple(pattern.shape)} and {tuple(tokens.shape)}"
        )
    n = tokens.shape[-1]
    tokens = tokens.to(pattern.device)
    earlier = torch.ones(n, n, dtype=torch.bool, device=pattern.device).tril(-1)
    same = (tokens[:, :, None] == tokens[:, None, :]) & earlier
    has = same.any(-1)
    if not has.any():
        raise HeadlensError("token_match: no token repeats in these sequences; use longer natural text")
    mass = einops.einsum(pattern.float(), same.float(), "batch head q k, batch q k -> batch head q")
    share = same.sum(-1) / torch.arange(1, n + 1, device=pattern.device)
    excess = (mass - share[:, None, :]) * has[:, None, :]
    return einops.reduce(excess, "batch head q -> head", "sum") / has.sum()


# ---------------------------------------------------------------- head similarity


def pattern_similarity(
    patterns: Float[Tensor, "batch head q k"],
    *,
    metric: Metric = "cosine",
    mask: Bool[Tensor, "q k"] | None = None,
    drop_keys: int = 0,
) -> Float[Tensor, "head head"]:
    """Similarity between heads' patterns, each flattened over (batch, visible query-key pairs).

    ``cosine``: cosine of the flattened patterns (>= 0 since patterns are non-negative; two heads that
    both sink on token 0 score high). ``pearson``: cosine after subtracting each head's mean weight.
    ``centered``: cosine of the deviations from uniform attention (weight minus 1/#visible keys of its
    query), so two unrelated heads score about 0 even under a causal mask, whose uniform rows all heads
    share. ``drop_keys=k`` leaves out the first k key columns (e.g. 1 to ignore the sink).
    ``mask=None`` means causal.
    """
    flat = _flat_patterns(patterns, metric=metric, mask=mask, drop_keys=drop_keys)
    if metric == "pearson":
        flat = flat - flat.mean(-1, keepdim=True)
    flat = torch.nn.functional.normalize(flat, dim=-1)
    return flat @ flat.T


def _flat_patterns(patterns: Tensor, *, metric: str, mask: Tensor | None, drop_keys: int) -> Tensor:
    """Visible weights of each head as one row (uniform subtracted for ``centered``): [head, batch * pairs]."""
    if patterns.ndim != 4:
        raise HeadlensError(f"patterns must be [batch, head, q, k], got shape {tuple(patterns.shape)}")
    if metric not in ("cosine", "pearson", "centered"):
        raise HeadlensError(f"unknown similarity metric {metric!r}: choose 'cosine', 'pearson' or 'centered'")
    if drop_keys < 0:
        raise HeadlensError(f"drop_keys must be >= 0, got {drop_keys}")
    n_q, n_k = patterns.shape[-2:]
    if mask is None:
        mask = attention_mask(n_k, "causal")[n_k - n_q :]
    mask = mask.to(patterns.device)
    values = patterns.float()
    if metric == "centered":
        values = values - mask / mask.sum(-1, keepdim=True).clamp_min(1)
    keep = mask.clone()
    keep[:, :drop_keys] = False
    if not keep.any():
        raise HeadlensError("no query-key pair left to compare after masking")
    return einops.rearrange(values[..., keep], "batch head pairs -> head (batch pairs)")


def mean_offdiagonal(sim: Float[Tensor, "head head"]) -> float:
    """Mean similarity over distinct head pairs; 1.0 for a single head (it is trivially like itself)."""
    n = sim.shape[0]
    if n == 1:
        return float(sim[0, 0])
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return float(sim[off].mean())


def group_contrast(
    sim: Float[Tensor, "head head"],
    groups: Sequence[int],
    *,
    n_permutations: int | None = None,
    seed: int = 0,
) -> dict:
    """Are heads in the same group (e.g. GQA kv head) more alike than heads in different groups?

    Statistic: mean within-group pair similarity minus mean across-group pair similarity. The p-value
    (one-sided, within > across) comes from relabelling heads with group sizes kept: exactly, over
    all distinct labellings, when ``n_permutations`` is None and there are at most 20,000 of them;
    otherwise from ``n_permutations`` (default 10,000) random relabellings (seeded), counting the observed one.
    Returns ``within, across, difference, p_value, n_permutations, exact`` and ``null`` (the statistic
    under every relabelling, to combine layers).
    """
    groups = np.asarray(groups)
    n = sim.shape[0]
    if len(groups) != n:
        raise HeadlensError(f"{len(groups)} group labels for {n} heads")
    if len(set(groups.tolist())) < 2 or all((groups == g).sum() < 2 for g in set(groups.tolist())):
        raise HeadlensError("group_contrast needs at least two groups and one group with two heads")
    s = sim.detach().cpu().double().numpy()
    iu = np.triu_indices(n, 1)
    pair_sim = s[iu]

    def stat(labels):
        same = labels[iu[0]] == labels[iu[1]]
        return pair_sim[same].mean() - pair_sim[~same].mean(), pair_sim[same].mean(), pair_sim[~same].mean()

    observed, within, across = stat(groups)
    labellings = _labellings(groups, limit=20_000) if n_permutations is None else None
    if labellings is not None:
        null = np.array([stat(lab)[0] for lab in labellings])
        exact = True
    else:
        rng = np.random.default_rng(seed)
        null = np.array([stat(rng.permutation(groups))[0] for _ in range(n_permutations or 10_000)] + [observed])
        exact = False
    p = float((null >= observed - 1e-12).mean())
    return {
        "within": float(within),
        "across": float(across),
        "difference": float(observed),
        "p_value": p,
        "n_permutations": len(null),
        "exact": exact,
        "null": null,
    }


def group_contrast_table(
    sims: dict[str, Float[Tensor, "layer head head"]], groups: Sequence[int], *, keep_null: bool = False
) -> pd.DataFrame:
    """Per similarity metric and layer: mean off-diagonal similarity and :func:`group_contrast` (within vs across
    GQA groups; no contrast columns with a single group). ``keep_null`` adds each row's permutation null."""
    import pandas as pd

    rows = []
    for metric, mats in sims.items():
        for layer, sim in enumerate(mats):
            test = group_contrast(sim, groups) if len(set(groups)) > 1 else {}
            if not keep_null:
                test.pop("null", None)
            rows.append({"layer": layer, "metric": metric, "mean_similarity": mean_offdiagonal(sim), **test})
    return pd.DataFrame(rows)


def head_similarity(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    *,
    metrics: Sequence[Metric] = ("cosine", "pearson", "centered"),
    drop_keys: int = 0,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Float[Tensor, "layer head head"]]:
    """Head-by-head pattern similarity of each layer for each metric, from one streamed pass.

    Each hook adds the layer's Gram matrices (and sums) to running totals and drops the pattern, so
    memory is one layer's pattern, never a cache. Equals :func:`pattern_similarity` on the
    concatenated patterns of all batches.
    """
    check_model(model)
    drop_keys = check_count("drop_keys", drop_keys, minimum=0)
    batch_size = check_count("batch_size", batch_size)

    for metric in metrics:
        _flat_patterns(torch.zeros(1, 1, 2, 2), metric=metric, mask=None, drop_keys=0)
    layers = check_layers(model, layers)
    H = model.cfg.n_heads
    raw_gram = {layer: torch.zeros(H, H, dtype=torch.float64) for layer in layers}
    centered_gram = {layer: torch.zeros(H, H, dtype=torch.float64) for layer in layers}
    total = {layer: torch.zeros(H, dtype=torch.float64) for layer in layers}
    count = {layer: 0 for layer in layers}

    def reducer(layer, pattern, rows):
        flat = _flat_patterns(pattern.double(), metric="cosine", mask=None, drop_keys=drop_keys).cpu().double()
        raw_gram[layer] += flat @ flat.T
        total[layer] += flat.sum(-1)
        count[layer] += flat.shape[1]
        if "centered" in metrics:
            dev = _flat_patterns(pattern.double(), metric="centered", mask=None, drop_keys=drop_keys).cpu().double()
            centered_gram[layer] += dev @ dev.T

    stream_patterns(model, tokens, reducer, layers=layers, batch_size=batch_size, progress=progress, desc="similarity")
    out = {}
    for metric in metrics:
        mats = []
        for layer in layers:
            g = centered_gram[layer] if metric == "centered" else raw_gram[layer]
            if metric == "pearson":
                m = total[layer] / count[layer]
                g = g - count[layer] * torch.outer(m, m)
            d = g.diagonal().clamp_min(1e-30).sqrt()
            mats.append((g / torch.outer(d, d)).float())
        out[metric] = torch.stack(mats)
    return out


def _kv_groups(model: HookedTransformer) -> list[int]:

    return kv_heads(model)


def _labellings(groups: np.ndarray, *, limit: int) -> list[np.ndarray] | None:
    """Every distinct assignment of the same group sizes to heads, or None when there are more than ``limit``."""
    labels, sizes = np.unique(groups, return_counts=True)
    total = math.factorial(len(groups))
    for size in sizes:
        total //= math.factorial(int(size))
    if total > limit:
        return None

    def assign(remaining: tuple[int, ...], idx: int):
        if idx == len(labels):
            yield []
            return
        for chosen in combinations(remaining, int(sizes[idx])):
            rest = tuple(i for i in remaining if i not in chosen)
            for tail in assign(rest, idx + 1):
                yield [(labels[idx], chosen), *tail]

    out = []
    for assignment in assign(tuple(range(len(groups))), 0):
        lab = np.empty(len(groups), dtype=groups.dtype)
        for label, members in assignment:
            lab[list(members)] = label
        out.append(lab)
    return out

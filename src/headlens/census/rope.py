"""Attention as a function of relative distance (RoPE), per head, with and without content.

Three probes:

- ``natural``: windows of the packaged natural-text corpus;
- ``random``: uniform random tokens (content present but meaningless);
- ``constant``: every sequence is one token repeated. Content is then removed *exactly*: all
  positions share the embedding, so at layer 0 every position has the same pre-rotation query, key
  and value; the attention output is that value whatever the pattern, so the residual stream stays
  identical at every position through every layer. The only thing that varies is the RoPE rotation:
  the pattern is the RoPE-only term ``softmax_k(q · R(q-k) k / sqrt(d_head))`` of each head, for the
  repeated token's content vector (averaged over several tokens).

The profile is reduced inside the attention hook (``headlens.engine.capture.stream_patterns``): per head and
distance d = q - k we keep the count, the sum and the sum of squares of the attention weights, and the
*excess* over a uniform causal head (below), so the table carries everything the summary needs and no
pattern is kept.

Baseline. A head that attends uniformly puts 1/(q+1) on each key, and most Qwen heads park a large,
query-dependent share on position 0 (the sink). Both would look "positional" against a flat baseline.
So the summary is measured on the non-sink part against the uniform causal baseline: for query q >= 1
with non-sink mass m_q = 1 - a[q, 0], a uniform head puts m_q / q on each key 1..q. The excess at
distance d is E(d) = sum over queries q > d of (a[q, q - d] - m_q / q): exactly 0 for a uniform head and
for a pure sink, and the whole non-sink mass for a head that always reads the key d back.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.data.probes import check_token_ids, natural_text
from headlens.engine.capture import stream_patterns
from headlens.errors import HeadlensError, check_count, check_model, non_defaults
from headlens.heads import check_layers, kv_heads

PROBES = ("natural", "random", "constant")


# ---------------------------------------------------------------- probe tokens


_PLACEHOLDER = re.compile(r"\[PAD\d+\]|<\|.*\|>|<.*>")


def _usable_ids(model: HookedTransformer) -> Tensor:
    """Token ids a random probe may use: inside the embedding and the tokenizer; no special, added (control) or
    placeholder tokens. Qwen's tokenizer lists 151,936 ids, but 151,643-151,664 are control tokens and
    151,665 onward are ``[PAD…]`` placeholders that were never trained."""
    n = model.cfg.d_vocab
    tok = model.tokenizer
    if tok is None:
        return torch.arange(n)
    n = min(n, len(tok))
    banned = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    ids = torch.tensor(
        [i for i, p in enumerate(pieces) if i not in banned and p is not None and not _PLACEHOLDER.fullmatch(p)]
    )
    if len(ids) < 2:
        raise HeadlensError("the model's vocabulary has too few ordinary tokens for random probes")
    return ids


def natural_tokens(
    model: HookedTransformer, *, n_seqs: int = 8, seq_len: int = 128, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """``n_seqs`` windows of prose from the ``score`` split (:func:`headlens.data.probes.natural_text`, seeded): the
    positional census column is measured where every census score is, never on causal checks' files."""
    return natural_text(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed, split="score").tokens


def _sized(n_seqs, seq_len, seed) -> tuple[int, int, torch.Generator]:
    """A random probe's sizes, checked, and its seeded generator."""
    n_seqs, seq_len = check_count("n_seqs", n_seqs), check_count("seq_len", seq_len, minimum=2)
    return n_seqs, seq_len, torch.Generator().manual_seed(check_count("seed", seed, minimum=0))


def random_tokens(
    model: HookedTransformer, *, n_seqs: int = 8, seq_len: int = 128, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """Uniform random ordinary tokens (seeded)."""
    check_model(model)
    n_seqs, seq_len, gen = _sized(n_seqs, seq_len, seed)
    ids = _usable_ids(model)
    return ids[torch.randint(0, len(ids), (n_seqs, seq_len), generator=gen)]


def constant_tokens(
    model: HookedTransformer, *, n_seqs: int = 8, seq_len: int = 128, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """Each sequence one random ordinary token repeated ``seq_len`` times: content removed, RoPE alone varies."""
    check_model(model)
    n_seqs, seq_len, gen = _sized(n_seqs, seq_len, seed)
    ids = _usable_ids(model)
    pick = ids[torch.randperm(len(ids), generator=gen)[:n_seqs]]
    return pick[:, None].expand(-1, seq_len).clone()


def probe_tokens(
    model: HookedTransformer, probe: str, *, n_seqs: int = 8, seq_len: int = 128, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """Token batch of one of the probes ``natural``, ``random``, ``constant``."""
    check_model(model)
    makers = {"natural": natural_tokens, "random": random_tokens, "constant": constant_tokens}
    if probe not in makers:
        raise HeadlensError(f"unknown probe {probe!r}: choose one of {', '.join(PROBES)}")
    if check_count("seq_len", seq_len, minimum=2) > model.cfg.n_ctx:
        raise HeadlensError(f"seq_len {seq_len} exceeds the model's context of {model.cfg.n_ctx} tokens")
    return makers[probe](model, n_seqs=n_seqs, seq_len=seq_len, seed=seed)


# ---------------------------------------------------------------- pure reductions


def distance_index(n_q: int, n_k: int, device=None) -> Int[Tensor, "q k"]:
    """Relative distance q - k of every (query, key) pair; -1 where the key is in the future (masked)."""
    d = torch.arange(n_q, device=device)[:, None] - torch.arange(n_k, device=device)[None, :]
    return d.masked_fill(d < 0, -1)


def distance_sums(
    pattern: Float[Tensor, "batch head q k"],
) -> tuple[Float[Tensor, "head dist"], Float[Tensor, "head dist"], Float[Tensor, " dist"]]:
    """Per head and distance d = q - k: sum and sum of squares of attention weights, and the pair count."""
    b, h, n_q, n_k = pattern.shape
    dist = distance_index(n_q, n_k, pattern.device).flatten()
    keep = dist >= 0
    idx = dist[keep]
    flat = pattern.double().flatten(-2)[..., keep]
    sums = torch.zeros(h, n_q, dtype=torch.float64, device=pattern.device)
    sq = torch.zeros_like(sums)
    sums.index_add_(1, idx, flat.sum(0))
    sq.index_add_(1, idx, (flat**2).sum(0))
    counts = torch.zeros(n_q, dtype=torch.float64, device=pattern.device)
    counts.index_add_(0, idx, torch.full_like(idx, b, dtype=torch.float64))
    return sums, sq, counts


def excess_sums(pattern: Float[Tensor, "batch head q k"]) -> tuple[Float[Tensor, "head dist"], Float[Tensor, " dist"]]:
    """Per head and distance d: sum over queries q > d of a[q, q - d] - m_q / q (excess over a uniform causal head
    on the non-sink keys 1..q, see the module doc), and the number of such (query, key) pairs."""
    b, h, n, _ = pattern.shape
    p = pattern.double()
    nonsink = 1 - p[..., 1:, 0]  # [b, h, q-1] for q = 1..n-1
    base = nonsink / torch.arange(1, n, dtype=torch.float64, device=p.device)
    out = torch.zeros(h, n, dtype=torch.float64, device=p.device)
    counts = torch.zeros(n, dtype=torch.float64, device=p.device)
    for d in range(n - 1):
        diag = p.diagonal(offset=-d, dim1=-2, dim2=-1)[..., 1:]  # a[q, q-d] for q = d+1..n-1 (key >= 1)
        out[:, d] = (diag - base[..., d:]).sum((0, 2))
        counts[d] = b * (n - 1 - d)
    return out, counts


def uniform_profile(seq_len: int) -> Float[Tensor, " dist"]:
    """The distance profile of a head that attends uniformly to all visible keys (1/(q+1) averaged over q >= d)."""
    inv = 1.0 / torch.arange(1, seq_len + 1, dtype=torch.float64)
    tail = inv.flip(0).cumsum(0).flip(0)
    return tail / torch.arange(seq_len, 0, -1, dtype=torch.float64)


# ---------------------------------------------------------------- model-level profile


def distance_profile(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | str = "natural",
    *,
    n_seqs: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    layers=None,
    batch_size: int = 4,
    progress: bool = True,
) -> pd.DataFrame:
    """Mean attention at each relative distance, per head, averaged over the queries that can see that distance.

    ``tokens`` is a token batch or a probe name (``natural``, ``random``, ``constant``; see module doc).
    Columns: layer, head, kv_head, distance, attention (mean weight), attention_sq (mean squared weight),
    n (pairs averaged), lift (attention over that of a uniform head at the same distance; 1 = no preference),
    excess (mean excess over a uniform causal head on the non-sink keys, see the module doc; 0 = no preference)
    and n_excess (the (query, key >= 1) pairs it averages).
    """
    check_model(model)
    probe = tokens if isinstance(tokens, str) else "tokens"
    if isinstance(tokens, str):
        tokens = probe_tokens(model, tokens, n_seqs=n_seqs, seq_len=seq_len, seed=seed)
    elif non_defaults(distance_profile, n_seqs=n_seqs, seq_len=seq_len, seed=seed):
        raise HeadlensError("distance_profile takes a probe name with n_seqs/seq_len/seed, or tokens, not both")
    check_token_ids(model, tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise HeadlensError(
            f"tokens must be a [batch, pos] batch of at least 2 positions, got shape {tuple(tokens.shape)}"
        )
    L, H, n = model.cfg.n_layers, model.cfg.n_heads, tokens.shape[1]
    hooked = check_layers(model, layers)
    batch_size = check_count("batch_size", batch_size)
    sums = torch.zeros(L, H, n, dtype=torch.float64)
    sq = torch.zeros_like(sums)
    counts = torch.zeros(n, dtype=torch.float64)
    excess = torch.zeros_like(sums)
    n_excess = torch.zeros(n, dtype=torch.float64)

    def reduce(layer: int, pattern: Float[Tensor, "batch head q k"], rows: slice) -> None:
        s, s2, c = distance_sums(pattern)
        e, ce = excess_sums(pattern)
        sums[layer] += s.cpu()
        sq[layer] += s2.cpu()
        excess[layer] += e.cpu()
        if layer == hooked[0]:
            counts.add_(c.cpu())
            n_excess.add_(ce.cpu())

    stream_patterns(
        model, tokens, reduce, layers=hooked, batch_size=batch_size, progress=progress, desc=f"rope {probe}"
    )
    mean = sums / counts
    lift = mean / uniform_profile(n)
    kv = kv_heads(model)
    grid = np.array([(l, h, d) for l in hooked for h in range(H) for d in range(n)])
    idx = (grid[:, 0], grid[:, 1], grid[:, 2])
    return pd.DataFrame(
        {
            "layer": grid[:, 0],
            "head": grid[:, 1],
            "kv_head": [kv[h] for h in grid[:, 1]],
            "distance": grid[:, 2],
            "attention": mean.numpy()[idx],
            "attention_sq": (sq / counts).numpy()[idx],
            "n": counts.numpy()[grid[:, 2]].astype(int),
            "lift": lift.numpy()[idx],
            "excess": (excess / n_excess.clamp_min(1)).numpy()[idx],
            "n_excess": n_excess.numpy()[grid[:, 2]].astype(int),
        }
    )


def distance_profiles(model: HookedTransformer, probes=PROBES, **kwargs) -> pd.DataFrame:
    """:func:`distance_profile` for several probes, stacked with a ``probe`` column (default: natural, random, constant;
    one name is one probe)."""
    check_model(model)
    probes = [probes] if isinstance(probes, str) else probes
    frames = [distance_profile(model, p, **kwargs).assign(probe=p) for p in probes]
    df = pd.concat(frames, ignore_index=True)
    return df[["probe"] + [c for c in df.columns if c != "probe"]]


# ---------------------------------------------------------------- per-head summary


def _head_summary(g: pd.DataFrame) -> pd.Series:
    g = g.sort_values("distance")
    d = g["distance"].to_numpy()
    a = g["attention"].to_numpy()
    n = g["n"].to_numpy().astype(float)
    mean_distance = float((d * n * a).sum() / n[0])
    e = g["excess"].to_numpy()
    ne = g["n_excess"].to_numpy().astype(float)
    mass = e * ne  # excess summed over pairs at each distance
    positional = float(np.clip(mass, 0, None).sum() / ne[0]) if ne[0] > 0 else 0.0
    if ne[0] > 0 and mass.max() > 1e-6 * ne[0]:
        peak = int(np.argmax(np.where(ne > 0, e, -np.inf)))
        below = np.nonzero(e[peak:] <= e[peak] / 2)[0]
        peak_distance, peak_excess = float(d[peak]), float(e[peak])
        half_life = float(below[0]) if len(below) else np.nan
    else:  # no distance is preferred over the uniform baseline: a uniform head, a pure sink
        peak_distance = peak_excess = half_life = np.nan
    return pd.Series(
        {
            "peak_distance": peak_distance,
            "peak_excess": peak_excess,
            "half_life": half_life,
            "mean_distance": mean_distance,
            "positional_score": positional,
        }
    )


def rope_summary(profile: pd.DataFrame) -> pd.DataFrame:
    """Per head (and probe): peak distance, decay half-life, mean attended distance, positional score.

    All but ``mean_distance`` are measured against the uniform causal baseline on the non-sink keys (the
    ``excess`` column, see the module doc), so a uniform head and a pure first-token sink score 0:

    - ``peak_distance``: the distance with the largest mean excess (NaN when no distance has any);
    - ``peak_excess``: that excess (mean attention above a uniform head's, per (query, key) pair);
    - ``half_life``: distances from the peak until the excess first falls to half the peak's (NaN if never);
    - ``mean_distance``: mean over queries of the attention-weighted distance sum_k a_qk (q - k), sink included;
    - ``positional_score``: the share of each query's attention that sits above the uniform baseline at
      distances the head prefers on average, sum_d max(0, E(d)) / #queries, in [0, 1]: 1 for a head that
      always reads the key d back, 0 for uniform and sink heads, near 0 for a content head whose attended
      distances vary.
    """
    keys = [k for k in ("probe", "layer", "head", "kv_head") if k in profile.columns]
    if profile.empty:
        raise HeadlensError("empty distance profile")
    if "excess" not in profile.columns:
        raise HeadlensError("the profile has no 'excess' column: rebuild it with headlens.census.rope.distance_profile")
    cols = ["distance", "attention", "n", "excess", "n_excess"]
    out = profile.groupby(keys, sort=True)[cols].apply(_head_summary)
    return out.reset_index()


def rope_profile(model: HookedTransformer, probes=PROBES, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Profiles for ``probes`` and their per-head summary, in one call."""
    profile = distance_profiles(model, probes, **kwargs)
    return profile, rope_summary(profile)


# ---------------------------------------------------------------- figures

"""Per-head scores: pure functions of an attention pattern (+ probe metadata), no model and no I/O.

Every pattern score ``<name>_seq`` takes ``pattern: Float[Tensor, "batch head q k"]`` (rows sum to 1,
causal) and returns ``Float[Tensor, "batch head"]``: one number per sequence, a mean over the queries the
score is defined on. The census keeps these per-sequence scores (for bootstrap intervals) and averages
them over sequences; ``<name>`` without ``_seq`` is that average. ``without_sink`` gives the pattern
with key 0 removed and rows renormalised, on which the ``*_nosink`` columns are computed.

Definitions (the same as the README's and docs/head_types.md's):

- ``previous_token``: attention from i to i-1, queries i >= 1.
- ``duplicate_token`` / ``induction``: on ``[P, A1..An, A1..An]`` (``pos = prefix + 2n``; the prefix
  length is ``pos - 2n``, so ``prefix = 0`` is plain ``[A A]``): from the second A_i to the first A_i,
  respectively to the token after the first A_i (for i = n that is the second A_1), queries in the
  second half only. Same query/key pairs as TransformerLens ``detect_head`` on such sequences; TL
  divides the attention on those pairs by the total attention of all queries (``pos``) where we divide by
  the number of scored queries (``n``; ``pos - 1`` for previous-token), so ``tl = ours * n / pos``.
- ``first_token``: attention to position 0, queries i >= 1 (query 0 can only attend to itself).
- ``delimiter``: *excess* delimiter mass. For query i, mass_i is the attention on delimiter keys and
  share_i the fraction of keys 0..i that are delimiters (the mass a uniform causal head would put
  there). Score = mean over queries i >= 1 of (mass_i - share_i): 0 for a uniform head, about
  0 for a positional head, 1 - share for a head that only reads delimiters, negative for avoidance.
- ``local``: attention on the ``window`` previous keys and the query itself (i - window <= k <= i),
  queries i > window (those with at least one key outside the window).
- ``entropy``: Shannon entropy of each query's attention divided by log(#keys) = log(i + 1), queries
  i >= 1; 1 = uniform over the causal prefix, 0 = all on one key.
- ``copying`` (model-level) is in :mod:`headlens.census.ov`: the own-token rank test through the effective
  embedding, one measurement with ``negative_copying``.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from headlens.errors import HeadlensError

NEGATIVE_COPYING = 0.5
"""copy_suppression: share of tokens a head ranks in the bottom 1 % of its own OV output (head_types.negative_copying)."""
LOCAL_WINDOW = 3


def masked_attention(
    pattern: Float[Tensor, "batch head q k"], mask: Bool[Tensor, "batch q k"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: attention on the keys ``mask`` marks for each query, mean over queries with any marked key
    (NaN for a sequence without one). Identifier and attention-to-predicted scores are this with their masks."""
    m = mask.to(pattern.device, pattern.dtype)
    mass = torch.einsum("bhqk,bqk->bhq", pattern, m)
    has = (m.sum(-1) > 0).to(pattern.dtype)[:, None]
    return (mass * has).sum(-1) / has.sum(-1)


def add_defined(sums: Tensor, counts: Tensor, layer: int, per_seq: Float[Tensor, "batch head"]) -> None:
    """Add each head's scores in ``per_seq`` that are defined (NaN: the sequence has nothing to score) to
    ``sums[layer]`` and count them in ``counts[layer]`` (both ``layer x head``): the streamed form of the census's mean
    over the sequences that define a score (``headlens.census.run._mean_defined``); ``sums / counts`` is NaN for a
    head no sequence scores."""
    per_seq = per_seq.double().cpu()
    defined = ~per_seq.isnan()
    sums[layer] += per_seq.where(defined, 0.0).sum(0)
    counts[layer] += defined.sum(0)


def previous_token_seq(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, "batch head"]:
    """Per sequence: mean attention from each position i >= 1 to position i - 1."""
    _check(pattern, min_pos=2)
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)


def duplicate_token_seq(
    pattern: Float[Tensor, "batch head q k"], n: int | Int[Tensor, " batch"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: attention from the second copy of A_i to the first copy (``n`` may differ per sequence)."""
    return _repeat_offset(pattern, n, shift=0)


def induction_seq(
    pattern: Float[Tensor, "batch head q k"], n: int | Int[Tensor, " batch"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: attention from the second A_i to the token after the first A_i (``n`` may differ per sequence)."""
    return _repeat_offset(pattern, n, shift=1)


def first_token_seq(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, "batch head"]:
    """Per sequence: mean attention to position 0 (the sink) from queries i >= 1."""
    _check(pattern, min_pos=2)
    return pattern[..., 1:, 0].mean(-1)


def delimiter_seq(
    pattern: Float[Tensor, "batch head q k"], is_delim: Bool[Tensor, "batch k"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: excess attention on delimiter keys over a uniform causal head (mean over queries i >= 1).

    Key 0 (the sink) is never counted as a delimiter and the uniform baseline spreads over keys 1..i, so the
    score reads the same on a pattern and on its ``without_sink`` version's scale.
    """
    _check(pattern, min_pos=2)
    if tuple(is_delim.shape) != (pattern.shape[0], pattern.shape[-1]):
        raise HeadlensError(
            f"is_delim must be [batch, pos] = {(pattern.shape[0], pattern.shape[-1])}, got {tuple(is_delim.shape)}"
        )
    d = is_delim.to(device=pattern.device, dtype=pattern.dtype).clone()
    d[:, 0] = 0.0
    mass = torch.einsum("bhqk,bk->bhq", pattern, d)[..., 1:]
    share = (d.cumsum(-1)[:, 1:] / torch.arange(1, d.shape[-1], device=d.device, dtype=d.dtype))[:, None, :]
    return (mass - share).mean(-1)


def local_seq(pattern: Float[Tensor, "batch head q k"], window: int = LOCAL_WINDOW) -> Float[Tensor, "batch head"]:
    """Per sequence: mean attention on keys i - window .. i, over queries i > window."""
    pos = pattern.shape[-1]
    if window < 0 or pos <= window + 1:
        raise HeadlensError(
            f"local(window={window}) needs window >= 0 and sequences longer than window + 1 (pos={pos})"
        )
    near = sum(pattern.diagonal(offset=-d, dim1=-2, dim2=-1)[..., window + 1 - d :] for d in range(window + 1))
    return near.mean(-1)


def entropy_seq(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, "batch head"]:
    """Per sequence: attention entropy of each query divided by log(#keys), averaged over queries with >= 2 keys."""
    _check(pattern, min_pos=2)
    pos = pattern.shape[-1]
    norm = torch.arange(2, pos + 1, device=pattern.device, dtype=pattern.dtype).log()
    rows = pattern[..., 1:, :]
    return (-torch.special.xlogy(rows, rows).sum(-1) / norm).mean(-1)


def without_sink(pattern: Float[Tensor, "batch head q k"], eps: float = 1e-6) -> Float[Tensor, "batch head q k"]:
    """Key 0 removed and every query row i >= 1 renormalised over keys 1..i (TransformerLens' ``exclude_bos``).

    Row 0 has no other key and is left all zero; rows whose non-sink mass is below ``eps`` stay near zero. The
    divisor is the mass the row has left, not ``1 - pattern[..., 0]``: in bfloat16 a row does not sum to 1, and where
    the sink holds most of it the difference cancels (rows summed to up to 721 on a tiny model).
    """
    out = pattern.clone()
    out[..., 0] = 0.0
    return out / out.sum(-1, keepdim=True).clamp_min(eps)


def previous_token(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, " head"]:
    """Mean attention from each position i >= 1 to position i - 1."""
    return previous_token_seq(pattern).mean(0)


def duplicate_token(pattern: Float[Tensor, "batch head q k"], n: int) -> Float[Tensor, " head"]:
    """Mean attention from the second copy of A_i to the first copy, on ``[P, A1..An, A1..An]`` (prefix = pos - 2n)."""
    return duplicate_token_seq(pattern, n).mean(0)


def induction(pattern: Float[Tensor, "batch head q k"], n: int) -> Float[Tensor, " head"]:
    """Prefix-matching score: attention from the second A_i to the token after the first A_i (prefix = pos - 2n)."""
    return induction_seq(pattern, n).mean(0)


def first_token(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, " head"]:
    """Mean attention to position 0 (the sink) from queries i >= 1."""
    return first_token_seq(pattern).mean(0)


def delimiter(pattern: Float[Tensor, "batch head q k"], is_delim: Bool[Tensor, "batch k"]) -> Float[Tensor, " head"]:
    """Excess attention on delimiter keys over a uniform causal head: mean over queries i >= 1 of mass_i - share_i."""
    return delimiter_seq(pattern, is_delim).mean(0)


def local(pattern: Float[Tensor, "batch head q k"], window: int = LOCAL_WINDOW) -> Float[Tensor, " head"]:
    """Mean attention on keys i - window .. i, over queries i > window."""
    return local_seq(pattern, window).mean(0)


def entropy(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, " head"]:
    """Attention entropy of each query divided by log(#keys), averaged over queries with >= 2 keys."""
    return entropy_seq(pattern).mean(0)


def _repeat_offset(pattern: Tensor, n, *, shift: int) -> Tensor:
    """Per sequence b: mean over the second-half queries q >= pos - n_b of pattern[b, :, q, q - n_b + shift]."""
    if pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise HeadlensError(f"pattern must be [batch, head, q, k] with q == k, got {tuple(pattern.shape)}")
    n_seqs, _, pos, _ = pattern.shape
    n = torch.as_tensor(n, dtype=torch.long).flatten().to(pattern.device)
    n = n.expand(n_seqs) if n.numel() == 1 else n
    if n.numel() != n_seqs:
        raise HeadlensError(
            f"repeated-token scores: n must be one number or one per sequence ({n_seqs}), got {n.numel()}"
        )
    if int(n.min()) < 2:
        raise HeadlensError(f"repeated-token scores need n >= 2 (got n={int(n.min())})")
    if 2 * int(n.max()) > pos:
        raise HeadlensError(
            f"repeated-token scores: 2n = {2 * int(n.max())} is longer than the sequence ({pos} tokens)"
        )
    q = torch.arange(pos, device=pattern.device)
    keys = (q[None] - n[:, None] + shift).clamp(0, pos - 1)  # [batch, q]
    scored = (q[None] >= pos - n[:, None]).to(pattern.dtype)  # second-half queries
    picked = pattern.gather(-1, keys[:, None, :, None].expand(-1, pattern.shape[1], -1, 1))[..., 0]
    return (picked * scored[:, None]).sum(-1) / scored.sum(-1)[:, None]


def _check(pattern: Tensor, *, min_pos: int) -> None:
    if pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise HeadlensError(f"pattern must be [batch, head, q, k] with q == k, got {tuple(pattern.shape)}")
    if pattern.shape[-1] < min_pos:
        raise HeadlensError(f"pattern needs at least {min_pos} positions, got {pattern.shape[-1]}")

"""Per-head scores: pure functions of an attention pattern (+ probe metadata), no model and no I/O.

Every pattern score takes ``pattern: Float[Tensor, "batch head q k"]`` (rows sum to 1, causal) and
returns ``Float[Tensor, " head"]``: a mean over the batch and over the queries the score is defined
on. Each sequence contributes the same number of queries, so averaging batch means weighted by batch
size gives exactly the score of the whole probe (what ``headlens.census`` does while streaming).

Definitions (DESIGN.md §7):

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
- ``copying`` (model-level): Σλ / Σ|λ| over the eigenvalues λ of the full OV circuit W_E·W_V·W_O·W_U
  (Elhage et al. 2021; Olsson et al. 2022): +1 when all eigenvalues are positive (the head copies the
  tokens it attends to), -1 when it suppresses them.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.errors import HeadlensError

LOCAL_WINDOW = 3


def previous_token(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, " head"]:
    """Mean attention from each position i >= 1 to position i - 1."""
    _check(pattern, min_pos=2)
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))


def duplicate_token(pattern: Float[Tensor, "batch head q k"], n: int) -> Float[Tensor, " head"]:
    """Mean attention from the second copy of A_i to the first copy, on ``[P, A1..An, A1..An]`` (prefix = pos - 2n)."""
    p = _prefix(pattern, n)
    return pattern[..., p + n :, p : p + n].diagonal(dim1=-2, dim2=-1).mean(dim=(0, 2))


def induction(pattern: Float[Tensor, "batch head q k"], n: int) -> Float[Tensor, " head"]:
    """Prefix-matching score: attention from the second A_i to the token after the first A_i (prefix = pos - 2n)."""
    p = _prefix(pattern, n)
    return pattern[..., p + n :, p + 1 : p + n + 1].diagonal(dim1=-2, dim2=-1).mean(dim=(0, 2))


def first_token(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, " head"]:
    """Mean attention to position 0 (the sink) from queries i >= 1."""
    _check(pattern, min_pos=2)
    return pattern[..., 1:, 0].mean(dim=(0, 2))


def delimiter(pattern: Float[Tensor, "batch head q k"], is_delim: Bool[Tensor, "batch k"]) -> Float[Tensor, " head"]:
    """Excess attention on delimiter keys over a uniform causal head: mean over queries i >= 1 of mass_i - share_i."""
    _check(pattern, min_pos=2)
    if tuple(is_delim.shape) != (pattern.shape[0], pattern.shape[-1]):
        raise HeadlensError(
            f"is_delim must be [batch, pos] = {(pattern.shape[0], pattern.shape[-1])}, got {tuple(is_delim.shape)}"
        )
    d = is_delim.to(device=pattern.device, dtype=pattern.dtype)
    mass = torch.einsum("bhqk,bk->bhq", pattern, d)[..., 1:]
    share = (d.cumsum(-1) / torch.arange(1, d.shape[-1] + 1, device=d.device, dtype=d.dtype))[:, None, 1:]
    return (mass - share).mean(dim=(0, 2))


def local(pattern: Float[Tensor, "batch head q k"], window: int = LOCAL_WINDOW) -> Float[Tensor, " head"]:
    """Mean attention on keys i - window .. i, over queries i > window."""
    pos = pattern.shape[-1]
    if window < 0 or pos <= window + 1:
        raise HeadlensError(
            f"local(window={window}) needs window >= 0 and sequences longer than window + 1 (pos={pos})"
        )
    near = sum(pattern.diagonal(offset=-d, dim1=-2, dim2=-1)[..., window + 1 - d :] for d in range(window + 1))
    return near.mean(dim=(0, 2))


def entropy(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, " head"]:
    """Attention entropy of each query divided by log(#keys), averaged over queries with >= 2 keys."""
    _check(pattern, min_pos=2)
    pos = pattern.shape[-1]
    norm = torch.arange(2, pos + 1, device=pattern.device, dtype=pattern.dtype).log()
    per_head = [
        (-torch.special.xlogy(pattern[:, h, 1:], pattern[:, h, 1:]).sum(-1) / norm).mean()
        for h in range(pattern.shape[1])
    ]
    return torch.stack(per_head)


def copying(model: HookedTransformer) -> Float[Tensor, "layer head"]:
    """Copying score Σλ/Σ|λ| of each head's OV circuit W_E W_V W_O W_U, from its d_head x d_head factored form.

    The nonzero eigenvalues of (W_E W_V)(W_O W_U) are those of W_O (W_U W_E) W_V, so only the
    d_model x d_model product W_U W_E is formed (never vocab x vocab); ``model.OV`` is TL's
    ``FactoredMatrix`` with per-q-head (GQA-expanded) W_V.
    """
    with torch.inference_mode():
        unembed_embed = model.W_U @ model.W_E
        eig = (model.OV @ unembed_embed).BA.double()
        lam = torch.linalg.eigvals(eig)
        return (lam.sum(-1).real / lam.abs().sum(-1).clamp_min(1e-30)).float().cpu()


def _prefix(pattern: Tensor, n: int) -> int:
    pos = pattern.shape[-1]
    if int(n) < 2:
        raise HeadlensError(f"repeated-token scores need n >= 2 (got n={n})")
    if 2 * n > pos:
        raise HeadlensError(f"repeated-token scores: 2n = {2 * n} is longer than the sequence ({pos} tokens)")
    if pattern.ndim != 4 or pattern.shape[-2] != pos:
        raise HeadlensError(f"pattern must be [batch, head, q, k] with q == k, got {tuple(pattern.shape)}")
    return pos - 2 * int(n)


def _check(pattern: Tensor, *, min_pos: int) -> None:
    if pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise HeadlensError(f"pattern must be [batch, head, q, k] with q == k, got {tuple(pattern.shape)}")
    if pattern.shape[-1] < min_pos:
        raise HeadlensError(f"pattern needs at least {min_pos} positions, got {pattern.shape[-1]}")

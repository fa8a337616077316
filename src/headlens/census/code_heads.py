"""Code heads: bracket-matching heads and identifier heads, scored on real Python code (the standard library).

The probe is :func:`headlens.data.code.code_probe` (bracket pairs, closers and identifier uses marked with Python's
own ``tokenize``). Scores (per sequence, then averaged like the census's):

- ``bracket_matching``: attention from the token that must predict a closing bracket to the opener that bracket
  closes and the tokens on either side of it (keys opener - ``REGION`` .. opener + ``REGION``: the callee's name
  or the bracket before, the first argument after), mean over such tokens. A head that does this tells the model
  which closer (``)``, ``]``, ``}``) comes and that one is due. Earlier versions failed their causal check: the
  closer's own attention to its opener (a head at the closer cannot help predict it), then the opener token alone
  from the token before the closer (on Qwen it labelled L20H4 only, while the layer-20 head that matters most for
  closers, L20H0, reads the callee's name and the opener: about 0.1 on the opener alone, 0.30 on the region).
- ``closer_to_opener``: attention from a closing bracket to its own opener minus its mean attention on each other
  opening bracket before it (same window), mean over scored closers: 0 for a head that reads every opener alike or
  none, up to 1 for one that reads only the matching opener. The query is the closer itself, so what such a head can
  change is the prediction of the token *after* the closer (its causal check), not the closer.
- ``identifier``: attention from a use of a name to the earlier occurrences of that name, mean over uses.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.census.scores import add_defined, masked_attention
from headlens.data.code import REGION, CodeProbe, code_probe
from headlens.engine.capture import stream_patterns
from headlens.errors import check_model
from headlens.heads import head_frame

THRESHOLDS = {"bracket_matching": 0.25, "identifier": 0.3, "closer_to_opener": 0.1}
"""bracket_matching at 0.25, 3.1x its random-weights null maximum (0.080, three keys): at 0.3 four Qwen heads scoring
0.26-0.33 changed label between seeds (``analyses/results/census_trust``)."""


def _region_attention(
    pattern: Float[Tensor, "batch head q k"], opener: Int[Tensor, "batch q"]
) -> Float[Tensor, "batch head q"]:
    """Attention from each position q to the keys opener[q] - REGION .. opener[q] + REGION (0 where opener < 0)."""
    op = opener.to(pattern.device)
    out = torch.zeros(pattern.shape[:3], dtype=pattern.dtype, device=pattern.device)
    for d in range(-REGION, REGION + 1):
        key = op + d
        valid = (op >= 0) & (key >= 0)
        got = pattern.gather(-1, key.clamp_min(0)[:, None, :, None].expand(-1, pattern.shape[1], -1, 1))[..., 0]
        out += got * valid[:, None].to(pattern.dtype)
    return out


def bracket_matching(
    pattern: Float[Tensor, "batch head q k"], opener: Int[Tensor, "batch q"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: attention from each position that predicts a closing bracket (``opener >= 0``) to that
    bracket's opener and its neighbours (``REGION`` keys either side), mean over those positions."""
    w = (opener.to(pattern.device) >= 0)[:, None].to(pattern.dtype)
    return (_region_attention(pattern, opener) * w).sum(-1) / w.sum(-1)


def closer_queries(opener: Int[Tensor, "batch q"]) -> Int[Tensor, "batch q"]:
    """``opener`` moved to the closer: at position c, the opener of the scored closer at c (-1 elsewhere)."""
    out = torch.full_like(opener, -1)
    out[:, 1:] = opener[:, :-1]
    return out


def closer_to_opener(
    pattern: Float[Tensor, "batch head q k"], opener: Int[Tensor, "batch q"], is_opener: Bool[Tensor, "batch k"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: at each scored closer, attention on its own opener minus the mean attention on each other opener
    before it (0 when there is none), mean over scored closers (NaN for a sequence without one)."""
    at = closer_queries(opener.to(pattern.device))
    n_q, n_k = pattern.shape[-2:]
    own = torch.zeros(at.shape[0], n_q, n_k, dtype=torch.bool, device=pattern.device)
    own.scatter_(-1, at.clamp_min(0)[..., None], at[..., None] >= 0)
    before = torch.ones(n_q, n_k, dtype=torch.bool, device=pattern.device).tril(-1)
    others = is_opener.to(pattern.device)[:, None, :] & before & ~own  # [batch, q, k]
    on_own = torch.einsum("bhqk,bqk->bhq", pattern, own.to(pattern.dtype))
    n_other = others.sum(-1).clamp_min(1).to(pattern.dtype)[:, None]
    on_other = torch.einsum("bhqk,bqk->bhq", pattern, others.to(pattern.dtype)) / n_other
    w = (at >= 0)[:, None].to(pattern.dtype)
    return ((on_own - on_other) * w).sum(-1) / w.sum(-1)


def identifier(
    pattern: Float[Tensor, "batch head q k"], ident: Bool[Tensor, "batch q k"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: attention from each scored use of a name to that name's earlier occurrences, mean over uses."""
    return masked_attention(pattern, ident)


def code_scores(model: HookedTransformer, probe: CodeProbe | None = None, *, seed: int = 0, progress: bool = False):
    """Per head: bracket_matching, closer_to_opener and identifier scores on ``probe`` (default :func:`code_probe`
    with ``seed``), each the mean over the windows that define it (as the census averages them; NaN: none does)."""
    check_model(model)
    probe = code_probe(model, seed=seed) if probe is None else probe
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = ("bracket_matching", "closer_to_opener", "identifier")
    sums = {k: torch.zeros(L, H, dtype=torch.float64) for k in names}
    counts = {k: torch.zeros(L, H, dtype=torch.float64) for k in names}

    def reduce(layer, pattern, rows):
        per_seq = {
            "bracket_matching": bracket_matching(pattern, probe.opener[rows]),
            "closer_to_opener": closer_to_opener(pattern, probe.opener[rows], probe.is_opener[rows]),
            "identifier": identifier(pattern, probe.ident[rows]),
        }
        for name, value in per_seq.items():
            add_defined(sums[name], counts[name], layer, value)

    stream_patterns(model, probe.tokens, reduce, progress=progress, desc="code heads")
    return head_frame(model, **{k: sums[k] / counts[k] for k in names})


def bracket_by_depth(model: HookedTransformer, heads, probe: CodeProbe) -> dict[int, list[float]]:
    """Mean bracket score (token before a closer -> its opener's region) of each of ``heads`` by nesting depth (1, 2,
    3 = 3 or deeper)."""
    check_model(model)
    heads = list(heads)
    depth = probe.depth.clamp_max(3)
    out = {d: torch.zeros(len(heads), dtype=torch.float64) for d in (1, 2, 3)}
    counts = {d: int(((probe.opener >= 0) & (depth == d)).sum()) for d in (1, 2, 3)}

    def reduce(layer, pattern, rows):
        for i, (l, h) in enumerate(heads):
            if l != layer:
                continue
            op = probe.opener[rows].to(pattern.device)
            got = _region_attention(pattern[:, h : h + 1], op)[:, 0]
            for d in (1, 2, 3):
                sel = (op >= 0) & (depth[rows].to(op.device) == d)
                out[d][i] += float(got[sel].double().sum())

    stream_patterns(model, probe.tokens, reduce, layers=sorted({l for l, _ in heads}), progress=False)
    return {d: (out[d] / max(counts[d], 1)).tolist() for d in (1, 2, 3)}, counts

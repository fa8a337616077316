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
- ``identifier``: attention from a use of a name to the earlier occurrences of that name, mean over uses.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.census.scores import masked_attention
from headlens.data.code import REGION, CodeProbe, code_probe
from headlens.engine.capture import stream_patterns
from headlens.heads import head_frame

THRESHOLDS = {"bracket_matching": 0.25, "identifier": 0.3}
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


def identifier(
    pattern: Float[Tensor, "batch head q k"], ident: Bool[Tensor, "batch q k"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: attention from each scored use of a name to that name's earlier occurrences, mean over uses."""
    return masked_attention(pattern, ident)


def code_scores(model: HookedTransformer, probe: CodeProbe | None = None, *, seed: int = 0, progress: bool = False):
    """Per head: bracket_matching and identifier scores on ``probe`` (default :func:`code_probe` with ``seed``)."""
    probe = code_probe(model, seed=seed) if probe is None else probe
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sums = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("bracket_matching", "identifier")}

    def reduce(layer, pattern, rows):
        sums["bracket_matching"][layer] += bracket_matching(pattern, probe.opener[rows]).double().cpu().sum(0)
        sums["identifier"][layer] += identifier(pattern, probe.ident[rows]).double().cpu().nan_to_num().sum(0)

    stream_patterns(model, probe.tokens, reduce, progress=progress, desc="code heads")
    n_ident = int((probe.ident.any(-1).any(-1)).sum())
    return head_frame(
        model, bracket_matching=sums["bracket_matching"] / probe.n_seqs, identifier=sums["identifier"] / max(n_ident, 1)
    )


def bracket_by_depth(model: HookedTransformer, heads, probe: CodeProbe) -> dict[int, list[float]]:
    """Mean bracket score (token before a closer -> its opener's region) of each of ``heads`` by nesting depth (1, 2,
    3 = 3 or deeper)."""
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

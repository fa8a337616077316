"""Positional heads: the same relative-distance preference on constant tokens (content removed exactly) as on text.

With E(d) the excess attention at distance d over a uniform causal head on the non-sink keys
(:mod:`headlens.census.rope`), score = sum_d min(E_natural(d), E_constant(d))^+ / #queries, and the head's offset is
the distance where that overlap peaks.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.census.rope import distance_profiles, rope_summary
from headlens.errors import check_count
from headlens.io import once_per_weights

THRESHOLD = 0.5
"""Set before the default Qwen was scored (docs/head_types.md); clears the random-weights null (census_trust/null.csv)."""


def positional_scores(
    model: HookedTransformer, *, n_seqs: int = 4, seq_len: int = 128, seed: int = 0, progress: bool = False
) -> pd.DataFrame:
    """Per head: positional score on natural text and on constant tokens, their overlap ``positional`` and the offset."""
    n_seqs = check_count("n_seqs", n_seqs)
    seq_len = check_count("seq_len", seq_len, minimum=2)
    prof = distance_profiles(
        model, ("natural", "constant"), n_seqs=n_seqs, seq_len=seq_len, seed=seed, progress=progress
    )
    full = rope_summary(prof)
    summary = full.pivot_table(index=["layer", "head"], columns="probe", values="positional_score")
    rows = []
    for (layer, head), g in prof.groupby(["layer", "head"], sort=True):
        nat, const = g[g.probe == "natural"].sort_values("distance"), g[g.probe == "constant"].sort_values("distance")
        score, offset = positional_overlap(
            torch.tensor(nat["excess"].to_numpy()),
            torch.tensor(const["excess"].to_numpy()),
            torch.tensor(nat["n_excess"].to_numpy(), dtype=torch.float64),
        )
        rows.append(
            {
                "layer": layer,
                "head": head,
                "positional_natural": summary.loc[(layer, head), "natural"],
                "positional_constant": summary.loc[(layer, head), "constant"],
                "positional": round(score, 6),
                "positional_offset": offset,
            }
        )
    out = pd.DataFrame(rows)
    out.attrs["rope_summary"] = full
    return out


def positional_overlap(
    excess_natural: Float[Tensor, " dist"], excess_constant: Float[Tensor, " dist"], n_pairs: Float[Tensor, " dist"]
) -> tuple[float, int]:
    """The positional score from two excess profiles (mean excess per pair) and their pair counts: (score, offset)."""
    over = torch.minimum(excess_natural, excess_constant).clamp_min(0) * n_pairs
    if float(over.sum()) <= 0:
        return 0.0, -1
    return float(over.sum() / n_pairs[0]), int(over.argmax())


@once_per_weights
def positional_table(model: HookedTransformer) -> pd.DataFrame:
    """positional_scores(model), computed once per model state (the score and the offset are two census columns;
    every weight shapes the patterns it measures)."""
    return positional_scores(model)

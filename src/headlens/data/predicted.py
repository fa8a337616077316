"""The ``predicted`` probe: natural-text windows plus the model's own top-1 next-token prediction at every position.

Copy-suppression scores (:mod:`headlens.census.ov`) read which earlier tokens the model is about to predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.data.probes import Probe, natural_text
from headlens.errors import check_count, check_model


@dataclass(frozen=True)
class PredictedProbe(Probe):
    """A text probe plus the model's top-1 next-token prediction at every position."""

    predicted: Tensor | None = None


def model_predictions(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], batch_size: int = 4
) -> Int[Tensor, "batch pos"]:
    """The model's top-1 next-token prediction at every position."""
    check_model(model)
    batch_size = check_count("batch_size", batch_size)
    out = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            out.append(model(tokens[start : start + batch_size].to(model.cfg.device)).argmax(-1).cpu())
    return torch.cat(out)


def predicted_probe(model: HookedTransformer, *, seed: int = 0, n_seqs: int = 8, seq_len: int = 128):
    """Natural-text windows plus the model's top-1 prediction at every position (probe kind ``predicted``)."""
    check_model(model)
    n_seqs = check_count("n_seqs", n_seqs)
    seq_len = check_count("seq_len", seq_len, minimum=2)
    base = natural_text(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed)
    return PredictedProbe(
        "predicted", base.tokens, base.is_delim, predicted=model_predictions(model, base.tokens), **_extra(base)
    )


def _extra(probe) -> dict:
    return {"sources": probe.sources} if hasattr(probe, "sources") else {}

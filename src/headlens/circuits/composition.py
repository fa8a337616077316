"""Composition scores (Elhage et al. 2021, "A mathematical framework for transformer circuits"): how much of a later
head's Q, K or V input an earlier head's output can move, from the weights alone.

For sender head A (OV circuit ``W_V^A W_O^A``, row-vector convention as TransformerLens) and receiver head B
(``W_QK^B = W_Q^B W_K^Bᵀ``):

- Q-composition: ``‖W_OV^A W_QK^B‖_F / (‖W_OV^A‖_F ‖W_QK^B‖_F)`` (A writes what B's queries read);
- K-composition: the same with ``W_QK^Bᵀ`` (A writes what B's keys read);
- V-composition: the same with ``W_OV^B`` (A writes what B's values read).

Everything is computed factored (TransformerLens ``FactoredMatrix``; no ``d_model × d_model`` matrix is formed): each
factored matrix is collapsed to its ``d_head``-sized side once, and a pair's score is the norm of a ``d_head × d_head``
product, as TransformerLens' ``composition_scores`` does.

Input side. A head reads the residual stream through its layer norm, so the matrix that reads is the norm's linear
part times ``W_Q``/``W_K``/``W_V``: ``diag(w)`` for an RMS norm with weights, ``(I − 11ᵀ/d) diag(w)`` for LayerNorm.
With folded layer norms (headlens loads Qwen with ``fold_ln``) the weight is already inside ``W_Q``/``W_K``/``W_V``
and the norm's remaining scale is one number per position, which a normalised score ignores; for LayerNorm the
centring still applies (a no-op where ``W_O`` was centred). The toy model keeps its LayerNorm weights unfolded, so
they are applied here (TransformerLens' ``all_composition_scores`` reads the raw weights and would differ there).

GQA: a q head reads its kv head's keys and values, so receiver head ``h`` uses ``_W_K[h // group]`` and
``_W_V[h // group]`` (TransformerLens' repeated ``W_K``/``W_V`` give the same; ``test_circuits`` checks it).

Chance is far from zero: two random rank-``d_head`` matrices in ``d_model`` dimensions have a score near
``sqrt(d_head / d_model)``-ish. Each score is therefore reported beside a baseline: the mean and standard deviation of
the same score for ``n_random`` pairs of random Gaussian factors of the same shapes (seeded); ``z`` says how many
standard deviations above chance a pair is, ``ratio`` how many times chance.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix, HookedTransformer

from headlens.circuits.labels import head_labels
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import head_name, kv_heads

COMPOSITIONS = ("q", "k", "v")


def reading_norm(model: HookedTransformer, layer: int) -> Float[Tensor, "d_model d_model"] | None:
    """The linear part of layer ``layer``'s attention input norm (None: identity, e.g. a folded RMS norm)."""
    check_model(model)
    ln = model.blocks[layer].ln1
    d = model.cfg.d_model
    out = None
    if model.cfg.normalization_type in ("LN", "LNPre"):
        out = torch.eye(d) - torch.full((d, d), 1.0 / d)
    w = getattr(ln, "w", None)
    if w is not None:
        diag = torch.diag(w.detach().float().cpu())
        out = diag if out is None else out @ diag
    return out


def input_weights(model: HookedTransformer, layer: int, kind: str) -> Float[Tensor, "head d_model d_head"]:
    """``W_Q``, ``W_K`` or ``W_V`` of every q head of ``layer`` as it reads the residual stream (norm applied; k/v of
    the head's kv head)."""
    check_model(model)
    attn = model.blocks[layer].attn
    if kind == "q":
        w = attn.W_Q
    else:
        grouped = getattr(attn, "_W_K", None) is not None and model.cfg.n_key_value_heads is not None
        if grouped:
            raw = attn._W_K if kind == "k" else attn._W_V
            w = raw[torch.tensor(kv_heads(model))]
        else:
            w = attn.W_K if kind == "k" else attn.W_V
    w = w.detach().float().cpu()
    norm = reading_norm(model, layer)
    return w if norm is None else torch.einsum("ij,hjk->hik", norm, w)


def ov_circuits(model: HookedTransformer, layer: int) -> FactoredMatrix:
    """Every head's OV circuit at ``layer`` as it reads and writes the residual stream: ``[head] d_model × d_model``."""
    return FactoredMatrix(input_weights(model, layer, "v"), model.blocks[layer].attn.W_O.detach().float().cpu())


def qk_circuits(model: HookedTransformer, layer: int) -> FactoredMatrix:
    """Every head's QK circuit at ``layer``: ``[head] d_model(query) × d_model(key)``."""
    return FactoredMatrix(input_weights(model, layer, "q"), input_weights(model, layer, "k").transpose(-1, -2))


def composition_score(left: FactoredMatrix, right: FactoredMatrix) -> Tensor:
    """``‖left @ right‖_F / (‖left‖_F ‖right‖_F)`` of (broadcast) factored matrices."""
    a, b = left.collapse_l(), right.collapse_r()
    return (a @ b).norm(dim=(-2, -1)) / a.norm(dim=(-2, -1)) / b.norm(dim=(-2, -1))


def _receiver(model: HookedTransformer, layer: int, kind: str) -> FactoredMatrix:
    if kind == "q":
        return qk_circuits(model, layer)
    if kind == "k":
        return qk_circuits(model, layer).T
    return ov_circuits(model, layer)


def random_baseline(d_model: int, d_head: int, *, n_random: int = 200, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of the composition score of ``n_random`` pairs of products of random Gaussian
    factors ``(d_model × d_head)(d_head × d_model)``: the chance level of every composition type (same shapes)."""
    g = torch.Generator().manual_seed(int(seed))

    def draw():
        return FactoredMatrix(
            torch.randn(n_random, d_model, d_head, generator=g), torch.randn(n_random, d_head, d_model, generator=g)
        )

    scores = composition_score(draw(), draw())
    return float(scores.mean()), float(scores.std())


def composition_scores(
    model: HookedTransformer,
    *,
    kinds=COMPOSITIONS,
    n_random: int = 200,
    seed: int = 0,
    census: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Q-, K- and V-composition of every head pair in different layers (sender earlier), with the random baseline.

    Columns: ``sender, receiver, composition`` (q/k/v), ``sender_layer, sender_head, receiver_layer, receiver_head,
    receiver_kv_head, score, baseline, baseline_std, z, ratio``; with ``census`` also ``sender_label`` and
    ``receiver_label``. The baseline (mean and std over ``n_random`` random matrix pairs) is in every row.
    """
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    n_random = check_count("n_random", n_random, why="random matrix pairs of the baseline")
    unknown = [k for k in kinds if k not in COMPOSITIONS]
    if unknown or not kinds:
        raise HeadlensError(f"unknown composition {unknown or kinds}: choose from {', '.join(COMPOSITIONS)}")
    cfg = model.cfg
    if cfg.n_layers < 2:
        raise HeadlensError("composition needs at least two layers")
    mean, std = random_baseline(cfg.d_model, cfg.d_head, n_random=n_random, seed=seed)
    kv = kv_heads(model)
    with torch.inference_mode():
        left = [ov_circuits(model, layer).collapse_l() for layer in range(cfg.n_layers)]  # head d_head d_model
        left_norm = [x.norm(dim=(-2, -1)) for x in left]
        rows = []
        for kind in kinds:
            for lr in range(1, cfg.n_layers):
                right = _receiver(model, lr, kind).collapse_r()  # head d_model d_head
                right_norm = right.norm(dim=(-2, -1))
                senders = torch.cat(left[:lr])  # (layer head) d_head d_model
                norms = torch.cat(left_norm[:lr])
                prod = torch.einsum("ard,bds->abrs", senders, right).flatten(2).norm(dim=-1)
                score = prod / norms[:, None] / right_norm[None, :]
                for a in range(score.shape[0]):
                    ls, hs = divmod(a, cfg.n_heads)
                    for hr in range(cfg.n_heads):
                        rows.append((ls, hs, lr, hr, kind, float(score[a, hr])))
    df = pd.DataFrame(
        rows, columns=["sender_layer", "sender_head", "receiver_layer", "receiver_head", "composition", "score"]
    )
    df.insert(0, "sender", [head_name(l, h) for l, h in zip(df.sender_layer, df.sender_head)])
    df.insert(1, "receiver", [head_name(l, h) for l, h in zip(df.receiver_layer, df.receiver_head)])
    df.insert(2, "composition", df.pop("composition"))
    df["receiver_kv_head"] = [kv[h] for h in df.receiver_head]
    df["baseline"], df["baseline_std"] = mean, std
    df["z"] = (df["score"] - mean) / std
    df["ratio"] = df["score"] / mean
    if census is not None:
        labels = head_labels(census)
        df["sender_label"] = [labels.get((l, h), "") for l, h in zip(df.sender_layer, df.sender_head)]
        df["receiver_label"] = [labels.get((l, h), "") for l, h in zip(df.receiver_layer, df.receiver_head)]
    return df


def top_senders(table: pd.DataFrame, receiver: str, composition: str, top_k: int = 5) -> pd.DataFrame:
    """The ``top_k`` senders of ``receiver`` by ``composition`` score (largest first)."""
    top_k = check_count("top_k", top_k, why="how many senders to keep")
    part = table[(table.receiver == receiver) & (table.composition == composition)]
    if part.empty:
        raise HeadlensError(f"no {composition}-composition rows for receiver {receiver} (is it in layer 0?)")
    return part.nlargest(top_k, "score").reset_index(drop=True)

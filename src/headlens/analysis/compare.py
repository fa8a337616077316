"""Base model vs fine-tuned model, head by head.

Per head: how much the attention pattern moved on the same probes (Jensen-Shannon divergence,
averaged over queries), how much its weights moved (relative Frobenius norm of the change of
W_Q, W_K, W_V, W_O), and — from the census — how each score and the label changed.

Streaming: for each batch the base model's patterns are kept (one batch's worth, e.g. 8 x 24 x 14 x 128^2 floats =
176 MB for Qwen at 128 tokens), then the tuned model runs on the same batch with a reducer that turns each layer's
pattern into per-head JSD sums and drops both. Layers below the first block whose weights differ compute the same
activations in both models: the tuned model starts at that block from the base model's residual stream (a LoRA of
layers 12-23 costs the tuned model half a forward), and their divergence is 0 exactly.

GQA: TransformerLens keeps keys/values per kv head (``attn._W_K``/``_W_V``, shape
[n_kv_heads, d_model, d_head]); ``W_K``/``W_V`` are the same matrices repeated for every q head. The
W_K/W_V change is measured per kv head and shown on each q head that reads it, so q heads of one
kv group carry the same ``dW_K``/``dW_V``. Weights are compared after TransformerLens processing
(RMSNorm scale folded into W_Q/W_K/W_V); a LoRA never touches the norm, so an unchanged head reads 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer, utils

from headlens.census.run import run_census
from headlens.data.probes import ProbeSet, check_probes, default_probes
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import kv_heads
from headlens.models import check_compatible
from headlens.progress import tqdm

MAX_PROBE_TOKENS = 256
N_SEQS = 12
"""Sequences per probe kind behind the attention change when no probes are given (the census's own probes hold 48
per text kind and 24 repeated): chosen on seed 0 for the same top-10 heads and Spearman >= 0.99 as the full set,
checked on seed 1 (benchmarks/results/compare_probes.json); 29 % of the tokens. ``n_seqs=None``: the full
census set."""
SCORES = ("previous_token", "duplicate_token", "induction", "copying", "first_token", "delimiter", "local", "entropy")


# ---------------------------------------------------------------- pure functions


def js_divergence(p: Float[Tensor, "... k"], q: Float[Tensor, "... k"]) -> Float[Tensor, "..."]:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint) between distributions on the last axis."""
    p, q = p.double(), q.double()
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return ((kl_pm + kl_qm) / (2 * np.log(2))).clamp_min(0)


def relative_change(w_base: Float[Tensor, "head ..."], w_tuned: Float[Tensor, "head ..."]) -> Float[Tensor, " head"]:
    """||W_tuned - W_base||_F / ||W_base||_F per leading (head) index."""
    diff = (w_tuned.double() - w_base.double()).flatten(1).norm(dim=1)
    return diff / w_base.double().flatten(1).norm(dim=1).clamp_min(1e-30)


# ---------------------------------------------------------------- probes


def _as_batches(model: HookedTransformer, probes, seed: int = 0, n_seqs: int | None = N_SEQS) -> list[Tensor]:
    """Token batches of ``probes``: a ProbeSet (None = the census default probes, ``n_seqs`` per kind), a token
    tensor, or text(s)."""

    if probes is None:
        probes = default_probes(model, seed=seed, n_seqs=n_seqs)
    if isinstance(probes, ProbeSet):
        check_probes(model, probes)
        batches = [p.tokens for p in probes]
    elif isinstance(probes, Tensor):
        tokens = probes[None] if probes.ndim == 1 else probes
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise HeadlensError(
                f"probes must be a [batch, pos] token tensor with at least 2 positions, got shape {tuple(probes.shape)}"
            )
        batches = [tokens.long()]
    elif isinstance(probes, str) or (
        isinstance(probes, (list, tuple)) and probes and all(isinstance(t, str) for t in probes)
    ):
        if model.tokenizer is None:
            raise HeadlensError("text probes need a model with a tokenizer; pass token ids instead")
        batches = [
            model.to_tokens(text, prepend_bos=False) for text in ([probes] if isinstance(probes, str) else probes)
        ]
        if any(b.shape[1] < 2 for b in batches):
            raise HeadlensError("every text probe must be at least 2 tokens long")
    else:
        raise HeadlensError(
            f"probes must be a ProbeSet, a [batch, pos] token tensor, or text(s); got {type(probes).__name__}"
        )
    for b in batches:
        if b.shape[1] > MAX_PROBE_TOKENS:
            raise HeadlensError(
                f"probes are limited to {MAX_PROBE_TOKENS} tokens (got {b.shape[1]}): both models' patterns of a batch are held at once"
            )
        if int(b.min()) < 0 or int(b.max()) >= model.cfg.d_vocab:
            raise HeadlensError(f"probe token ids must lie in 0..{model.cfg.d_vocab - 1}")
    return batches


# ---------------------------------------------------------------- comparisons


def first_changed_layer(base: HookedTransformer, tuned: HookedTransformer) -> int | None:
    """The first block whose weights differ (bitwise; 0 when the embeddings or the attention settings do), None when
    no block differs. Below it both models compute the very same activations, so the tuned model can start there from
    the base model's residual stream: a LoRA of the upper half costs half a forward."""
    check_model(base, "base")
    check_model(tuned, "tuned")
    same_cfg = all(
        getattr(base.cfg, f) == getattr(tuned.cfg, f)
        for f in (
            "dtype",
            "rotary_base",
            "rotary_dim",
            "attn_scale",
            "use_attn_scale",
            "n_ctx",
            "positional_embedding_type",
        )
    )
    a, b = base.state_dict(), tuned.state_dict()
    if not same_cfg or set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in a if k.startswith("embed.")):
        return 0
    for layer in range(base.cfg.n_layers):
        prefix = f"blocks.{layer}."
        if any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix)):
            return layer
    return None


def attention_divergence(
    base: HookedTransformer,
    tuned: HookedTransformer,
    probes=None,
    *,
    n_seqs: int | None = N_SEQS,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Per head: mean Jensen-Shannon divergence (bits) between base and tuned attention over queries 1.. of ``probes``.

    Query 0 sees one key only, so it is left out. ``probes``: a :class:`headlens.data.probes.ProbeSet`
    (None = the census default probes for ``seed``, ``n_seqs`` per kind, :data:`N_SEQS`), a token tensor [batch, pos],
    or text(s); at most 256 tokens. Columns: layer, head, kv_head, jsd, jsd_max (the largest per-query divergence
    seen: it grows with the number of probes).

    Per batch the base model runs once, keeping the patterns of the layers from :func:`first_changed_layer` on and
    the residual stream entering it; the tuned model starts there (layers below have the same weights, so the same
    patterns: their divergence is 0 exactly) and each of its patterns is reduced against the base's and dropped.
    """
    check_model(base, "base")
    check_model(tuned, "tuned")
    n_seqs = None if n_seqs is None else check_count("n_seqs", n_seqs)
    check_compatible(base, tuned)
    batch_size = check_count("batch_size", batch_size)
    L, H = base.cfg.n_layers, base.cfg.n_heads
    sums = torch.zeros(L, H, dtype=torch.float64)
    peak = torch.zeros(L, H, dtype=torch.float64)
    n_queries = 0
    first = first_changed_layer(base, tuned)
    chunks = [
        b[i : i + batch_size] for b in _as_batches(base, probes, seed, n_seqs) for i in range(0, b.shape[0], batch_size)
    ]
    for chunk in tqdm(chunks, desc="compare", disable=not progress, leave=False):
        n_queries += chunk.shape[0] * (chunk.shape[1] - 1)
        if first is None:
            continue
        stored: dict[int, Tensor] = {}

        def keep(pattern: Float[Tensor, "batch head q k"], hook) -> None:
            stored[hook.layer()] = pattern  # noqa: B023

        def compare(pattern: Float[Tensor, "batch head q k"], hook) -> None:
            layer = hook.layer()
            jsd = js_divergence(stored.pop(layer), pattern)[:, :, 1:]  # noqa: B023
            sums[layer] += jsd.sum((0, 2)).cpu()
            peak[layer] = torch.maximum(peak[layer], jsd.amax((0, 2)).cpu())

        names = [utils.get_act_name("pattern", layer) for layer in range(first, L)]
        start = utils.get_act_name("resid_pre", first)
        with torch.inference_mode():
            resid = base.run_with_hooks(
                chunk.to(base.cfg.device),
                fwd_hooks=[(name, keep) for name in names]
                + [(start, lambda act, hook: stored.__setitem__("resid", act))],  # noqa: B023
                stop_at_layer=L,
            )
            del resid
            tuned.run_with_hooks(
                stored.pop("resid").to(tuned.cfg.device),
                start_at_layer=first,
                stop_at_layer=L,
                fwd_hooks=[(name, compare) for name in names],
            )
    mean = (sums / n_queries).numpy()
    kv = kv_heads(base)
    return pd.DataFrame(
        [
            {"layer": l, "head": h, "kv_head": kv[h], "jsd": mean[l, h], "jsd_max": peak[l, h].item()}
            for l in range(L)
            for h in range(H)
        ]
    )


def weight_changes(base: HookedTransformer, tuned: HookedTransformer) -> pd.DataFrame:
    """Per head: relative Frobenius norm of the change of W_Q, W_K, W_V, W_O (0 where the weights are identical).

    W_K/W_V are measured per kv head (``_W_K``/``_W_V`` under GQA) and repeated on the q heads that read them.
    """
    check_model(base, "base")
    check_model(tuned, "tuned")
    check_compatible(base, tuned)
    kv = kv_heads(base)
    rows = []
    for layer, (a, b) in enumerate(zip(base.blocks, tuned.blocks)):
        a, b = a.attn, b.attn
        dq = relative_change(a.W_Q, b.W_Q)
        do = relative_change(a.W_O, b.W_O)
        dk = relative_change(getattr(a, "_W_K", a.W_K), getattr(b, "_W_K", b.W_K))
        dv = relative_change(getattr(a, "_W_V", a.W_V), getattr(b, "_W_V", b.W_V))
        grouped = dk.shape[0] != dq.shape[0]
        for h in range(base.cfg.n_heads):
            g = kv[h] if grouped else h
            rows.append(
                {
                    "layer": layer,
                    "head": h,
                    "kv_head": kv[h],
                    "dW_Q": dq[h].item(),
                    "dW_K": dk[g].item(),
                    "dW_V": dv[g].item(),
                    "dW_O": do[h].item(),
                }
            )
    return pd.DataFrame(rows)


def census_deltas(census_base: pd.DataFrame, census_tuned: pd.DataFrame) -> pd.DataFrame:
    """Per head: tuned minus base for every census score (``d_<score>``), both labels and whether the label changed."""
    keys = ["layer", "head"]
    scores = [
        c
        for c in census_base.columns
        if c in SCORES or (c not in keys + ["kv_head", "label"] and pd.api.types.is_numeric_dtype(census_base[c]))
    ]
    merged = census_base.merge(census_tuned, on=keys, suffixes=("_base", "_tuned"))
    out = merged[keys].copy()
    for s in scores:
        out[f"d_{s}"] = merged[f"{s}_tuned"] - merged[f"{s}_base"]
    if "label" in census_base.columns:
        out["label_base"] = merged["label_base"]
        out["label_tuned"] = merged["label_tuned"]
        out["label_changed"] = merged["label_base"] != merged["label_tuned"]
    return out


def compare_models(
    base: HookedTransformer,
    tuned: HookedTransformer,
    probes=None,
    *,
    census: bool = True,
    n_seqs: int | None = N_SEQS,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Head-by-head comparison of ``base`` and ``tuned`` (same architecture, e.g. base + merged LoRA).

    Columns: layer, head, kv_head, jsd, jsd_max (attention change in bits, see :func:`attention_divergence`),
    dW_Q, dW_K, dW_V, dW_O (relative weight change, see :func:`weight_changes`), and with ``census=True``
    ``d_<score>`` for every census score plus label_base, label_tuned, label_changed. ``probes`` defaults
    to the census probes (:func:`headlens.data.probes.default_probes` with ``seed``), ``n_seqs`` per kind for the
    attention change (:data:`N_SEQS`; None: all of them); the census runs on the same ProbeSet when one is given,
    else on its full defaults.
    """
    check_model(base, "base")
    check_model(tuned, "tuned")
    n_seqs = None if n_seqs is None else check_count("n_seqs", n_seqs)
    check_compatible(base, tuned)
    df = attention_divergence(base, tuned, probes, n_seqs=n_seqs, batch_size=batch_size, seed=seed, progress=progress)
    df = df.merge(weight_changes(base, tuned), on=["layer", "head", "kv_head"])
    if census:
        census_probes = probes if isinstance(probes, ProbeSet) else None
        deltas = census_deltas(
            run_census(base, census_probes, seed=seed, progress=progress).table,
            run_census(tuned, census_probes, seed=seed, progress=progress).table,
        )
        df = df.merge(deltas, on=["layer", "head"])
    return df


def top_changed(df: pd.DataFrame, n: int = 10, by: str = "jsd") -> pd.DataFrame:
    """The ``n`` heads with the largest ``by`` (default: attention change)."""
    n = check_count("n", n, why="how many heads to keep")
    if by not in df.columns:
        raise HeadlensError(f"no column {by!r} in the comparison (columns: {', '.join(df.columns)})")
    return df.sort_values(by, ascending=False).head(n).reset_index(drop=True)

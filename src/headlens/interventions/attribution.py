"""Attribution patching: every head's patching effect from a few passes instead of one forward per head.

Plain AtP (Nanda 2023) takes ``(clean_act − corrupted_act) · ∂metric/∂act`` at the corrupted run. It linearises the
attention softmax, so it misses effects that go through a saturated pattern: an early previous-token head whose
clean output moves an induction head's attention from ~0 to ~1 has almost no gradient at the corrupted run.

AtP* (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to components")
fixes this in two ways, both here:

- **QK fix** (``method="atp*"``, the default): where a patch changes attention *scores*, recompute the softmax
  instead of linearising it, then take the pattern change times ``∂metric/∂pattern``. For a ``q``/``k`` patch
  that is the head's own pattern. For a head's output ``z``, the change reaches later heads' keys through the
  residual stream (K-composition): its direct contribution ``Δz·W_O`` is pushed through each later layer's
  (RMS-normalised, rotated) key projection and every later head's softmax is recomputed; the remaining paths
  (values, MLPs, queries) stay linear, from one backward pass in which the keys are detached so that the
  linearised key path is not counted twice.
- **GradDrop** (``grad_drop=True``): for each layer ℓ, the estimate with the gradient through layer ℓ's residual
  contribution set to zero; the estimates are combined as the paper does, ``mean_ℓ |estimate_ℓ|`` (over the
  L − 1 layers that do not hold the node), which keeps a head whose paths cancel in the full gradient from
  scoring zero. It costs one backward pass per layer, so it is off by default; the sign of the combined
  estimate is the sign of the estimate without GradDrop.

Both are still linearisations at the corrupted run. On the default Qwen's 4×61 induction pair they miss the
three heads whose effect runs through two or more saturated softmaxes in a row (``analyses/atp_paths.py``).
``method="ig"`` takes the gradient instead at ``steps`` points of the straight path from the corrupted to the
clean input embedding, ``α = 0, 1/steps, …``, and multiplies the mean by (clean − corrupted) activation:
integrated gradients, as EAP-IG does (Hanna et al. 2024, "Have Faith in Faithfulness"). Part-way along the path
the later softmaxes are not saturated, so a head that matters to the clean circuit gets a large score even when
its patch alone acts through a chain of them. The score approximates the part of the clean − corrupted change
that flows through the head, not the effect of patching it alone: use it to choose which heads to patch exactly,
and read neither its size nor its sign as the patch's. Cost: the corrupted pass runs on ``steps`` copies of the
batch.

Costs and quality on the default Qwen at 4×61 tokens are in ``benchmarks/results/atp_4x61.json``, on three
more pairs in ``benchmarks/results/atp_heldout.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import pearsonr, spearmanr
from torch import Tensor
from transformer_lens import HookedTransformer, utils

from headlens.engine.intervene import final_logits
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import kv_heads
from headlens.interventions.patching import (
    Activation,
    Metric,
    PatchingResult,
    PromptPair,
    activation_patching,
    check_head_activation,
    check_pair_tokens,
    check_recoverable,
    kv_mode,
    pair_metric,
    pair_run,
    patch_table,
)

METHODS = ("atp", "atp*", "ig")
IG_ALPHAS = (0.0, 0.25, 0.5, 0.75)
"""The IG screen's default points of the input path, picked by ``benchmarks/bench_atp.py --choose`` on the four
development pairs only, by a rule fixed before the run (``results/atp_dev_choice.json``: mean recall 0.95, the
cheapest of the grids that reach it; the former default (0, 1/2) had 0.875); its test-set recall is in
``results/atp_test.json``."""


def attribution_patching(
    model: HookedTransformer,
    pair: PromptPair,
    *,
    activations: Sequence[Activation] = ("z",),
    by_position: bool = False,
    ungroup_kv: bool = False,
    metric: Metric | None = None,
    method: str = "atp*",
    grad_drop: bool = False,
    steps: int | None = None,
    alphas: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Estimate every head's patching effect (same table as :func:`headlens.interventions.patching.activation_patching`).

    ``method="atp"`` is plain first-order attribution; ``"atp*"`` (default) recomputes the attention softmax
    for query/key patches and for the key path of head outputs (``z``, all positions). ``grad_drop`` adds
    GradDrop (see the module docstring). ``"ig"`` averages the gradient over points of the path from the corrupted
    to the clean input: ``alphas`` (each in [0, 1]), or the ``steps`` points ``0, 1/steps, ...``; with neither,
    ``IG_ALPHAS``. A screen for the heads that matter, not an estimate of each patch (see the module docstring).
    ``metric`` in the table is ``corrupted + estimate``.
    """
    check_model(model)
    if isinstance(activations, str):
        activations = [activations]
    for activation in activations:
        check_head_activation(activation)
    if len(set(activations)) != len(activations):
        raise HeadlensError(f"activations repeat one ({', '.join(activations)}): list each activation once")
    if method not in METHODS:
        raise HeadlensError(f"unknown attribution method {method!r}: choose from {', '.join(METHODS)}")
    if not activations:
        raise HeadlensError("give at least one activation to attribute")
    alphas = _path_points(method, steps, alphas, grad_drop)
    check_pair_tokens(model, pair)
    # bound to the clean tokens for both runs, as activation_patching does (a custom Metric may read its tokens)
    metric = pair_metric(metric or pair.metric, pair.clean, pair.positions, pair.name)
    star = method == "atp*"
    with kv_mode(model, ungroup_kv):
        groups = []
        # the key-path fix for z detaches keys in its backward pass, so z gets its own pass when mixed with others
        if star and "z" in activations and not by_position:
            groups.append((["z"], True))
        rest = [a for a in activations if not (groups and a == "z")]
        if rest:
            groups.append((rest, False))
        estimates: dict[str, Float[Tensor, "layer pos unit"]] = {}
        clean = corrupted = None
        for group, key_fix in groups:
            out, clean, corrupted = _estimate(
                model,
                pair,
                group,
                metric,
                star=star,
                key_fix=key_fix,
                grad_drop=grad_drop,
                by_position=by_position,
                alphas=alphas,
            )
            estimates.update(out)
        check_recoverable(clean, corrupted)
        tables = []
        for activation in activations:
            est = estimates[activation]
            rows = []
            for layer in range(est.shape[0]):
                if by_position:
                    rows += [
                        (layer, u, p, corrupted + float(est[layer, p, u]))
                        for p in range(est.shape[1])
                        for u in range(est.shape[2])
                    ]
                else:
                    rows += [(layer, u, None, corrupted + float(v)) for u, v in enumerate(est[layer].sum(0))]
            tables.append(patch_table(model, activation, rows, clean, corrupted, by_position))
    name = method + ("+graddrop" if grad_drop else "") + (_grid_name(alphas) if method == "ig" else "")
    return PatchingResult(pd.concat(tables, ignore_index=True), clean, corrupted, name)


def _path_points(method: str, steps, alphas, grad_drop: bool) -> list[float]:
    """The points of the input path where the gradient is taken: [0] for AtP/AtP*, the IG grid otherwise."""
    if method != "ig":
        if steps is not None or alphas is not None:
            raise HeadlensError(
                f"steps and alphas are for method='ig' only; {method!r} takes its gradient at the corrupted run alone"
            )
        return [0.0]
    if grad_drop:
        raise HeadlensError("grad_drop goes with method='atp' or 'atp*', not 'ig'")
    if steps is not None and alphas is not None:
        raise HeadlensError("give steps (the grid 0, 1/steps, ...) or alphas (the points themselves), not both")
    if alphas is not None:
        points = [float(a) for a in alphas] if isinstance(alphas, Sequence) and not isinstance(alphas, str) else []
        if not points or not all(0.0 <= a <= 1.0 for a in points) or len(set(points)) != len(points):
            raise HeadlensError(f"alphas must be distinct numbers in [0, 1] (points of the input path), got {alphas!r}")
        return points
    if steps is None:
        return list(IG_ALPHAS)
    steps = check_count("steps", steps, why="gradients along the input path")
    return [k / steps for k in range(steps)]


def _grid_name(alphas: Sequence[float]) -> str:
    """``ig2`` for the grid 0, 1/2 (``steps=2``); the points themselves otherwise (``ig[0.25,0.75]``)."""
    n = len(alphas)
    if list(alphas) == [k / n for k in range(n)]:
        return str(n)
    return "[" + ",".join(f"{a:g}" for a in alphas) + "]"


# ---------------------------------------------------------------- passes


class _GradGate(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``gate[layer]`` (0 drops it: GradDrop)."""

    @staticmethod
    def forward(ctx, x, gate, layer):
        ctx.gate, ctx.layer = gate, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.gate[ctx.layer], None, None


def _estimate(
    model,
    pair: PromptPair,
    activations,
    metric,
    *,
    star: bool,
    key_fix: bool,
    grad_drop: bool,
    by_position: bool,
    alphas: Sequence[float] = (0.0,),
):
    """One clean pass, one corrupted pass with gradients (and, with GradDrop, one backward per layer). With
    ``alphas`` beyond 0 the corrupted pass holds one copy of the batch per point of the input path (integrated
    gradients); the gradients are averaged over them. The corrupted run itself (alpha 0) is always the first copy:
    a grid without 0 gets it as an extra copy that the average leaves out.

    Returns per activation a ``[layer, pos, unit]`` tensor of estimated metric changes, and both metrics.
    """
    L = model.cfg.n_layers
    names = {utils.get_act_name(a, layer): (a, layer) for a in activations for layer in range(L)}
    need_qk = star and any(a in ("q", "k") for a in activations)
    clean_names = set(names) | (
        {_qk_name(model, a, layer) for a in ("q", "k") for layer in range(L)} if need_qk else set()
    )
    used = [a != 0.0 or 0.0 in alphas for a in [0.0, *(a for a in alphas if a != 0.0)]]
    alphas = [0.0, *(a for a in alphas if a != 0.0)]  # alpha 0 first: the corrupted run's activations and metric
    if len(alphas) > 1:
        clean_names.add("hook_embed")
    with torch.inference_mode():
        clean, clean_cache = pair_run(model, pair.clean, clean_names, pair.positions, metric)

    saved: dict[str, Tensor] = {}  # activations in the graph (their gradients are taken)
    stash: dict[str, Tensor] = {}  # detached copies: scores, q/k, norm scales
    gate = torch.ones(L)

    def keep(act, hook):
        saved[hook.name] = act
        return act

    def keep_detached(act, hook):
        stash[hook.name] = act.detach()
        return act

    def detach_keys(act, hook):
        stash[hook.name] = act.detach()
        return act.detach()

    n_seqs, steps = pair.corrupted.shape[0], len(alphas)
    weights = torch.tensor(alphas).repeat_interleave(n_seqs)[:, None, None]

    def track(act, hook):
        if steps > 1:  # integrated gradients: row block k is the input moved alphas[k] of the way to the clean one
            clean_embed = clean_cache["hook_embed"].repeat(steps, 1, 1)
            return torch.lerp(act.detach(), clean_embed, weights.to(act)).requires_grad_(True)
        return act if act.requires_grad else act.detach().requires_grad_(True)

    def gated(act, hook):
        return _GradGate.apply(act, gate, hook.layer())

    hooks = [("hook_embed", track), *((n, keep) for n in names)]
    if star:
        hooks += [
            (utils.get_act_name("pattern", layer), keep)
            for layer in range(L)
            if utils.get_act_name("pattern", layer) not in names
        ]
        hooks += [(utils.get_act_name("attn_scores", layer), keep_detached) for layer in range(L)]
        hooks += [(_qk_name(model, "q", layer), keep_detached) for layer in range(L)]
        hooks += [(_qk_name(model, "k", layer), detach_keys if key_fix else keep_detached) for layer in range(L)]
        if model.cfg.normalization_type is not None:
            hooks += [(f"blocks.{layer}.ln1.hook_scale", keep_detached) for layer in range(L)]
    if grad_drop:
        hooks += [(f"blocks.{layer}.hook_{part}_out", gated) for layer in range(L) for part in ("attn", "mlp")]

    patterns = [utils.get_act_name("pattern", layer) for layer in range(L)] if star else []
    with torch.inference_mode(False), torch.enable_grad():
        logits = final_logits(model, pair.corrupted.repeat(steps, 1), pair.positions, fwd_hooks=hooks)
        values = [metric(logits[k * n_seqs : (k + 1) * n_seqs]) for k in range(steps)]
        value = values[0]
        order = list(names) + [p for p in patterns if p not in names]
        grads = _grads(sum(v for v, u in zip(values, used) if u), [saved[n] for n in order], retain=grad_drop)
        grad = {n: g.view(steps, n_seqs, *g.shape[1:])[torch.tensor(used)].mean(0) for n, g in zip(order, grads)}
        drop_grads = []
        if grad_drop:
            for layer in range(L):
                gate.fill_(1.0)
                gate[layer] = 0.0
                drop_grads.append(dict(zip(order, _grads(value, [saved[n] for n in order], retain=layer < L - 1))))
            gate.fill_(1.0)
    saved.update({n: saved[n][:n_seqs] for n in order})  # the corrupted run's own activations
    corrupted = float(value.detach())

    out = {}
    for activation in activations:
        layer_names = [utils.get_act_name(activation, layer) for layer in range(L)]

        def linear(grads_by_name, layer_names=layer_names, activation=activation):
            return torch.stack(
                [_product(activation, clean_cache[n], saved[n].detach(), grads_by_name[n]) for n in layer_names]
            )

        base = linear(grad)
        fix = torch.zeros_like(base)
        if star and activation in ("q", "k"):
            # q/k reach the output only through their head's pattern: the recomputed softmax replaces the linear term
            base, fix = (
                torch.zeros_like(base),
                _own_softmax_fix(model, activation, clean_cache, saved, stash, grad, base.shape, by_position),
            )
        if star and activation == "z" and key_fix:
            fix = _key_path_fix(model, clean_cache, saved, stash, grad, base.shape)
        estimate = base + fix
        if grad_drop:
            estimate = _grad_drop_combine(estimate, [linear(g) + fix for g in drop_grads], by_position)
        out[activation] = estimate
    return out, clean, corrupted


def _grads(value: Tensor, tensors: list[Tensor], *, retain: bool) -> list[Tensor]:
    grads = torch.autograd.grad(value, tensors, allow_unused=True, retain_graph=retain)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def _product(activation: str, clean: Tensor, corrupted: Tensor, grad: Tensor) -> Float[Tensor, "pos unit"]:
    """Per (position, head) sum over the batch and head dims of (clean − corrupted) × gradient; pattern: position = query."""
    product = (clean - corrupted) * grad
    if activation == "pattern":
        return einops.reduce(product, "b head dest src -> dest head", "sum")
    return einops.reduce(product, "b pos head d -> pos head", "sum")


def _grad_drop_combine(full: Tensor, dropped: list[Tensor], by_position: bool) -> Tensor:
    """GradDrop (Kramár et al. 2024): mean over the L − 1 dropped-layer estimates of their magnitude, signed like ``full``.

    Per head (summed over positions, placed at position 0) unless ``by_position``, where each (head, position) is
    combined on its own.
    """
    L = full.shape[0]
    if not by_position:
        full = _at_first(full.sum(1, keepdim=True), full.shape)
        dropped = [_at_first(d.sum(1, keepdim=True), d.shape) for d in dropped]
    magnitude = torch.stack(dropped).abs().sum(0) / max(L - 1, 1)
    return torch.where(full < 0, -magnitude, magnitude)


def _at_first(per_head: Tensor, shape) -> Tensor:
    out = torch.zeros(shape)
    out[:, :1] = per_head
    return out


def _qk_name(model, which: str, layer: int) -> str:
    """The hook holding the q/k that meet in the attention scores (after rotary when the model has it)."""
    rotary = model.cfg.positional_embedding_type == "rotary"
    return utils.get_act_name(f"rot_{which}" if rotary else which, layer)


def _causal(n_q: int, n_k: int, device) -> Tensor:
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)


def _kv_index(model, n_k: int) -> Tensor:
    """For each q head, the index of its key head in a ``rot_k`` tensor with ``n_k`` heads."""
    return torch.arange(model.cfg.n_heads) if n_k == model.cfg.n_heads else torch.tensor(kv_heads(model))


def _softmax_change(new_scores: Tensor, pattern: Tensor) -> Tensor:
    """Exact pattern change from recomputed (masked) scores; ``pattern`` is the corrupted run's."""
    new = torch.softmax(new_scores, dim=-1)
    return torch.nan_to_num(new) - pattern


def _own_softmax_fix(
    model, activation: str, clean_cache, saved, stash, grad, shape, by_position: bool
) -> Float[Tensor, "layer pos unit"]:
    """Patch a head's q (or a kv head's k) with its clean value and recompute that layer's softmax exactly.

    For q, the query row (exact per position: a row depends on its own query only). For k, all key positions
    at once (at position 0), or with ``by_position`` one key position at a time (one softmax each).
    """
    L, n_pos, n_units = shape
    result = torch.zeros(shape)
    for layer in range(L):
        attn = model.blocks[layer].attn
        q = stash[_qk_name(model, "q", layer)]
        k = stash[_qk_name(model, "k", layer)]
        pattern = saved[utils.get_act_name("pattern", layer)].detach()
        g = grad[utils.get_act_name("pattern", layer)]
        scores = stash[utils.get_act_name("attn_scores", layer)]
        idx = _kv_index(model, k.shape[2])
        mask = _causal(q.shape[1], k.shape[1], q.device)
        k_q = k[:, :, idx]  # [b, pos, head, d]
        if activation == "q":
            q_clean = clean_cache[_qk_name(model, "q", layer)]
            new = einops.einsum(q_clean, k_q, "b q h d, b k h d -> b h q k") / attn.attn_scale
            change = (_softmax_change(new.masked_fill(~mask, float("-inf")), pattern) * g).sum(-1)  # [b, h, q]
            result[layer] = einops.reduce(change, "b h q -> q h", "sum")
            continue
        k_clean = clean_cache[_qk_name(model, "k", layer)][:, :, idx]
        delta = einops.einsum(q, k_clean - k_q, "b q h d, b k h d -> b h q k") / attn.attn_scale  # score change per key
        keys = [[p] for p in range(n_pos)] if by_position else [list(range(n_pos))]
        per_head = torch.zeros(n_pos, model.cfg.n_heads)
        for p, chosen in enumerate(keys):
            new = scores.clone()
            new[..., chosen] = new[..., chosen] + delta[..., chosen]
            per_head[p] = einops.reduce(
                _softmax_change(new.masked_fill(~mask, float("-inf")), pattern) * g, "b h q k -> h", "sum"
            )
        if k.shape[2] == model.cfg.n_heads:
            result[layer] = per_head
        else:  # a kv head's k: the q heads that read it, summed
            result[layer] = einops.reduce(per_head, "pos (g r) -> pos g", "sum", g=k.shape[2])[:, :n_units]
    return result


def _key_path_fix(model, clean_cache, saved, stash, grad, shape, *, chunk: int = 8) -> Float[Tensor, "layer pos unit"]:
    """Effect of each head's output change on every later head's pattern through its keys, softmax recomputed.

    ``Δk = RMSNorm-linearised(Δz · W_O) · W_K`` (rotated), ``Δscores = q · Δk / √d``, pattern change exact, times
    ``∂metric/∂pattern``. Reported at position 0 of the ``[layer, pos, unit]`` layout (not per position).
    """
    L, n_pos, n_heads = shape
    result = torch.zeros(shape)
    dz = [
        (clean_cache[utils.get_act_name("z", layer)] - saved[utils.get_act_name("z", layer)].detach()).float()
        for layer in range(L)
    ]
    norm = model.cfg.normalization_type
    W_O = model.W_O.detach().float()  # in float32 whatever the model's dtype; [layer, head, d_head, d_model]
    if norm in ("LN", "LNPre"):  # layer norm centres its input: centre the written directions (linear)
        W_O = W_O - W_O.mean(-1, keepdim=True)
    rotary = model.cfg.positional_embedding_type == "rotary"
    for target in range(1, L):
        attn = model.blocks[target].attn
        W_K = attn._W_K if hasattr(attn, "_W_K") and not model.cfg.ungroup_grouped_query_attention else attn.W_K
        W_K = W_K.detach().float()  # [kv, d_model, d_head]
        if norm in ("LN", "RMS"):  # an unfolded norm weight scales the input of W_K
            W_K = W_K * model.blocks[target].ln1.w.detach().float()[None, :, None]
        q = stash[_qk_name(model, "q", target)].float()  # [b, pos, head, d]
        scores = stash[utils.get_act_name("attn_scores", target)].float()  # [b, head, q, k], masked
        pattern = saved[utils.get_act_name("pattern", target)].detach().float()
        g = grad[utils.get_act_name("pattern", target)].float()
        scale = (
            stash[f"blocks.{target}.ln1.hook_scale"].float() if norm is not None else torch.ones(q.shape[:2] + (1,))
        )  # [b, pos, 1]
        idx = _kv_index(model, W_K.shape[0])
        for source in range(target):
            W_OK = einops.einsum(W_O[source], W_K, "h d m, g m e -> h d g e")
            dk = einops.einsum(dz[source], W_OK, "b p h d, h d g e -> h b p g e") / scale[None, :, :, :, None]
            if rotary:
                dk = attn.apply_rotary(dk.flatten(0, 1)).view(dk.shape)
            dk = dk[..., idx, :]  # [h_src, b, pos, head, d]
            for start in range(0, n_heads, chunk):
                part = dk[start : start + chunk]
                dscores = einops.einsum(q, part, "b q h e, s b k h e -> s b h q k") / attn.attn_scale
                change = _softmax_change(scores[None] + dscores, pattern[None])
                result[source, 0, start : start + chunk] += einops.reduce(change * g[None], "s b h q k -> s", "sum")
    return result


# ---------------------------------------------------------------- quality of an estimate


def estimate_quality(exact: Sequence[float], estimate: Sequence[float], *, top_k: int = 10) -> dict:
    """How well ``estimate`` finds the heads that matter by exact patching.

    ``recall_top{k}_in_{2k}`` (k = ``top_k``): share of the exact top-k by |effect| that are in the estimate's top-2k
    by |estimate| (what a first pass that verifies its top 2k would catch); ``pearson``/``spearman`` over all units
    and over the exact top-2k (``*_top``). Rank correlations hide a head whose estimate is ~0: read them together.
    """
    exact = np.asarray(list(exact), dtype=float)
    estimate = np.asarray(list(estimate), dtype=float)
    if len(exact) != len(estimate) or len(exact) < 3:
        raise HeadlensError("estimate_quality needs two equally long lists of at least 3 effects")
    k = min(check_count("top_k", top_k, why="how many top effects to recall"), len(exact))
    top_exact = set(np.argsort(-np.abs(exact), kind="stable")[:k])
    top_est = set(np.argsort(-np.abs(estimate), kind="stable")[: 2 * k])
    top = np.argsort(-np.abs(exact), kind="stable")[: min(2 * k, len(exact))]

    def corr(fn, a, b):
        return float(fn(a, b).statistic) if np.std(a) > 0 and np.std(b) > 0 else math.nan

    return {
        f"recall_top{k}_in_{2 * k}": len(top_exact & top_est) / k,
        "missed": sorted(int(i) for i in top_exact - top_est),
        "pearson": corr(pearsonr, exact, estimate),
        "spearman": corr(spearmanr, exact, estimate),
        "pearson_top": corr(pearsonr, exact[top], estimate[top]),
        "spearman_top": corr(spearmanr, exact[top], estimate[top]),
    }


def quality_summary(exact: Sequence[float], estimate: Sequence[float], *, top_k: int = 20) -> dict:
    """What :func:`compare_patching` reports beside Spearman: ``pearson``, ``pearson_top`` (over the ``top_k`` largest
    |exact|) and ``recall`` (share of the exact top-``top_k/2`` within the estimate's top-``top_k``)."""
    top_k = check_count("top_k", top_k, minimum=2, why="recall is over the exact top top_k // 2")
    quality = estimate_quality(exact, estimate, top_k=top_k // 2)
    recall = next(v for key, v in quality.items() if key.startswith("recall_"))
    return {
        "pearson": quality["pearson"],
        "pearson_top": quality["pearson_top"],
        "recall": recall,
        "recall_k": top_k // 2,
    }


# ---------------------------------------------------------------- comparison


def rank_correlation(
    exact: pd.Series | Sequence[float], estimate: pd.Series | Sequence[float], *, top_k: int | None = None
) -> float:
    """Spearman rank correlation of two effect lists; with ``top_k``, over the ``top_k`` largest |exact| only."""
    exact = pd.Series(list(exact), dtype=float)
    estimate = pd.Series(list(estimate), dtype=float)
    if top_k is not None:
        keep = exact.abs().sort_values(ascending=False).index[: check_count("top_k", top_k, minimum=2)]
        exact, estimate = exact[keep], estimate[keep]
    if len(exact) < 2:
        raise HeadlensError("a rank correlation needs at least two heads")
    return float(spearmanr(exact, estimate).statistic)


@dataclass
class PatchingComparison:
    """What :func:`compare_patching` returns.

    - ``table``: ``activation, layer, head, kv_head, [pos], exact, attribution``, largest |exact| first;
    - ``clean``, ``corrupted``: the metric on the two runs;
    - ``quality``: :func:`estimate_quality` of the attribution against exact (Spearman over all rows and over the
      ``top_k`` rows, Pearson, top-k recall);
    - ``exact_seconds``, ``attribution_seconds``: both methods' wall times.
    """

    table: pd.DataFrame
    clean: float
    corrupted: float
    top_k: int
    quality: dict
    exact_seconds: float
    attribution_seconds: float


def compare_patching(
    model: HookedTransformer,
    pair: PromptPair,
    *,
    activation: Activation = "z",
    by_position: bool = False,
    ungroup_kv: bool = False,
    metric: Metric | None = None,
    top_k: int = 20,
    runs_per_pass: int = 32,
    progress: bool = True,
) -> PatchingComparison:
    """Exact and attribution patching side by side (see :class:`PatchingComparison`)."""
    check_model(model)
    top_k = check_count("top_k", top_k, minimum=2, why="a rank correlation over the top_k largest effects")
    runs_per_pass = check_count("runs_per_pass", runs_per_pass)
    start = time.perf_counter()
    exact = activation_patching(
        model,
        pair,
        activation=activation,
        by_position=by_position,
        ungroup_kv=ungroup_kv,
        metric=metric,
        runs_per_pass=runs_per_pass,
        progress=progress,
    )
    middle = time.perf_counter()
    attr = attribution_patching(
        model, pair, activations=[activation], by_position=by_position, ungroup_kv=ungroup_kv, metric=metric
    )
    end = time.perf_counter()
    exact_t, attr_t = exact.table, attr.table
    keys = [c for c in ("layer", "kv_head", "pos") if c in exact_t]
    assert exact_t[keys].equals(attr_t[keys]) and exact_t["head"].equals(attr_t["head"])
    df = exact_t.drop(columns="metric").rename(columns={"effect": "exact"})
    df["attribution"] = attr_t["effect"].to_numpy()
    df = df.reindex(df["exact"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    quality = {
        "spearman": rank_correlation(df["exact"], df["attribution"]),
        "spearman_top": rank_correlation(df["exact"], df["attribution"], top_k=top_k),
        **quality_summary(df["exact"], df["attribution"], top_k=top_k),
    }
    return PatchingComparison(df, exact.clean, exact.corrupted, top_k, quality, middle - start, end - middle)

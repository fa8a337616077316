"""One intervention engine: ablation, activation patching and pruning evaluations are all "replace some
activation of a base run by a source value, and read a metric".

An intervention is a tuple of :class:`Site` (activation, layer, units, position). A *source* gives, for a hook
name, the replacement activation for the whole base batch: a clean run's cache (activation patching), zeros,
means or resampled values (ablation). :func:`run_interventions` then

1. takes the base run's ``resid_pre`` of every layer (cached once by :func:`cached_run`),
2. groups interventions by the first layer they touch and restarts there (``start_at_layer``),
3. stacks ``k`` interventions along the batch axis of one forward; a hook on each touched activation swaps in the
   source where the intervention's mask is set (``torch.where`` on a ``(k, batch, ...)`` view),
4. unembeds only the positions the metric reads (:func:`unembed_at`), at most :data:`LOGITS_BUDGET` floats at
   once (a forward's runs are unembedded in as many pieces as that takes), and returns one metric value per
   intervention.

Activation layouts (TransformerLens hook names via ``get_act_name``): ``z, q, k, v, result`` are
``batch pos head d``; ``pattern, attn_scores`` are ``batch head dest src`` (``pos`` = destination);
``resid_pre, resid_mid, resid_post, attn_out, mlp_out`` are ``batch pos d_model`` (no units).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from headlens.data.probes import check_token_ids
from headlens.errors import HeadlensError, check_count, check_model
from headlens.progress import tqdm

LOGITS_BUDGET = 2**26
"""Most logits (floats) held at once; a stacked forward's runs are unembedded in pieces of at most this many."""
TOKENS_BUDGET = 8192
"""Most tokens (runs x batch x positions) one stacked forward carries: bounds its activations. CPU matrix products
run about 15 % faster at 768 rows and more than at 256 (one run of 2 x 128 tokens), so short runs are stacked."""
HEAD_ACTS = ("z", "q", "k", "v", "result")
PATTERN_ACTS = ("pattern", "attn_scores")
STREAM_ACTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
MetricFn = Callable[[Float[Tensor, "batch n_pos d_vocab"], Int[Tensor, "batch pos"]], Tensor]


# ---------------------------------------------------------------- the metric


@dataclass(frozen=True)
class Metric:
    """A scalar of the logits at ``positions`` (all when None) of fixed ``tokens``; positions are distinct, and a
    negative one (-1: the last) is stored as the position it names.

    ``metric(logits)`` takes the logits AT ``positions`` (``batch n_pos d_vocab``, what the engine unembeds) and
    returns ``fn(logits, tokens)``; :meth:`full` takes full-length logits. ``higher_is_better`` says which way
    "worse" points (loss: False; log-prob, logit difference: True).
    """

    name: str
    tokens: Int[Tensor, "batch pos"]
    fn: MetricFn
    higher_is_better: bool = False
    positions: Int[Tensor, " n_pos"] | None = None

    def __post_init__(self):
        p, n_pos = self.positions, self.tokens.shape[-1]
        if p is None:
            return
        if not isinstance(p, Tensor) or p.ndim != 1 or not len(p) or p.is_floating_point() or p.dtype == torch.bool:
            raise HeadlensError(f"metric positions must be a non-empty 1-d tensor of integer positions, got {p!r}")
        if int(p.max()) >= n_pos or int(p.min()) < -n_pos:
            raise HeadlensError(f"metric positions {p.tolist()} are outside the {n_pos} token positions")
        p = p % n_pos  # -1 is the last position: kept as n_pos - 1, so readers may compare and add to positions
        if len(p.unique()) != len(p):
            raise HeadlensError(
                f"metric positions {self.positions.tolist()} name a position twice (of {n_pos}): the metric would "
                "weigh it twice; list each position once"
            )
        object.__setattr__(self, "positions", p)

    def __repr__(self) -> str:  # the shape of the tokens, not the tokens (a REPL would print thousands of ids)
        where = "all positions" if self.positions is None else f"{len(self.positions)} positions"
        better = "higher" if self.higher_is_better else "lower"
        return f"Metric({self.name!r}, tokens {tuple(self.tokens.shape)}, {where}, {better} is better)"

    def __call__(self, logits: Float[Tensor, "batch n_pos d_vocab"]) -> Tensor:  # a scalar; value() checks
        return self.fn(_at_least_float32(logits), self.tokens.to(logits.device))

    def full(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        """The metric on full-length logits (what ``model(tokens)`` and TransformerLens' patching pass)."""
        return self(logits if self.positions is None else logits[:, self.positions.to(logits.device)])

    def worsening(self, value: float, clean: float) -> float:
        """Relative change towards "worse" (positive = worse), e.g. 0.01 = 1 % higher loss."""
        change = (clean - value) if self.higher_is_better else (value - clean)
        return change / max(abs(clean), 1e-12)

    def at(self, tokens: Int[Tensor, "batch pos"]) -> Metric:
        """The same metric on other tokens."""
        return Metric(self.name, tokens, self.fn, self.higher_is_better, self.positions)


def check_distinct_answers(correct: Int[Tensor, "..."], wrong: Int[Tensor, "..."], texts: Sequence[str]) -> None:
    """Refuse a logit difference of a token with itself (0 whatever the model does): ``texts[i]`` names prompt i's
    correct answer. One rule for every command that takes a correct and a wrong answer (ablate, prune, patch)."""
    same = (correct.reshape(-1) == wrong.reshape(-1)).nonzero()
    if len(same):
        i = int(same[0])
        raise HeadlensError(
            f"the correct and the wrong answer are the same token {texts[i]!r}"
            + (f" (prompt {i})" if len(correct.reshape(-1)) > 1 else "")
            + ": their logit difference is 0 whatever the model does; give two different tokens"
        )


def _at_least_float32(logits: Tensor) -> Tensor:
    """Metrics in float32 at least, whatever the model's dtype (float64 stays float64)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def value(x: Tensor) -> float:
    """A metric's scalar as a float; a clear error for anything else."""
    if not isinstance(x, Tensor) or x.numel() != 1:
        raise HeadlensError("a metric must return a scalar tensor")
    return float(x.detach())


# ---------------------------------------------------------------- sites and sources


class Site(NamedTuple):
    """Where an intervention writes: ``activation`` of ``layer``, head/kv-head ``units`` (None: all) at ``pos``
    (None: all positions; for patterns the destination position)."""

    activation: str
    layer: int
    units: tuple[int, ...] | None = None
    pos: int | None = None

    @property
    def name(self) -> str:
        return get_act_name(self.activation, self.layer)


Intervention = tuple[Site, ...]
Source = Callable[[str], Tensor]
"""hook name -> the replacement activation for the whole base batch (same shape as the activation)."""


def check_activation(activation: str, allowed: Sequence[str] = HEAD_ACTS + PATTERN_ACTS + STREAM_ACTS) -> None:
    if activation not in allowed:
        raise HeadlensError(f"unknown activation {activation!r}: choose one of {', '.join(allowed)}")


def site_mask(runs: Sequence[Intervention], name: str, source: Tensor) -> Bool[Tensor, "k 1 ..."]:
    """One boolean mask per run, broadcastable against the ``(k, batch, ...)`` view of activation ``name``."""
    activation = next(s.activation for sites in runs for s in sites if s.name == name)
    if activation in PATTERN_ACTS:
        n_units, n_pos = source.shape[1], source.shape[2]
    elif activation in STREAM_ACTS:
        n_units, n_pos = 1, source.shape[1]
    else:
        n_units, n_pos = source.shape[2], source.shape[1]
    mask = torch.zeros(len(runs), n_pos, n_units, dtype=torch.bool)
    for i, sites in enumerate(runs):
        for site in sites:
            if site.name == name:
                pos = slice(None) if site.pos is None else site.pos
                mask[i, pos, slice(None) if site.units is None else list(site.units)] = True
    if activation in PATTERN_ACTS:
        return einops.rearrange(mask, "k pos unit -> k 1 unit pos 1")
    if activation in STREAM_ACTS:
        return einops.rearrange(mask, "k pos 1 -> k 1 pos 1")
    return einops.rearrange(mask, "k pos unit -> k 1 pos unit 1")


def swap_hook(mask: Bool[Tensor, "k 1 ..."], source: Tensor):
    """A hook that, in the i-th batch copy, replaces the activation by ``source`` where ``mask[i]`` is set."""

    def hook(act: Tensor, hook) -> Tensor:
        act = act.view(mask.shape[0], -1, *act.shape[1:])
        return torch.where(mask.to(act.device), source[None].to(act.dtype), act).flatten(0, 1)

    return hook


# ---------------------------------------------------------------- running pieces of the model


def unembed_at(
    model: HookedTransformer, resid: Float[Tensor, "batch pos d_model"], positions: Int[Tensor, " n_pos"] | None
) -> Float[Tensor, "batch n_pos d_vocab"]:
    """Final norm and unembedding of the residual stream at ``positions`` only (all when None).

    Multiplies by ``W_U`` directly: TransformerLens' ``Unembed.forward`` copies ``W_U.T`` to contiguous memory on
    every call (545 MB for Qwen's vocabulary, most of a short forward's time on CPU).
    """
    check_model(model)
    if positions is not None:
        resid = resid[:, positions.to(resid.device)]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits = resid @ model.unembed.W_U
    if model.unembed.b_U.any():  # most models have none: adding zeros is a pass over every logit
        logits = logits + model.unembed.b_U
    cap = model.cfg.output_logits_soft_cap
    logits = _at_least_float32(logits)
    return cap * torch.tanh(logits / cap) if cap and cap > 0 else logits


def final_logits(
    model: HookedTransformer,
    tokens_or_resid: Tensor,
    positions: Int[Tensor, " n_pos"] | None,
    *,
    start_at_layer: int | None = None,
    fwd_hooks=(),
) -> Float[Tensor, "batch n_pos d_vocab"]:
    """Logits at ``positions`` only: the blocks (from ``start_at_layer``), then :func:`unembed_at`."""
    check_model(model)
    resid = model.run_with_hooks(
        tokens_or_resid, start_at_layer=start_at_layer, stop_at_layer=model.cfg.n_layers, fwd_hooks=list(fwd_hooks)
    )
    return unembed_at(model, resid, positions)


def cached_run(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], names: set[str], metric: Metric
) -> tuple[float, dict[str, Tensor]]:
    """One forward: the metric and a cache of just the hooks in ``names``."""
    check_model(model)
    check_token_ids(model, tokens)
    resid, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=model.cfg.n_layers)
    return value(metric(unembed_at(model, resid, metric.positions))), dict(cache.items())


def resid_names(layers) -> set[str]:
    return {get_act_name("resid_pre", layer) for layer in layers}


def embed(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    """``resid_pre`` of layer 0 (embeddings), without running a block."""
    check_model(model)
    return model.input_to_embed(check_token_ids(model, tokens))[0]


# ---------------------------------------------------------------- the driver


def run_interventions(
    model: HookedTransformer,
    resid: Callable[[int], Float[Tensor, "batch pos d_model"]] | dict[str, Tensor],
    interventions: Sequence[Intervention],
    source: Source,
    metric: Metric,
    *,
    runs_per_pass: int = 32,
    start_layer: int | None = None,
    progress: bool = True,
    desc: str = "interventions",
) -> list[float]:
    """The metric after each intervention: restart at its first layer from the base run's ``resid``
    (``resid_pre`` by layer, or a cache holding ``blocks.{l}.hook_resid_pre``), ``runs_per_pass`` stacked per
    forward (fewer where :data:`TOKENS_BUDGET` says so); ``start_layer`` forces one restart layer for all."""
    check_model(model)
    runs_per_pass = check_count("runs_per_pass", runs_per_pass)
    if isinstance(resid, dict):
        cache = resid
        resid = lambda layer: cache[get_act_name("resid_pre", layer)]  # noqa: E731
    if not interventions:
        return []
    start = [min(s.layer for s in sites) if start_layer is None else start_layer for sites in interventions]
    order = sorted(range(len(interventions)), key=lambda i: start[i])
    first = resid(start[order[0]])
    n_pos = first.shape[1] if metric.positions is None else len(metric.positions)
    k_max = max(1, min(int(runs_per_pass), TOKENS_BUDGET // (first.shape[0] * first.shape[1])))
    piece = max(1, LOGITS_BUDGET // (first.shape[0] * n_pos * model.cfg.d_vocab_out))  # runs unembedded at once
    jobs: list[list[int]] = []
    for i in order:
        if jobs and start[jobs[-1][0]] == start[i] and len(jobs[-1]) < k_max:
            jobs[-1].append(i)
        else:
            jobs.append([i])
    out: list[float] = [float("nan")] * len(interventions)
    bar = tqdm(total=len(interventions), desc=desc, disable=not progress, leave=False)
    for job in jobs:
        layer = start[job[0]]
        runs = [interventions[i] for i in job]
        base = resid(layer)
        hooks = []
        for name in dict.fromkeys(s.name for sites in runs for s in sites):
            src = source(name)
            hooks.append((name, swap_hook(site_mask(runs, name, src), src)))
        x = einops.repeat(base, "b p d -> (k b) p d", k=len(runs))
        x = model.run_with_hooks(x, start_at_layer=layer, stop_at_layer=model.cfg.n_layers, fwd_hooks=hooks)
        for lo in range(0, len(job), piece):
            rows = slice(lo * base.shape[0], min(lo + piece, len(job)) * base.shape[0])
            logits = unembed_at(model, x[rows], metric.positions)
            for j, chunk in enumerate(logits.split(base.shape[0])):
                out[job[lo + j]] = value(metric(chunk))
            del logits
        del x
        bar.update(len(job))
    bar.close()
    return out

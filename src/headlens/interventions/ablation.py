"""Which heads matter: zero / mean / resample ablation of attention heads, fast exact single-head sweeps,
and gradient head importance (Michel et al. 2019).

What "ablating head (l, h)" means: its ``blocks.{l}.attn.hook_z`` slice (the head's attention-weighted
values, before ``W_O``) is replaced by

- ``"zero"``: 0 — the head writes nothing (the layer's shared output bias ``b_O`` stays);
- ``"mean"``: that head's z averaged over every sequence and position of the ``reference`` tokens
  (one ``d_head`` vector, position-independent);
- ``"resample"``: the head's z on a *different* reference sequence at the same position. Rows are
  matched by a seeded random cyclic permutation σ of the reference rows (sequence b takes row
  σ(b mod R)), so when the reference is the batch itself no sequence ever receives its own
  activations. The reference needs ≥ 2 sequences and at least as many positions as the batch.

Replacement values always come from a clean (un-ablated) forward over ``reference``, which defaults
to the metric's own tokens.

What "ablating a kv group" means (GQA: one kv head feeds several q heads): ablate ``hook_z`` of
every q head that reads that kv head (``kv_group_heads``), i.e. remove the group's whole output.
For zero ablation this is exactly zeroing the shared ``hook_v`` (z = pattern @ v); for mean /
resample it is *not* the same as mean-ablating v (that would give every q head of the group the
same vector), and we keep the per-q-head definition so the group effect is comparable with the
sum of its heads' effects.

Metrics are :class:`Metric` objects (tokens + ``fn(logits, tokens) -> scalar``): next-token loss on
natural text (:func:`loss_metric`), loss on the repeated half of random tokens
(:func:`repeat_loss_metric`, in-context copying), logit difference on prompts
(:func:`logit_diff_metric`), or your own (:func:`custom_metric`).

:func:`ablation_sweep` ablates each head (or kv group) alone. ``strategy="naive"`` runs one full
forward per unit; ``strategy="fast"`` caches only ``resid_pre`` of each layer once, restarts at the
unit's layer with ``start_at_layer`` and stacks several ablations along the batch: same numbers
(≤ 1e-4), a fraction of the work (see ``benchmarks/bench_ablation.py``).

:func:`head_importance` is Michel et al.'s gate gradient: z ← ξ·z + (1 − ξ)·replacement with ξ = 1,
one forward + backward. For zero ablation that is their gate on the head output; ``-gradient`` is
the first-order estimate of the ablation effect.

One-liner for "ablating the induction heads raises the repeated-half loss more than ablating as many
random heads"::

    from headlens.interventions.ablation import compare_to_random, repeat_loss_metric
    result = compare_to_random(model, repeat_loss_metric(model), induction_heads, n_random=20, seed=0)
    result.z, result.p_random_ge  # z-score of the targeted effect among the random draws; share as bad

(``repeat_loss_metric(model, probe=probes.repeated)`` scores the census's own repeated-token probe;
``match_layers=True`` draws the random heads from the same layers, a depth-matched control.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name, lm_cross_entropy_loss

from headlens.data.probes import TOKEN_DTYPES, check_token_ids, corpus_text, repeated_tokens
from headlens.engine.executor import Executor, map_layers
from headlens.engine.intervene import (
    Intervention,
    Metric,
    MetricFn,
    Site,
    Source,
    cached_run,
    check_distinct_answers,
    embed,
    resid_names,
    run_interventions,
    value,
)
from headlens.errors import HeadlensError, check_count, check_model, non_defaults
from headlens.heads import (
    Head,  # noqa: F401 (re-exported: headlens.interventions.ablation.Head)
    HeadLike,
    check_heads,
    check_layers,
    format_heads,
    kv_group_heads,
    kv_heads,
    random_heads,
)
from headlens.progress import tqdm

Method = Literal["zero", "mean", "resample"]
METHODS = ("zero", "mean", "resample")


# ---------------------------------------------------------------- metrics


def custom_metric(tokens: Tensor, fn: MetricFn, *, name: str = "custom", higher_is_better: bool = False) -> Metric:
    """Wrap your own ``fn(logits, tokens) -> scalar`` (must be a mean over sequences for :func:`head_importance`).

    ``tokens``: integers [batch, pos] (typed loosely: checked here, with a message that says what to do)."""
    tokens = _check_tokens(tokens, "tokens")
    if not callable(fn):
        raise HeadlensError("a metric function must be callable as fn(logits, tokens) -> scalar tensor")
    return Metric(name, tokens, fn, higher_is_better)


def loss_metric(model: HookedTransformer, *, n_seqs: int = 4, seq_len: int = 64, text: str | None = None) -> Metric:
    """Mean next-token loss on ``n_seqs`` consecutive ``seq_len``-token windows of ``text`` (default: the corpus)."""
    check_model(model)
    n_seqs = check_count("n_seqs", n_seqs)
    seq_len = check_count("seq_len", seq_len, minimum=2)

    if n_seqs < 1 or seq_len < 2:
        raise HeadlensError(f"loss metric needs n_seqs >= 1 and seq_len >= 2 (got {n_seqs}, {seq_len})")
    # the whole text, split into windows below: the class's to_tokens (models.strict_context refuses long text)
    ids = type(model).to_tokens(model, corpus_text() if text is None else text, prepend_bos=False, truncate=False)[0]
    if ids.numel() < n_seqs * seq_len:
        raise HeadlensError(
            f"the text has {ids.numel()} tokens, fewer than n_seqs*seq_len = {n_seqs * seq_len}: use fewer or shorter sequences (--n-seqs, --seq-len)"
        )
    tokens = einops.rearrange(ids[: n_seqs * seq_len], "(b p) -> b p", b=n_seqs)
    return Metric("loss", tokens, lambda logits, toks: lm_cross_entropy_loss(logits, toks))


def _repeat_half_loss(start: int | Tensor) -> MetricFn:
    """Loss of predicting ``tokens[:, start + 1:]`` from the logits at positions ``start .. pos - 2``; ``start``: one
    position, or one per sequence (the census's repeated probe varies its half-length), the logits then starting at
    the smallest and each sequence's loss read from its own start on."""

    def fn(logits, tokens):
        first = int(torch.as_tensor(start).min())
        logprobs = logits.log_softmax(dim=-1).gather(-1, tokens[:, first + 1 :, None])[..., 0]
        if isinstance(start, int):
            return -logprobs.mean()
        keep = (
            torch.arange(first, first + logprobs.shape[1], device=logprobs.device) >= start.to(logprobs.device)[:, None]
        )
        return -(logprobs * keep).sum() / keep.sum()

    return fn


def repeat_loss_metric(
    model: HookedTransformer, *, n_seqs: int = 4, half_len: int = 32, seed: int = 0, probe=None
) -> Metric:
    """Mean loss on predicting A₂…Aₙ in the second half of repeated random tokens [P, A₁…Aₙ, A₁…Aₙ] (in-context copying).

    Tokens come from :func:`headlens.data.probes.repeated_tokens` (the census's induction probe; distinct ordinary
    word tokens, one prefix token), or pass that ``probe`` itself to score exactly the census's sequences (then the
    probe's sizes and seed are the metric's: others given beside it are an error).
    """
    check_model(model)
    n_seqs = check_count("n_seqs", n_seqs)
    half_len = check_count("half_len", half_len, minimum=2)
    if probe is None:
        probe = repeated_tokens(model, n=half_len, n_seqs=n_seqs, seed=seed)
    elif non_defaults(repeat_loss_metric, n_seqs=n_seqs, half_len=half_len, seed=seed):
        raise HeadlensError("repeat_loss_metric takes probe= or n_seqs/half_len/seed, not both: the probe has its own")
    if getattr(probe, "kind", None) != "repeated":
        raise HeadlensError("repeat_loss_metric needs a repeated-token probe (headlens.data.probes.repeated_tokens)")
    n_pos = probe.tokens.shape[1]
    start = n_pos - probe.n_per_seq  # where each sequence's second copy begins
    start = int(start[0]) if bool((start == start[0]).all()) else start
    positions = torch.arange(int(torch.as_tensor(start).min()), n_pos - 1)  # only these logits are unembedded
    return Metric("repeat_loss", probe.tokens, _repeat_half_loss(start), positions=positions)


def logit_diff_metric(
    model: HookedTransformer, prompts: str | Sequence[str], answers: tuple[str, str] | Sequence[tuple[str, str]]
) -> Metric:
    """Mean over prompts of logit(correct) − logit(wrong) at each prompt's last token; answers are single tokens."""
    check_model(model)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if answers and isinstance(answers[0], str):
        answers = [tuple(answers)] * len(prompts)
    answers = list(answers)
    if not prompts or len(answers) != len(prompts):
        raise HeadlensError(
            f"logit diff needs one (correct, wrong) answer pair per prompt: got {len(prompts)} prompts, {len(answers)} pairs"
        )

    def one_token(text: str) -> int:
        toks = model.to_tokens(text, prepend_bos=False)[0]
        if toks.numel() != 1:
            raise HeadlensError(
                f"answer {text!r} is {toks.numel()} tokens; logit diff needs single-token answers (try a leading space)"
            )
        return int(toks[0])

    seqs = [model.to_tokens(p, prepend_bos=False)[0] for p in prompts]
    if any(s.numel() == 0 for s in seqs):
        raise HeadlensError("a logit-diff prompt is empty")
    pad = (
        model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    )
    tokens = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad)
    last = torch.tensor([s.numel() - 1 for s in seqs])
    correct = torch.tensor([one_token(c) for c, _ in answers])
    wrong = torch.tensor([one_token(w) for _, w in answers])
    check_distinct_answers(correct, wrong, [c for c, _ in answers])

    def fn(logits, toks):
        rows = torch.arange(logits.shape[0], device=logits.device)
        final = logits[rows, last.to(logits.device)]
        return (final[rows, correct.to(logits.device)] - final[rows, wrong.to(logits.device)]).mean()

    return Metric("logit_diff", tokens, fn, higher_is_better=True)


def _check_tokens(tokens, what: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dtype not in TOKEN_DTYPES or tokens.ndim != 2 or tokens.numel() == 0:
        raise HeadlensError(
            f"{what} must be a non-empty integer token tensor of shape [batch, pos] (use model.to_tokens)"
        )
    return tokens.long()


def _as_metric(model: HookedTransformer, metric: Metric | MetricFn, tokens: Tensor | None) -> Metric:
    """``metric`` as a Metric on ``tokens`` (its own when None), its tokens checked against ``model``'s vocabulary."""
    if isinstance(metric, Metric):
        metric = metric if tokens is None else metric.at(_check_tokens(tokens, "tokens"))
    elif callable(metric):
        if tokens is None:
            raise HeadlensError("a plain metric function needs tokens=...; or build one with custom_metric(tokens, fn)")
        metric = custom_metric(tokens, metric)
    else:
        raise HeadlensError(
            "metric must be a headlens Metric (loss_metric, repeat_loss_metric, ...) or a function fn(logits, tokens)"
        )
    check_token_ids(model, metric.tokens, f"{metric.name} metric tokens")
    return metric


# ---------------------------------------------------------------- replacement values


def _cycle(n: int, seed: int) -> Tensor:
    """A seeded random cyclic permutation of range(n): no fixed points when n ≥ 2."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sigma = torch.empty(n, dtype=torch.long)
    sigma[order] = order.roll(-1)
    return sigma


def check_reference(
    model: HookedTransformer, method: str, reference: Tensor | None, *, tokens: Tensor | None = None
) -> Tensor | None:
    """The reference tokens ``method`` ablates with (``reference``, else ``tokens``; None for zero ablation), or one
    clear error: an unknown method, a reference given to zero ablation (which reads none), a missing reference, ids
    outside the vocabulary, fewer than 2 sequences to resample from."""
    check_model(model)
    if method not in METHODS:
        raise HeadlensError(f"unknown ablation method {method!r}: use one of {', '.join(METHODS)}")
    if method == "zero":
        if reference is not None:
            raise HeadlensError("zero ablation reads no reference: drop reference=, or use method='mean' or 'resample'")
        return None
    reference = tokens if reference is None else reference
    if reference is None:
        raise HeadlensError(f"{method} ablation needs reference tokens: pass reference=<tokens [batch, pos]>")
    reference = check_token_ids(model, _check_tokens(reference, "reference"), "reference")
    if method == "resample" and reference.shape[0] < 2:
        raise HeadlensError("resample ablation needs a reference with at least 2 sequences")
    return reference


class Replacement:
    """What an ablated head's z becomes, for a given method and reference (computed once, reused by every hook)."""

    def __init__(
        self,
        model: HookedTransformer,
        method: str,
        reference: Tensor | None,
        layers: Iterable[int],
        *,
        seed: int = 0,
        tokens: Tensor | None = None,
    ):
        """``reference`` defaults to ``tokens`` (the metric's); zero ablation reads none and refuses one."""
        reference = check_reference(model, method, reference, tokens=tokens)
        layers = sorted(set(layers))
        self.method, self.seed, self.layers = method, check_count("seed", seed, minimum=0), set(layers)
        self.n_heads, self.d_head = model.cfg.n_heads, model.cfg.d_head
        self.dtype, self.device = model.cfg.dtype, model.cfg.device
        if method == "zero":
            return
        with torch.inference_mode():
            _, cache = model.run_with_cache(
                reference.to(model.cfg.device),
                names_filter=lambda n: n in {get_act_name("z", l) for l in layers},
                stop_at_layer=max(layers) + 1,
            )
        z = {l: cache["z", l].clone() for l in layers}
        if method == "mean":
            self.means = {l: einops.reduce(v, "b p h d -> h d", "mean") for l, v in z.items()}
        else:
            self.z, self.sigma = z, _cycle(reference.shape[0], seed)

    def __call__(self, layer: int, heads: Tensor, n_seqs: int, pos: int) -> Float[Tensor, "batch pos n d_head"]:
        if self.method == "zero":
            return torch.zeros(n_seqs, pos, len(heads), self.d_head, dtype=self.dtype, device=self.device)
        if self.method == "mean":
            return einops.repeat(self.means[layer][heads], "n d -> b p n d", b=n_seqs, p=pos)
        ref = self.z[layer]
        if ref.shape[1] < pos:
            raise HeadlensError(f"resample reference has {ref.shape[1]} positions, fewer than the batch's {pos}")
        rows = self.sigma[torch.arange(n_seqs) % len(self.sigma)]
        return ref[rows][:, :pos][:, :, heads]

    def source(self, tokens: Tensor) -> Source:
        """The engine's source: hook name of a layer's z -> every head's replacement for the batch ``tokens``."""
        heads, (n_seqs, pos) = torch.arange(self.n_heads), tokens.shape
        return lambda name: self(int(name.split(".")[1]), heads, n_seqs, pos)


def _replace_hook(heads: list[int], replacement: Replacement):
    idx = torch.tensor(heads, dtype=torch.long)

    def hook(z: Float[Tensor, "batch pos head d_head"], hook):
        z[:, :, idx] = replacement(hook.layer(), idx, z.shape[0], z.shape[1]).to(z.dtype)
        return z

    return hook


def _sites(heads: Iterable[HeadLike]) -> Intervention:
    """The engine's sites for ablating ``heads`` together: one hook_z site per layer."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)
    return tuple(Site("z", layer, tuple(hs)) for layer, hs in sorted(by_layer.items()))


def ablation_hooks(
    model: HookedTransformer,
    heads: Iterable[HeadLike],
    *,
    method: Method = "zero",
    reference: Int[Tensor, "ref_batch ref_pos"] | None = None,
    seed: int = 0,
    _replacement: Replacement | None = None,
) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks (on ``hook_z``) that ablate ``heads``; pass to ``model.run_with_hooks``.

    ``mean`` / ``resample`` need ``reference`` tokens (their clean z is computed here, once).
    """
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    sites = _sites(check_heads(model, heads))
    replacement = _replacement or Replacement(model, method, reference, [s.layer for s in sites], seed=seed)
    return [(s.name, _replace_hook(list(s.units), replacement)) for s in sites]


def run_ablated(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    heads: Iterable[HeadLike],
    *,
    method: Method = "zero",
    reference: Int[Tensor, "ref_batch ref_pos"] | None = None,
    seed: int = 0,
) -> Float[Tensor, "batch pos vocab"]:
    """Logits of ``tokens`` with ``heads`` ablated (reference defaults to ``tokens``): the plain TL reference."""
    check_model(model)
    tokens = _check_tokens(tokens, "tokens")
    heads = check_heads(model, heads)  # once: ``heads`` may be a one-pass iterator
    sites = _sites(heads)
    replacement = Replacement(model, method, reference, [s.layer for s in sites], seed=seed, tokens=tokens)
    hooks = ablation_hooks(model, heads, method=method, seed=seed, _replacement=replacement)
    with torch.inference_mode():
        return model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=hooks)


def ablated_metrics(
    model: HookedTransformer,
    metric: Metric,
    head_sets: Sequence[Sequence[HeadLike]],
    *,
    method: Method = "zero",
    reference: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    replacement: Replacement | None = None,
) -> tuple[float, list[float]]:
    """(clean metric, metric with each set ablated together): one clean forward caches ``resid_pre``, each set
    restarts at its first layer, ``batch_size // batch`` sets per stacked forward. ``replacement``: values
    computed once for several calls that ablate with the same method and reference (it must cover their layers)."""
    check_model(model)
    sets = [_sites(check_heads(model, hs)) for hs in head_sets]
    layers = sorted({s.layer for sites in sets for s in sites})
    if replacement is None:
        replacement = Replacement(model, method, reference, layers, seed=seed, tokens=metric.tokens)
    elif replacement.method != method or not set(layers) <= replacement.layers:
        raise HeadlensError(f"the replacement given is for {replacement.method} ablation of other layers")
    toks = metric.tokens.to(model.cfg.device)
    with torch.inference_mode():
        clean, cache = cached_run(model, toks, resid_names(layers), metric)
        values = run_interventions(
            model, cache, sets, replacement.source(toks), metric,
            runs_per_pass=max(1, batch_size // toks.shape[0]), progress=progress, desc="ablate sets",
        )  # fmt: skip
    return clean, values


def ablated_metric(
    model: HookedTransformer,
    metric: Metric | MetricFn,
    heads: Iterable[HeadLike],
    *,
    tokens: Tensor | None = None,
    method: Method = "zero",
    reference: Tensor | None = None,
    seed: int = 0,
) -> float:
    """The metric with ``heads`` ablated together (reference defaults to the metric's tokens)."""
    check_model(model)
    metric = _as_metric(model, metric, tokens)
    sites = _sites(check_heads(model, heads))
    replacement = Replacement(model, method, reference, [s.layer for s in sites], seed=seed, tokens=metric.tokens)
    toks = metric.tokens.to(model.cfg.device)
    with torch.inference_mode():
        resid = {get_act_name("resid_pre", 0): embed(model, toks)}
        (out,) = run_interventions(
            model, resid, [sites], replacement.source(toks), metric, start_layer=0, progress=False
        )
    return out


def clean_metric(model: HookedTransformer, metric: Metric | MetricFn, *, tokens: Tensor | None = None) -> float:
    """The metric with nothing ablated."""
    check_model(model)
    metric = _as_metric(model, metric, tokens)
    with torch.inference_mode():
        return value(metric.full(model(metric.tokens.to(model.cfg.device))))


@dataclass(frozen=True)
class RandomComparison:
    """:func:`compare_to_random`'s answer: ``table`` has one row per ablated set (``kind`` target / random,
    ``heads``, metric, effect = ablated − clean, worsening = relative change, positive = worse); the fields are
    the statistics: ``z`` of the target's worsening against the random draws and ``p_random_ge``, the share of
    random draws at least as bad."""

    table: pd.DataFrame
    clean: float
    target_effect: float
    target_worsening: float
    random_mean: float
    random_std: float
    z: float
    p_random_ge: float


def random_sets(
    model: HookedTransformer,
    heads: Sequence[HeadLike],
    n_random: int,
    seed_of: Callable[[int], object],
    *,
    match_layers: bool = True,
    max_draws: int | None = None,
) -> list[list]:
    """Up to ``n_random`` distinct random sets of ``len(heads)`` heads outside ``heads`` (matched to their layers with
    ``match_layers``; :func:`headlens.heads.random_heads`), draw ``i`` seeded ``seed_of(i)``.

    A set drawn again is skipped: counted twice, it would narrow an interval or a z-score as if it were new evidence.
    Fewer sets come back only when ``max_draws`` draws (default ``50 * n_random``) find no more, e.g. for one head of
    a layer of 14, which has 13 layer-mates.
    """
    check_model(model)
    heads = list(heads)
    out, seen = [], set()
    for i in range(50 * int(n_random) if max_draws is None else int(max_draws)):
        if len(out) == int(n_random):
            break
        drawn = random_heads(model, len(heads), seed=seed_of(i), exclude=heads, like=heads if match_layers else None)
        if tuple(drawn) not in seen:  # random_heads returns its heads sorted
            seen.add(tuple(drawn))
            out.append(drawn)
    return out


def compare_to_random(
    model: HookedTransformer,
    metric: Metric | MetricFn,
    heads: Iterable[HeadLike],
    *,
    n_random: int = 20,
    method: Method = "zero",
    match_layers: bool = False,
    tokens: Tensor | None = None,
    reference: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> RandomComparison:
    """Effect of ablating ``heads`` together vs ``n_random`` draws of as many other random heads.

    Random draw i uses the i-th child of ``numpy.random.SeedSequence(seed)``; ``match_layers=True`` draws
    them from the same layers (depth-matched control, see :func:`headlens.heads.random_heads`). The ``n_random``
    sets are distinct (:func:`random_sets`); an error says how many exist when fewer than ``n_random`` do.
    """
    check_model(model)
    batch_size = check_count("batch_size", batch_size)
    seed = check_count("seed", seed, minimum=0)
    n_random = check_count("n_random", n_random, minimum=2, why="a spread needs two random sets")
    metric = _as_metric(model, metric, tokens)
    heads = check_heads(model, heads)
    children = np.random.SeedSequence(seed).spawn(50 * int(n_random))
    drawn = random_sets(
        model, heads, n_random, children.__getitem__, match_layers=match_layers, max_draws=len(children)
    )
    if len(drawn) < int(n_random):
        where = " in the same layers" if match_layers else ""
        raise HeadlensError(
            f"only {len(drawn)} distinct sets of {len(heads)} random heads{where} exist outside the target heads, "
            f"fewer than n_random={n_random}: pass n_random <= {len(drawn)}"
        )
    sets = [("target", heads)] + [("random", hs) for hs in drawn]
    clean, values = ablated_metrics(
        model, metric, [hs for _, hs in sets], method=method, reference=reference, seed=seed,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    table = pd.DataFrame(
        [
            {"kind": kind, "heads": format_heads(hs), "metric": v, "effect": v - clean,
             "worsening": metric.worsening(v, clean)}
            for (kind, hs), v in zip(sets, values)
        ]
    )  # fmt: skip
    rand = table.loc[table.kind == "random", "worsening"].to_numpy()
    target = float(table.worsening.iloc[0])
    std = float(rand.std(ddof=1)) if len(rand) > 1 else float("nan")
    mean = float(rand.mean()) if len(rand) else float("nan")
    return RandomComparison(
        table=table,
        clean=clean,
        target_effect=float(table.effect.iloc[0]),
        target_worsening=target,
        random_mean=mean,
        random_std=std,
        z=(target - mean) / std if len(rand) > 1 and std > 0 else float("nan"),
        p_random_ge=float((rand >= target).mean()) if len(rand) else float("nan"),
    )


# ---------------------------------------------------------------- sweeps


@dataclass
class SweepResult:
    """What :func:`ablation_sweep` and :func:`head_importance` return.

    - ``table``: one row per head (or kv group); columns in each function's docstring;
    - ``metric``: the metric's name; ``method``: the ablation (zero, mean, resample; for :func:`head_importance`, what
      the gate swaps in);
    - ``unit``: ``head`` or ``kv_group``; ``clean``: the metric of the unablated model.
    """

    table: pd.DataFrame
    metric: str
    method: str
    unit: str
    clean: float


def _units(model: HookedTransformer, unit: str, layers: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """(layer, unit index, q heads) for every head or every kv group of ``layers``."""
    H = model.cfg.n_heads
    if unit == "head":
        return [(l, h, [h]) for l in layers for h in range(H)]
    if unit == "kv_group":
        n_kv = model.cfg.n_key_value_heads or H
        return [(l, g, [h for _, h in kv_group_heads(model, l, g)]) for l in layers for g in range(n_kv)]
    raise HeadlensError(f"unknown ablation unit {unit!r}: use 'head' or 'kv_group'")


def ablation_sweep(
    model: HookedTransformer,
    metric: Metric | MetricFn,
    *,
    tokens: Tensor | None = None,
    method: Method = "zero",
    unit: Literal["head", "kv_group"] = "head",
    layers: Iterable[int] | None = None,
    reference: Tensor | None = None,
    seed: int = 0,
    strategy: Literal["fast", "naive"] = "fast",
    batch_size: int = 16,
    progress: bool = True,
    executor: Executor | None = None,
) -> SweepResult:
    """The metric with each head (or each kv group) ablated alone, for all of them (or those of ``layers``).

    ``strategy="fast"``: the intervention engine (one clean forward caches ``resid_pre``; each layer's ablations
    restart there, ``batch_size // batch`` stacked per forward, only the metric's positions unembedded).
    ``strategy="naive"``: one full TransformerLens forward per unit from layer 0. Both give the same numbers.
    Columns: layer, head, kv_head, metric, clean, effect (ablated − clean), worsening (relative, positive =
    worse); a kv-group row has ``head`` = <NA> and names the group in ``kv_head`` (:mod:`headlens.heads`).
    ``executor`` (:mod:`headlens.engine.executor`, e.g. a ``RayExecutor``) runs one shard per layer, each re-running
    the clean forward its layer needs; the table is the same.
    """
    check_model(model)
    metric = _as_metric(model, metric, tokens)
    if strategy not in ("fast", "naive"):
        raise HeadlensError(f"unknown sweep strategy {strategy!r}: use 'fast' or 'naive'")
    batch_size = check_count("batch_size", batch_size)
    seed = check_count("seed", seed, minimum=0)
    layers = check_layers(model, layers)
    units = _units(model, unit, layers)
    check_reference(model, method, reference, tokens=metric.tokens)
    if executor is not None:  # checked here first: a Ray worker would load its model before a shard could refuse
        kwargs = dict(
            method=method, unit=unit, reference=reference, seed=seed, strategy=strategy, batch_size=batch_size
        )
        parts = map_layers(
            _sweep_shard, model, metric, layers, executor=executor, key="headlens.ablation_sweep",
            progress=progress, kwargs=kwargs,
        )  # fmt: skip
        table = pd.concat(parts, ignore_index=True)
        return SweepResult(table, metric.name, method, unit, float(table["clean"].iloc[0]))
    toks = metric.tokens.to(model.cfg.device)
    replacement = Replacement(model, method, reference, layers, seed=seed, tokens=metric.tokens)
    with torch.inference_mode():
        if strategy == "naive":
            clean = value(metric.full(model(toks)))
            values = []
            for layer, _, heads in tqdm(units, desc="ablation sweep (naive)", disable=not progress, leave=False):
                hooks = [(get_act_name("z", layer), _replace_hook(heads, replacement))]
                values.append(value(metric.full(model.run_with_hooks(toks, fwd_hooks=hooks))))
        else:
            clean, cache = cached_run(model, toks, resid_names(layers), metric)
            values = run_interventions(
                model, cache, [(Site("z", layer, tuple(heads)),) for layer, _, heads in units],
                replacement.source(toks), metric, runs_per_pass=max(1, batch_size // toks.shape[0]),
                progress=progress, desc="ablation sweep (fast)",
            )  # fmt: skip
    kv = kv_heads(model)
    table = pd.DataFrame(
        {
            "layer": [layer for layer, _, _ in units],
            "head": pd.array([key if unit == "head" else pd.NA for _, key, _ in units], dtype="Int64"),
            "kv_head": [kv[key] if unit == "head" else key for _, key, _ in units],
            "metric": values,
            "clean": clean,
            "effect": [v - clean for v in values],
            "worsening": [metric.worsening(v, clean) for v in values],
        }
    )
    return SweepResult(table, metric.name, method, unit, clean)


def _sweep_shard(model: HookedTransformer, shard) -> pd.DataFrame:
    metric, layer, kwargs = shard
    return ablation_sweep(model, metric, layers=[layer], progress=False, **kwargs).table


# ---------------------------------------------------------------- gradient importance


def head_importance(
    model: HookedTransformer,
    metric: Metric | MetricFn,
    *,
    tokens: Tensor | None = None,
    method: Method = "zero",
    reference: Tensor | None = None,
    ablated: Iterable[HeadLike] = (),
    seed: int = 0,
) -> SweepResult:
    """Michel et al. (2019) head importance from one forward + backward.

    Every head's z becomes ξ·z + (1 − ξ)·replacement with a per-sequence gate ξ (1 for kept heads,
    0 for ``ablated`` ones); we differentiate the metric with respect to ξ. Columns:
    ``gradient`` = ∂metric/∂ξ_h (ξ shared over the batch; ``-gradient`` is the first-order estimate of
    the ablation effect), ``importance`` = mean over sequences of |∂metric_x/∂ξ_h| (Michel's I_h;
    exact when the metric is a mean over sequences, as the built-in ones are).
    """
    check_model(model)
    metric = _as_metric(model, metric, tokens)
    toks = metric.tokens.to(model.cfg.device)
    B, L, H = toks.shape[0], model.cfg.n_layers, model.cfg.n_heads
    ablated = list(ablated)
    ablated = check_heads(model, ablated) if ablated else []
    replacement = Replacement(model, method, reference, range(L), seed=seed, tokens=metric.tokens)
    keep = torch.ones(L, H, dtype=model.cfg.dtype, device=model.cfg.device)
    for layer, head in ablated:
        keep[layer, head] = 0.0
    gate = einops.repeat(keep, "l h -> b l h", b=B).clone().requires_grad_(True)
    all_heads = torch.arange(H)

    def gated(z: Float[Tensor, "batch pos head d_head"], hook):
        xi = gate[:, hook.layer()][:, None, :, None]
        if replacement.method == "zero":
            return xi * z
        return xi * z + (1 - xi) * replacement(hook.layer(), all_heads, z.shape[0], z.shape[1]).to(z.dtype)

    with torch.enable_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=[(get_act_name("z", l), gated) for l in range(L)])
        result = metric.full(logits)
        (grad,) = torch.autograd.grad(result, gate)
    grad = grad.detach()
    kv = kv_heads(model)
    table = pd.DataFrame(
        [
            {
                "layer": l,
                "head": h,
                "kv_head": kv[h],
                "gradient": float(grad[:, l, h].sum()),
                "importance": float((B * grad[:, l, h]).abs().mean()),
                "ablated": (l, h) in set(ablated),
            }
            for l in range(L)
            for h in range(H)
        ]
    )
    return SweepResult(table, metric.name, method, "head", value(result))


# ---------------------------------------------------------------- helpers for the CLI and reports

METRICS = ("loss", "repeat", "logit-diff")


def build_metric(
    model: HookedTransformer,
    name: str = "loss",
    *,
    n_seqs: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    prompt: str | None = None,
    correct: str | None = None,
    wrong: str | None = None,
) -> Metric:
    """A built-in metric by name: "loss" (corpus text), "repeat" (a first token, then two copies of seq_len // 2
    tokens), "logit-diff"."""
    n_seqs = check_count("n_seqs", n_seqs)
    seq_len = check_count("seq_len", seq_len, minimum=2)
    if name == "loss":
        return loss_metric(model, n_seqs=n_seqs, seq_len=seq_len)
    if name == "repeat":
        if seq_len < 4:
            raise HeadlensError(
                f"the repeat metric needs seq_len (--seq-len) >= 4: two copies of >= 2 tokens (got {seq_len})"
            )
        return repeat_loss_metric(model, n_seqs=n_seqs, half_len=seq_len // 2, seed=seed)
    if name == "logit-diff":
        if not (prompt and correct and wrong):
            raise HeadlensError("the logit-diff metric needs --prompt, --correct and --wrong (single-token answers)")
        return logit_diff_metric(model, prompt, (correct, wrong))
    raise HeadlensError(f"unknown metric {name!r}: use one of {', '.join(METRICS)}")

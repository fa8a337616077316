"""Activation patching and attribution patching, head by head, from a clean run into a corrupted one.

Activation patching runs the model on the corrupted prompt, replaces one head's activation with its
value on the clean prompt, and measures how far a metric moves back towards the clean run:
``effect = (patched - corrupted) / (clean - corrupted)``, so 1 = full recovery, 0 = none.
Attribution patching (Nanda 2023) estimates every effect at once with a first-order Taylor
expansion around the corrupted run, ``(clean_act - corrupted_act) . d metric / d act``, from one
clean pass, one corrupted pass and one backward pass.

Exact patching runs on the intervention engine (:mod:`headlens.engine.intervene`): it caches only the activation
being patched (clean run) and the residual stream entering each layer (corrupted run), restarts every
patched run at the patched layer with ``start_at_layer``, stacks many patched runs along the batch axis of
one forward, and unembeds only the positions the metric reads. Besides heads, the per-layer residual
stream (``resid_pre``) and block outputs (``attn_out``, ``mlp_out``) can be patched, per position too.

What is patched, per head (hook names are TransformerLens'):

- ``z`` (``attn.hook_z``): the head's output before ``W_O``; one head's contribution to the residual.
- ``pattern`` (``attn.hook_pattern``): the head's attention pattern, values kept corrupted.
- ``q``, ``k``, ``v`` (``attn.hook_q``/``hook_k``/``hook_v``): the head's query/key/value vectors.
  A head's q (k, v) is a function of that head's q (k, v) input alone, so patching it equals
  patching the split q/k/v *input* of ``use_split_qkv_input`` without the per-head copies of the
  residual that option costs.

GQA (Qwen2.5-0.5B: 14 q heads share 2 kv heads, q head h reads kv head h // 7): in TransformerLens
3.9 ``hook_q`` has ``n_heads`` heads but ``hook_k``/``hook_v`` have ``n_key_value_heads``
(also with ``use_split_qkv_input``: ``hook_k_input`` then has ``n_key_value_heads`` copies).
So by default k/v patching is per *kv head*: patching kv head g changes the keys/values read by
every q head of its group at once; those rows have ``head`` = <NA> and the ``kv_head`` column
names the unit. With ``ungroup_kv=True`` the model runs with
``cfg.ungroup_grouped_query_attention`` (k/v repeated per q head, same logits), and patching
q head h's copy of k/v changes what head h alone reads: a per-q-head answer to "does head h
need the clean keys/values?".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, utils

from headlens.data.probes import check_token_ids, word_token_ids
from headlens.engine.executor import Executor, map_layers
from headlens.engine.intervene import (
    LOGITS_BUDGET,  # noqa: F401 (public: the engine's logits budget)
    Metric,
    Site,
    cached_run,
    check_activation,
    check_distinct_answers,
    final_logits,
    resid_names,
    run_interventions,
)
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import check_heads, check_layers, kv_heads

Activation = Literal["z", "pattern", "q", "k", "v", "resid_pre", "attn_out", "mlp_out"]
ACTIVATIONS: tuple[str, ...] = ("z", "pattern", "q", "k", "v")
STREAM_ACTIVATIONS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")
"""Per-layer (not per-head) activations exact patching also takes, as TransformerLens' ``get_act_patch_*``."""
MetricFn = Callable[[Float[Tensor, "batch n_pos d_vocab"]], Float[Tensor, ""]]
"""A plain metric of the logits at the pair's positions (TransformerLens style); PromptPair wraps it in a Metric."""


# ---------------------------------------------------------------- metrics


def logprob(logits: Float[Tensor, "batch n_pos d_vocab"], targets: Int[Tensor, "batch n_pos"]) -> Float[Tensor, ""]:
    """Mean log-probability of the ``targets`` (the correct next tokens) at the metric positions."""
    logprobs = logits.log_softmax(dim=-1)
    return logprobs.gather(-1, targets[..., None].to(logits.device)).mean()


def logit_diff(
    logits: Float[Tensor, "batch n_pos d_vocab"], correct: Int[Tensor, "batch n_pos"], wrong: Int[Tensor, "batch n_pos"]
) -> Float[Tensor, ""]:
    """Mean logit difference between the ``correct`` and the ``wrong`` answer tokens."""
    right = logits.gather(-1, correct[..., None].to(logits.device))
    bad = logits.gather(-1, wrong[..., None].to(logits.device))
    return (right - bad).mean()


# ---------------------------------------------------------------- prompt pairs


@dataclass(frozen=True)
class PromptPair:
    """Clean and corrupted ``[batch, pos]`` tokens of equal shape, and a metric of the logits at ``positions``
    (distinct; a negative one is stored as the position it names, as in :class:`headlens.engine.intervene.Metric`).

    ``metric(logits)`` receives ``logits[:, positions]`` (shape ``batch n_pos d_vocab``) and returns a
    scalar that is high on the clean run; only those positions are unembedded. A plain function is wrapped in
    the shared :class:`headlens.engine.intervene.Metric` (``higher_is_better=True``, reading ``positions``).
    """

    clean: Int[Tensor, "..."]  # [batch, pos], corrupted the same shape: __post_init__ says what to do when not
    corrupted: Int[Tensor, "..."]
    positions: Int[Tensor, " n_pos"]
    metric: Metric | MetricFn
    name: str = "pair"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        for what, tokens in (("clean", self.clean), ("corrupted", self.corrupted)):
            if not isinstance(tokens, Tensor) or tokens.ndim != 2:
                shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
                raise HeadlensError(
                    f"{what} tokens must be a [batch, pos] tensor (got {shape}): one prompt is model.to_tokens(text), "
                    "or tokens[None]"
                )
        if self.clean.shape != self.corrupted.shape:
            raise HeadlensError(
                f"clean and corrupted prompts must have the same token length: clean has {self.clean.shape[-1]} tokens "
                f"(batch {self.clean.shape[0]}), corrupted has {self.corrupted.shape[-1]} (batch {self.corrupted.shape[0]}); "
                "edit the corrupted prompt so both tokenize to the same number of tokens"
            )
        if self.positions is None:
            raise HeadlensError("a prompt pair needs its metric positions, e.g. torch.tensor([n_pos - 1]) for the last")
        metric = pair_metric(self.metric, self.clean, self.positions, self.name)  # Metric checks the positions
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "positions", metric.positions)  # -1 stored as the last position

    def metric_logits(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        """The metric on full-length logits (what TransformerLens' patching functions pass)."""
        return self.metric.full(logits)


def check_pair_tokens(model: HookedTransformer, pair: PromptPair) -> None:
    """Refuse, before any forward, what is not a :class:`PromptPair` or one whose clean or corrupted tokens are not ids
    of ``model``'s vocabulary."""
    check_model(model)
    if not isinstance(pair, PromptPair):
        raise HeadlensError(f"patching needs a PromptPair (induction_pair, text_pair), got {type(pair).__name__}")
    check_token_ids(model, pair.clean, "clean tokens")
    check_token_ids(model, pair.corrupted, "corrupted tokens")


def pair_metric(metric: Metric | MetricFn, tokens: Tensor, positions: Tensor, name: str = "pair") -> Metric:
    """``metric`` as the shared Metric type, reading the logits at ``positions``."""
    if isinstance(metric, Metric):
        return Metric(metric.name, tokens, metric.fn, metric.higher_is_better, positions)
    if not callable(metric):
        raise HeadlensError("a patching metric must be callable as metric(logits at the metric positions) -> scalar")
    return Metric(name, tokens, lambda logits, _tokens: metric(logits), True, positions)


def _token_pool(model: HookedTransformer) -> Int[Tensor, " n"]:
    """Ordinary word tokens (as the census' repeated probe uses) or, without a tokenizer, the whole vocabulary."""
    if model.tokenizer is None:
        return torch.arange(model.cfg.d_vocab)

    return word_token_ids(model)


def induction_pair(
    model: HookedTransformer, *, n_tokens: int = 10, n_seqs: int = 4, prefix: int = 1, seed: int = 0
) -> PromptPair:
    """Repeated random tokens ``[P A A]`` (clean) vs ``[P B A]``, the first half resampled (corrupted).

    ``P`` is ``prefix`` shared tokens (Qwen has no BOS, so position 0 is a sink); ``P``, ``A`` and ``B`` are
    distinct ordinary word tokens. The metric is the mean log-prob of the correct next token over the second
    half: on the clean run an induction circuit predicts ``A[i+1]`` after the second ``A[i]``; on the corrupted
    run nothing can.
    """
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    n_tokens = check_count("n_tokens", n_tokens, minimum=3)
    n_seqs = check_count("n_seqs", n_seqs)
    prefix = check_count("prefix", prefix, minimum=0)
    if n_tokens < 3 or n_seqs < 1 or prefix < 0:
        raise HeadlensError(
            f"induction_pair needs n_tokens >= 3, n_seqs >= 1 and prefix >= 0, got n_tokens={n_tokens}, n_seqs={n_seqs}, prefix={prefix}"
        )
    pool = _token_pool(model)
    if len(pool) < prefix + 2 * n_tokens:
        raise HeadlensError(
            f"the vocabulary has only {len(pool)} ordinary tokens; an induction pair needs prefix + 2 * n_tokens = {prefix + 2 * n_tokens}"
        )
    generator = torch.Generator().manual_seed(seed)
    draws = torch.stack(
        [pool[torch.randperm(len(pool), generator=generator)[: prefix + 2 * n_tokens]] for _ in range(n_seqs)]
    )
    p, a, b = draws[:, :prefix], draws[:, prefix : prefix + n_tokens], draws[:, prefix + n_tokens :]
    clean = torch.cat([p, a, a], dim=1)
    corrupted = torch.cat([p, b, a], dim=1)
    positions = torch.arange(prefix + n_tokens, prefix + 2 * n_tokens - 1)
    return PromptPair(
        clean=clean.to(model.cfg.device),
        corrupted=corrupted.to(model.cfg.device),
        positions=positions,
        metric=partial(logprob, targets=clean[:, positions + 1]),
        name="induction",
        info={
            "n_tokens": n_tokens,
            "batch": n_seqs,
            "prefix": prefix,
            "seed": seed,
            "metric": "mean log-prob of the next token, second half",
        },
    )


def _tokens(model: HookedTransformer, texts: Sequence[str], what: str) -> Int[Tensor, "batch pos"]:
    rows = [model.to_tokens(t, prepend_bos=model.cfg.default_prepend_bos)[0] for t in texts]
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise HeadlensError(
            f"the {what} prompts tokenize to different lengths {sorted(lengths)}; give prompts of equal token length"
        )
    return torch.stack(rows)


def _single_token(model: HookedTransformer, text: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if len(ids) != 1:
        raise HeadlensError(
            f"answer {text!r} is {len(ids)} tokens; give a single token (mind the leading space, e.g. ' Paris')"
        )
    return int(ids[0])


def _answer_tokens(model: HookedTransformer, answers: str | Sequence[str], n_seqs: int, what: str) -> Tensor:
    """``[batch, 1]`` single-token ids: one answer for every prompt, or one per prompt."""
    answers = [answers] * n_seqs if isinstance(answers, str) else list(answers)
    if len(answers) != n_seqs:
        raise HeadlensError(f"give one {what} per prompt: {n_seqs} prompts, {len(answers)} {what}s")
    return torch.tensor([[_single_token(model, a)] for a in answers])


def text_pair(
    model: HookedTransformer,
    clean: str | Sequence[str],
    corrupted: str | Sequence[str],
    *,
    answer: str | Sequence[str] | None = None,
    wrong: str | Sequence[str] | None = None,
) -> PromptPair:
    """A user pair of prompts of equal token length; the metric reads the last position.

    With ``answer`` (and ``wrong``) given as single tokens the metric is the logit difference answer − wrong
    (or the log-prob of ``answer``); one string is every prompt's answer, a list gives one per prompt. Without them the answer is the clean run's top next token and the wrong one
    the corrupted run's; the metric is their logit difference (the log-prob of the answer where both agree).
    """
    check_model(model)
    clean_texts = [clean] if isinstance(clean, str) else list(clean)
    corrupted_texts = [corrupted] if isinstance(corrupted, str) else list(corrupted)
    if len(clean_texts) != len(corrupted_texts) or not clean_texts:
        raise HeadlensError(
            f"give as many corrupted prompts as clean ones (got {len(clean_texts)} clean, {len(corrupted_texts)} corrupted)"
        )
    for c, k in zip(clean_texts, corrupted_texts):
        n_c = model.to_tokens(c, prepend_bos=model.cfg.default_prepend_bos).shape[-1]
        n_k = model.to_tokens(k, prepend_bos=model.cfg.default_prepend_bos).shape[-1]
        for what, text, n in (("clean", c, n_c), ("corrupted", k, n_k)):
            if n == 0:
                raise HeadlensError(
                    f"the {what} prompt {text!r} is empty (no tokens): give a prompt of at least one token"
                )
        if n_c != n_k:
            raise HeadlensError(
                f"clean and corrupted prompts must have the same token length: clean {c!r} has {n_c} tokens, "
                f"corrupted {k!r} has {n_k}; edit the corrupted prompt so both tokenize to the same number of tokens"
            )
    clean_tokens = _tokens(model, clean_texts, "clean").to(model.cfg.device)
    corrupted_tokens = _tokens(model, corrupted_texts, "corrupted").to(model.cfg.device)
    n_seqs = clean_tokens.shape[0]
    positions = torch.tensor([clean_tokens.shape[1] - 1])
    if answer is None:
        if wrong is not None:
            raise HeadlensError("give --answer together with --wrong (the wrong token alone defines no metric)")
        with torch.inference_mode():
            last = final_logits(model, torch.cat([clean_tokens, corrupted_tokens]), positions)[:, 0]
        top = last.argmax(-1).cpu()
        correct, other = top[:n_seqs], top[n_seqs:]
        if bool((correct != other).all()):
            metric, text = (
                partial(logit_diff, correct=correct[:, None], wrong=other[:, None]),
                "logit diff clean top − corrupted top",
            )
        else:
            metric, text = partial(logprob, targets=correct[:, None]), "log-prob of the clean run's top next token"
    else:
        correct = _answer_tokens(model, answer, n_seqs, "answer")
        if wrong is None:
            metric, text = partial(logprob, targets=correct), f"log-prob of {answer!r}"
        else:
            bad = _answer_tokens(model, wrong, n_seqs, "wrong")
            check_distinct_answers(correct, bad, [answer] * n_seqs if isinstance(answer, str) else list(answer))
            metric, text = partial(logit_diff, correct=correct, wrong=bad), f"logit diff {answer!r} − {wrong!r}"
    return PromptPair(clean_tokens, corrupted_tokens, positions, metric, name="text", info={"metric": text})


# ---------------------------------------------------------------- running pieces of the model


@contextlib.contextmanager
def kv_mode(model: HookedTransformer, ungroup_kv: bool) -> Iterator[None]:
    """Run with k/v repeated per q head (``ungroup_grouped_query_attention``) when asked; restore after."""
    check_model(model)
    before = model.cfg.ungroup_grouped_query_attention
    model.cfg.ungroup_grouped_query_attention = bool(ungroup_kv) and model.cfg.n_key_value_heads is not None
    try:
        yield
    finally:
        model.cfg.ungroup_grouped_query_attention = before


def _n_units(model: HookedTransformer, activation: str) -> int:
    grouped = model.cfg.n_key_value_heads is not None and not model.cfg.ungroup_grouped_query_attention
    return model.cfg.n_key_value_heads if activation in ("k", "v") and grouped else model.cfg.n_heads


def check_head_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise HeadlensError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")


@dataclass
class PatchingResult:
    """What :func:`activation_patching` and :func:`headlens.interventions.attribution.attribution_patching` return.

    - ``table``: one row per patched unit: ``activation, layer, head, kv_head, [pos], metric, effect``, where
      ``effect`` = (patched − corrupted) / (clean − corrupted) (1 = full recovery of the clean metric);
    - ``clean``, ``corrupted``: the metric on the clean and on the corrupted run;
    - ``method``: ``"exact"``, or the attribution estimator (``"atp"``, ``"atp*"``, ``"ig2"``, ...).
    """

    table: pd.DataFrame
    clean: float
    corrupted: float
    method: str


def patch_table(model, activation, rows, clean: float, corrupted: float, by_position: bool) -> pd.DataFrame:
    """Long table of patched units; k/v units of a grouped model are kv heads (``head`` = <NA>, see heads.py);
    per-layer activations (resid_pre, attn_out, mlp_out) have no head columns."""
    check_model(model)
    df = pd.DataFrame(rows, columns=["layer", "unit", "pos", "metric"])
    df.insert(0, "activation", activation)
    if activation not in STREAM_ACTIVATIONS:
        per_q_head = _n_units(model, activation) == model.cfg.n_heads
        heads = [(u, kv_heads(model)[u]) if per_q_head else (pd.NA, u) for u in df["unit"]]
        df.insert(2, "head", pd.array([h for h, _ in heads], dtype="Int64"))
        df.insert(3, "kv_head", [g for _, g in heads])
    df = df.drop(columns="unit")
    if not by_position:
        df = df.drop(columns="pos")
    df["effect"] = (df["metric"] - corrupted) / (clean - corrupted)
    return df


def pair_run(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], names: set[str], positions, metric):
    """One forward: the metric (at ``positions``) and a cache of just the hooks in ``names``."""
    check_model(model)
    return cached_run(model, tokens, names, pair_metric(metric, tokens, positions))


def check_recoverable(clean: float, corrupted: float) -> None:
    if abs(clean - corrupted) < 1e-6 * max(1.0, abs(clean)):
        raise HeadlensError(
            f"the clean and corrupted runs give the same metric ({clean:.6g}): there is nothing to recover; "
            "make the corrupted prompt change the answer"
        )


# ---------------------------------------------------------------- exact activation patching


def activation_patching(
    model: HookedTransformer,
    pair: PromptPair,
    *,
    activation: Activation = "z",
    by_position: bool = False,
    ungroup_kv: bool = False,
    metric: Metric | MetricFn | None = None,
    runs_per_pass: int = 32,
    layers: Sequence[int] | None = None,
    heads: Sequence | None = None,
    progress: bool = True,
    executor: Executor | None = None,
) -> PatchingResult:
    """Patch each head's clean ``activation`` into the corrupted run, one head (and position) at a time.

    The :class:`PatchingResult`'s table has one row per patched unit: ``activation, layer, head, kv_head, [pos],
    metric, effect`` where ``effect`` = (patched − corrupted) / (clean − corrupted) (1 = full recovery). ``by_position`` patches one
    (head, position) at a time (for ``pattern``: one destination position). ``resid_pre``, ``attn_out`` and
    ``mlp_out`` are patched per layer (and position), as TransformerLens' ``get_act_patch_resid_pre`` etc.
    ``runs_per_pass`` patched runs go through one forward of the intervention engine; each starts at the patched
    layer from the corrupted run's cached residual. ``layers`` or ``heads`` (e.g. an attribution screen's top
    heads, ``[(3, 0), "L21H11"]``) restrict the patched units. ``executor`` (:mod:`headlens.engine.executor`) runs
    one shard per layer (each re-runs the clean and corrupted forwards); the table is the same.
    """
    check_model(model)
    check_pair_tokens(model, pair)
    check_activation(activation, ACTIVATIONS + STREAM_ACTIVATIONS)
    runs_per_pass = check_count("runs_per_pass", runs_per_pass)
    shard_metric, metric = metric, pair_metric(metric or pair.metric, pair.clean, pair.positions, pair.name)
    chosen = None
    if heads is not None:
        if layers is not None:
            raise HeadlensError("give layers or heads, not both")
        if activation not in ("z", "q", "pattern") and not (activation in ("k", "v") and ungroup_kv):
            raise HeadlensError(
                f"heads= picks q heads; {activation!r} is patched per layer or per kv head: use layers=, "
                "or ungroup_kv=True for k/v"
            )
        heads = check_heads(model, heads)  # a list: the executor's shards read ``heads`` again
        chosen = set(heads)
        layers = sorted({head.layer for head in chosen})
    layers = check_layers(model, layers)
    if executor is not None:  # checked here first: a Ray worker would load its model before a shard could refuse
        kwargs = dict(activation=activation, by_position=by_position, ungroup_kv=ungroup_kv, metric=shard_metric,
                      runs_per_pass=runs_per_pass, heads=heads)  # fmt: skip
        parts = map_layers(
            _patch_shard, model, pair, layers, executor=executor, key="headlens.activation_patching",
            progress=progress, kwargs=kwargs,
        )  # fmt: skip
        table = pd.concat(parts, ignore_index=True)
        clean, corrupted = (float(table[c].iloc[0]) for c in SHARD_METRICS)
        return PatchingResult(table.drop(columns=list(SHARD_METRICS)), clean, corrupted, "exact")
    with kv_mode(model, ungroup_kv), torch.inference_mode():
        names = {utils.get_act_name(activation, layer) for layer in layers}
        clean, clean_cache = cached_run(model, pair.clean, names, metric)
        corrupted, corrupted_cache = cached_run(model, pair.corrupted, resid_names(layers), metric)
        check_recoverable(clean, corrupted)
        stream = activation in STREAM_ACTIVATIONS
        n_units = 1 if stream else _n_units(model, activation)
        positions = range(pair.clean.shape[1]) if by_position else [None]
        units = [
            (layer, u, p)
            for layer in layers
            for p in positions
            for u in range(n_units)
            if chosen is None or (layer, u) in chosen
        ]
        runs = [(Site(activation, layer, None if stream else (u,), p),) for layer, u, p in units]
        values = run_interventions(
            model, corrupted_cache, runs, clean_cache.__getitem__, metric,
            runs_per_pass=runs_per_pass, progress=progress, desc=f"patching {activation}",
        )  # fmt: skip
        rows = [(layer, u, p, v) for (layer, u, p), v in zip(units, values)]
        return PatchingResult(
            patch_table(model, activation, rows, clean, corrupted, by_position), clean, corrupted, "exact"
        )


SHARD_METRICS = ("shard_clean_metric", "shard_corrupted_metric")
"""Columns a patching shard's table carries its clean and corrupted metrics in: a shard result is a plain table, so
``OUT/.shards`` can checkpoint it."""


def _patch_shard(model: HookedTransformer, shard) -> pd.DataFrame:
    pair, layer, kwargs = shard
    if kwargs.get("heads") is not None:
        kwargs = dict(kwargs, heads=[h for h in check_heads(model, kwargs["heads"]) if h.layer == layer])
        result = activation_patching(model, pair, progress=False, **kwargs)
    else:
        result = activation_patching(model, pair, layers=[layer], progress=False, **kwargs)
    return result.table.assign(**dict(zip(SHARD_METRICS, (result.clean, result.corrupted))))

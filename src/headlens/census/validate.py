"""Causal validation of census labels: one table, label -> the behaviour it exists for -> task and metric -> verdict.

:data:`LABEL_TASKS` says, for every built-in label, what its heads are *for* and which held-out task measures it
(or that the label is descriptive and makes no causal claim). :func:`causal_validation` mean-ablates a label's
heads together and compares the task metric's change with ``n_random`` sets of as many heads drawn from the same
layers (``random_heads(model, n, like=heads, exclude=heads)``; a layer with too few other heads is filled from its
nearest layers; no set twice, so a label of one head gets its 13 layer-mates on Qwen when ``n_random`` asks for
more): same tokens, same ablation, same metric for target and control.

Held out means disjoint (:mod:`headlens.data.corpus`): census scores are measured on the ``score`` split, every
task's evaluation data comes from the ``eval`` split (other files), and the ablation means from the ``reference``
split (a third set of files); random-token tasks draw their sequences from generator seeds the census never uses
(:data:`EVAL_SEEDS`, :data:`REFERENCE_SEEDS`). :func:`task_data` returns a task's metric, its reference tokens and
where both came from, so a test can check that no file or token span is shared (:func:`check_held_out`).

``ratio`` = target effect / mean random effect; its 95 % interval comes from resampling the random draws (the
target is one fixed set). ``verdict``: ``supported`` when the target's effect is in the expected direction and
larger than every random set's; ``no evidence`` otherwise; ``descriptive`` for labels with no causal claim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name, lm_cross_entropy_loss

from headlens.census.ov import ordinal_tokens
from headlens.census.run import check_census_table
from headlens.data.code import code_probe
from headlens.data.corpus import document_unit, split_of
from headlens.data.probes import natural_text, repeated_tokens
from headlens.engine.intervene import Metric
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import format_heads, kv_heads
from headlens.interventions.ablation import (
    ablated_metrics,
    ablation_hooks,
    clean_metric,
    random_sets,
    repeat_loss_metric,
)
from headlens.progress import tqdm

EVAL_SEEDS = 10_000
"""Random-token evaluation sequences use generator seeds ``EVAL_SEEDS + seed`` (census probes use the seed itself)."""
REFERENCE_SEEDS = 20_000
"""... and their ablation means ``REFERENCE_SEEDS + seed``."""
HALF_LEN = 32
SEQ_LEN = 128


@dataclass(frozen=True)
class LabelTask:
    """What a label's heads are for and how that is measured.

    ``task``: a key of :data:`TASKS` (None: the label is descriptive); ``expected_sign``: +1 when ablating the
    heads should raise the metric (a loss), -1 when it should lower it (a log-probability; for copy suppression the
    repeated-half loss, which ablating a suppressor lowers); ``max_heads``: bulk labels ablate only their strongest
    heads (by label score, at most half of any layer, so that a layer-matched random set exists).
    """

    behaviour: str
    task: str | None
    expected_sign: int = 1
    max_heads: int | None = None


TASKS = {
    "repeat_loss": "loss on the repeated half of repeated random tokens [P, A, A] (in-context copying), 8 x 65 tokens",
    "code_closer": "log-prob of the correct closing-bracket token (every token that starts with a closer whose "
    "opener is >= 5 tokens back, merged ones such as ')' + ':' too), held-out stdlib code",
    "code_after_closer": "log-prob of the token after each such closing bracket, held-out stdlib code",
    "code_after_name": "log-prob of the token after each re-used name, held-out stdlib code",
    "code_loss": "next-token loss on held-out stdlib code",
    "prose_loss": "next-token loss on held-out prose (reference docs and docstrings)",
    "successor": "log-prob of the 4th ordinal after three ('Monday Tuesday Wednesday' -> ' Thursday')",
}
"""Every task's metric, in words."""

LABEL_TASKS = {
    "previous_token": LabelTask("feeds the keys of induction heads: the token before each position", "repeat_loss"),
    "duplicate_token": LabelTask("marks tokens seen before (feeds copying)", "repeat_loss"),
    "induction": LabelTask("in-context copying: [A][B] ... [A] -> [B]", "repeat_loss"),
    "copy_suppression": LabelTask(
        "pushes down tokens that are copied from earlier in the context", "repeat_loss", expected_sign=-1
    ),
    "delimiter": LabelTask("reads punctuation and line structure in code", "code_loss"),
    "successor": LabelTask("outputs the next item of an ordinal sequence", "successor", expected_sign=-1),
    "bracket_matching": LabelTask(
        "before a closer, finds the opener it closes: predicts which closer comes", "code_closer", expected_sign=-1
    ),
    "closer_to_opener": LabelTask(
        "at a closer, reads its own opener: what follows the closed bracket", "code_after_closer", expected_sign=-1
    ),
    "identifier": LabelTask(
        "at a re-used name, reads its earlier uses: what follows the name", "code_after_name", expected_sign=-1
    ),
    "first_token": LabelTask("parks attention on position 0 (the sink): a way to do nothing; no causal claim", None),
    "local": LabelTask("reads the last few tokens (local context)", "prose_loss", max_heads=20),
    "positional": LabelTask(
        "attends by distance whatever the content; what it feeds is not claimed (no causal claim)", None
    ),
}
"""The built-in labels' behaviours and tasks (``docs/head_types.md`` has the table; a label not listed is
descriptive)."""


@dataclass(frozen=True)
class TaskData:
    """A task's evaluation metric, the tokens its ablation means are taken over, and where both came from.

    ``eval_sources`` / ``reference_sources``: ``"file.py@token"`` windows (``seq_len`` tokens each) for text tasks,
    ``"repeated@<generator seed>#<row>"`` for random tokens, ``"ordinals"`` for the successor prompts.
    """

    task: str
    metric: Metric
    reference: Int[Tensor, "batch pos"]
    eval_sources: tuple[str, ...]
    reference_sources: tuple[str, ...]
    seq_len: int


def next_token_logprob(tokens: Tensor, marked: Bool[Tensor, "batch pos"], name: str) -> Metric:
    """Mean log-prob of token q + 1 at the positions q that ``marked[b, q]`` selects; only the positions marked in
    some sequence are unembedded, and the tokens end at the last one's next token (a causal model's logits there
    do not depend on later tokens, so the forwards are shorter and the metric is the same)."""
    before = marked.clone()
    before[:, -1] = False  # the last position has no next token
    positions = before.any(0).nonzero()[:, 0]
    if len(positions):
        tokens = tokens[:, : int(positions[-1]) + 2]
    chosen = before[:, positions]

    def fn(logits, toks):
        lp = logits.log_softmax(-1).gather(-1, toks[:, positions.to(toks.device) + 1, None])[..., 0]
        return lp[chosen.to(lp.device)].mean()

    return Metric(name, tokens, fn, True, positions)


def after_closer(closer: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """``CodeProbe.closer`` marks the token before each closer; this marks the closer itself."""
    out = torch.zeros_like(closer)
    out[:, 1:] = closer[:, :-1]
    return out


def successor_metric(model: HookedTransformer) -> Metric:
    """Log-prob of the 4th item after three consecutive single-token ordinals of one sequence (days, months, ...)."""
    ids, succ, names = ordinal_tokens(model)
    prompts, answers = [], []
    tasks = [n.split(":")[0] for n in names]
    for i in range(len(ids)):
        chain = [i]
        while len(chain) < 4 and succ[chain[-1]] >= 0 and tasks[succ[chain[-1]]] == tasks[i]:
            chain.append(int(succ[chain[-1]]))
        if len(chain) == 4:
            prompts.append([int(ids[j]) for j in chain[:3]])
            answers.append(int(ids[chain[3]]))
    target = torch.tensor(answers)

    def fn(logits, toks):
        return logits[:, -1].log_softmax(-1).gather(-1, target.to(logits.device)[:, None]).mean()

    tokens = torch.tensor(prompts)  # only the last position is read: only it is unembedded
    return Metric("successor_logprob", tokens, fn, True, torch.tensor([tokens.shape[1] - 1]))


def _repeated(model: HookedTransformer, n_seqs: int, seed: int):
    probe = repeated_tokens(model, n=HALF_LEN, n_seqs=n_seqs, seed=seed)
    return probe, tuple(f"repeated@{seed}#{row}" for row in range(n_seqs))


def task_data(model: HookedTransformer, task: str, *, n_seqs: int = 8, seed: int = 0) -> TaskData:
    """The evaluation metric of ``task`` (``eval`` split / evaluation seeds) and its ablation reference
    (``reference`` split / reference seeds), ``n_seqs`` sequences each."""
    check_model(model)
    if task not in TASKS:
        raise HeadlensError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    n_seqs = check_count("n_seqs", n_seqs)
    if task == "repeat_loss":
        probe, sources = _repeated(model, n_seqs, EVAL_SEEDS + int(seed))
        ref, ref_sources = _repeated(model, n_seqs, REFERENCE_SEEDS + int(seed))
        return TaskData(task, repeat_loss_metric(model, probe=probe), ref.tokens, sources, ref_sources, probe.seq_len)
    if task in ("prose_loss", "successor"):
        ref = natural_text(model, seq_len=SEQ_LEN, n_seqs=n_seqs, seed=seed, split="reference")
        if task == "successor":
            metric = successor_metric(model)
            return TaskData(task, metric, ref.tokens, ("ordinals",), ref.sources, SEQ_LEN)
        probe = natural_text(model, seq_len=SEQ_LEN, n_seqs=n_seqs, seed=seed, split="eval")
        metric = Metric("prose_loss", probe.tokens, lm_cross_entropy_loss)
        return TaskData(task, metric, ref.tokens, probe.sources, ref.sources, SEQ_LEN)
    probe = code_probe(model, seq_len=SEQ_LEN, n_seqs=n_seqs, seed=seed, split="eval", min_pairs=1)
    ref = code_probe(model, seq_len=SEQ_LEN, n_seqs=n_seqs, seed=seed, split="reference", min_pairs=1)
    if task == "code_loss":
        metric = Metric("code_loss", probe.tokens, lm_cross_entropy_loss)
    else:
        marked = {
            "code_closer": probe.closer,
            "code_after_closer": after_closer(probe.closer),
            "code_after_name": probe.ident.any(-1),
        }[task]
        metric = next_token_logprob(probe.tokens, marked, f"{task}_logprob")
    return TaskData(task, metric, ref.tokens, probe.sources, ref.sources, SEQ_LEN)


def spans(sources, seq_len: int) -> set[tuple[str, int]]:
    """Every (document, token) a list of ``"document@start"`` windows covers."""
    out = set()
    for s in sources:
        if "@" in s and not s.startswith("repeated@"):
            doc, start = s.rsplit("@", 1)
            out |= {(doc, t) for t in range(int(start), int(start) + seq_len)}
    return out


def check_held_out(data: TaskData, scoring_sources=(), scoring_seq_len: int = SEQ_LEN) -> None:
    """Raise a HeadlensError when ``data``'s evaluation data share a file, a token or a random-token generator with
    its reference data or with ``scoring_sources`` (the census probes' windows), or lie outside their split."""
    named = {
        "evaluation": (data.eval_sources, data.seq_len, "eval"),
        "reference": (data.reference_sources, data.seq_len, "reference"),
        "scoring": (tuple(scoring_sources), scoring_seq_len, "score"),
    }
    text = {k: [s for s in v[0] if "@" in s and not s.startswith("repeated@")] for k, v in named.items()}
    units = {k: {document_unit(s) for s in v} for k, v in text.items()}
    generators = {k: {s.split("#")[0] for s in v[0] if s.startswith("repeated@")} for k, v in named.items()}
    for a, b in (("evaluation", "reference"), ("evaluation", "scoring"), ("reference", "scoring")):
        if units[a] & units[b]:
            raise HeadlensError(f"{data.task}: {a} and {b} data share files: {sorted(units[a] & units[b])[:3]}")
        shared = spans(text[a], named[a][1]) & spans(text[b], named[b][1])
        if shared:
            raise HeadlensError(f"{data.task}: {a} and {b} data share {len(shared)} tokens")
        if generators[a] & generators[b]:
            raise HeadlensError(f"{data.task}: {a} and {b} random tokens share a generator seed")
    for what, (_, _, split) in named.items():
        wrong = sorted(f for f in units[what] if split_of(f) != split)
        if wrong:
            raise HeadlensError(f"{data.task}: {what} data from files outside the {split} split: {wrong[:3]}")


def strongest(table: pd.DataFrame, label: str, max_heads: int | None, n_heads_per_layer: int) -> list[tuple[int, int]]:
    """A label's heads, strongest label score first; with ``max_heads``, at most that many and at most half of any
    layer (so that every layer keeps as many other heads for a layer-matched random set)."""
    part = table[table["label"] == label]
    if "label_score" in part:
        part = part.sort_values("label_score", ascending=False, kind="stable")
    ranked = [(int(r.layer), int(r.head)) for r in part.itertuples()]
    if max_heads is None:
        return sorted(ranked)
    out, per = [], {}
    for layer, head in ranked:
        if per.get(layer, 0) < n_heads_per_layer // 2 and len(out) < max_heads:
            out.append((layer, head))
            per[layer] = per.get(layer, 0) + 1
    return sorted(out)


def verdict(sign: int, target: float, random: np.ndarray) -> str:
    """``supported``: the target's effect points the expected way and beats every random set's; else ``no evidence``."""
    return "supported" if sign * target > 0 and bool((sign * target > sign * random).all()) else "no evidence"


def ratio_interval(target: float, rand, *, seed: int = 0, n_boot: int = 2000) -> dict[str, float]:
    """``ratio`` = ``target`` effect / mean of the random sets' effects ``rand``, with a 95 % interval from resampling
    the random sets (``ratio_lo``, ``ratio_hi``): how much the verdict leans on which random sets were drawn. It does
    not cover the evaluation data: that is one draw."""
    rand = np.asarray(rand, dtype=float)
    g = np.random.default_rng(int(seed))
    boot = rand[g.integers(0, len(rand), (int(n_boot), len(rand)))].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = target / boot
    return {
        "ratio": float(target / rand.mean()) if rand.mean() != 0 else float("nan"),
        "ratio_lo": float(np.nanpercentile(ratios, 2.5)),
        "ratio_hi": float(np.nanpercentile(ratios, 97.5)),
    }


def causal_row(
    label: str,
    heads,
    clean: float,
    target: float,
    rand: np.ndarray,
    task: TaskData,
    *,
    seed: int = 0,
    n_boot: int = 2000,
) -> dict:
    """The test's columns for one label: its ablated heads' ``target`` effect vs the random sets' effects ``rand``
    (both: ablated metric - ``clean``), ratio with its interval (the random draws resampled), ``p_random_ge``,
    ``verdict``, and what the task evaluated on. :func:`causal_validation` and ``headlens.analysis.evidence`` (which
    batches the same ablations) both build their rows here."""
    spec = LABEL_TASKS[label]
    rand = np.asarray(rand, dtype=float)
    sign = spec.expected_sign
    return {
        "metric": TASKS[spec.task],
        "n_heads": len(heads),
        "clean": clean,
        "target_effect": target,
        "random_mean": float(rand.mean()),
        "random_min": float(rand.min()),
        "random_max": float(rand.max()),
        **ratio_interval(target, rand, seed=seed, n_boot=n_boot),
        "expected_sign": sign,
        "p_random_ge": float((sign * rand >= sign * target).mean()),
        "n_random": len(rand),
        "verdict": verdict(sign, target, rand),
        "heads": format_heads(heads),
        "eval_sequences": int(task.metric.tokens.shape[0]),
        "eval_files": len({document_unit(s) for s in task.eval_sources}),
    }


DRAWS = 1000
"""Random draw ``i`` of a check at ``seed`` is seeded ``seed * DRAWS + i``, ``i < DRAWS``: seeds never share a draw."""


def layer_matched_sets(model: HookedTransformer, heads, n_random: int, seed: int = 0) -> list:
    """``n_random`` distinct layer-matched random sets for ``heads`` (all there are when fewer exist, e.g. 13 for one
    head of a 14-head layer), draw ``i`` seeded ``seed * DRAWS + i``."""
    return random_sets(model, heads, n_random, lambda i: int(seed) * DRAWS + i, max_draws=DRAWS)


def label_plan(model: HookedTransformer, table: pd.DataFrame, label: str, n_random: int, seed: int = 0):
    """A tested label's heads (:func:`strongest`, at most ``max_heads``) and its random sets
    (:func:`layer_matched_sets`)."""
    check_model(model)
    heads = strongest(table, label, LABEL_TASKS[label].max_heads, model.cfg.n_heads)
    return heads, layer_matched_sets(model, heads, n_random, seed)


def chosen_labels(table: pd.DataFrame, labels) -> list[str] | None:
    """``labels`` (one name, or a list) when every one labels some head of ``table``; None stays None. A name no head
    carries (misspelt, or of another census) would silently drop out of the result."""
    if labels is None:
        return None
    labels = [labels] if isinstance(labels, str) else list(labels)
    present = set(table["label"])
    absent = [lb for lb in labels if lb not in present]
    if absent or not labels:
        raise HeadlensError(
            f"no head of the census is labelled {absent or labels}: choose from {', '.join(sorted(map(str, present)))}"
        )
    return labels


def causal_validation(
    model: HookedTransformer,
    table: pd.DataFrame,
    *,
    labels: list[str] | None = None,
    n_random: int = 20,
    method: str = "mean",
    n_seqs: int = 8,
    seed: int = 0,
    n_boot: int = 2000,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per label: its behaviour, task and metric, the heads ablated, target effect, random effects (mean,
    min, max), ratio with interval, ``p_random_ge`` (share of random draws at least as large as the target's in the
    expected direction) and the ``verdict``. Labels without a task get a ``descriptive`` row.

    ``labels``: default every label of :data:`LABEL_TASKS` present in ``table``; ``n_seqs``: evaluation (and
    reference) sequences per task.
    """
    check_model(model)
    check_census_table(table, model)
    if labels is None:
        labels = [lb for lb in LABEL_TASKS if lb in set(table["label"])]
    else:
        labels = [labels] if isinstance(labels, str) else list(labels)
        unknown = [lb for lb in labels if lb not in LABEL_TASKS]
        if unknown:
            raise HeadlensError(f"no behaviour is defined for labels {unknown}; known: {', '.join(LABEL_TASKS)}")
        labels = chosen_labels(table, labels) if labels else labels
    n_random = check_count("n_random", n_random, minimum=2, why="an interval needs two random sets")
    tasks = dict.fromkeys(LABEL_TASKS[lb].task for lb in labels if LABEL_TASKS[lb].task)
    data = {task: task_data(model, task, n_seqs=n_seqs, seed=seed) for task in tasks}  # all data before any ablation
    rows = []
    for label in labels:
        spec = LABEL_TASKS[label]
        n_label = int((table["label"] == label).sum())
        row = {"label": label, "behaviour": spec.behaviour, "task": spec.task or "", "n_label_heads": n_label}
        if spec.task is None:
            rows.append({**row, "metric": "", "verdict": "descriptive"})
            continue
        heads, drawn = label_plan(model, table, label, n_random, seed)
        task = data[spec.task]
        reference = None if method == "zero" else task.reference  # zero ablation reads none
        clean, values = ablated_metrics(  # one set per forward: each restarts at its first layer from the clean run
            model, task.metric, [heads, *drawn], method=method, reference=reference, seed=seed,
            batch_size=task.metric.tokens.shape[0], progress=progress,
        )  # fmt: skip
        target, rand = values[0] - clean, np.asarray(values[1:]) - clean
        rows.append({**row, **causal_row(label, heads, clean, target, rand, task, seed=seed, n_boot=n_boot)})
        if progress:
            tqdm.write(
                f"{label}: {rows[-1]['verdict']} (target {target:+.3f}, random {rand.min():+.3f}..{rand.max():+.3f})"
            )
    return pd.DataFrame(rows)


def key_path_effects(
    model: HookedTransformer,
    senders: list[tuple[int, int]],
    receivers: list[tuple[int, int]],
    *,
    n_random: int = 20,
    method: str = "mean",
    n_seqs: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """The repeated-half loss when ``senders`` are mean-ablated only on the path into the *keys* of ``receivers``
    (everything else clean), against ``n_random`` layer-matched sender sets; one row per set (``kind`` target /
    random, ``effect`` = patched - clean).

    The senders are ablated in a first run whose keys at the receivers' layers are kept; a second, clean run takes
    those keys for the kv heads the receivers read (GQA: every q head of such a group reads them) and nothing else.
    """
    data = task_data(model, "repeat_loss", n_seqs=n_seqs, seed=seed)
    metric, tokens = data.metric, data.metric.tokens.to(model.cfg.device)
    groups = {}
    for layer, head in receivers:
        groups.setdefault(layer, set()).add(kv_heads(model)[head])
    if any(layer <= min(s[0] for s in senders) for layer in groups):
        raise HeadlensError("every receiver must sit in a later layer than the senders")
    clean = clean_metric(model, metric)
    sets = [("target", senders)] + [("random", heads) for heads in layer_matched_sets(model, senders, n_random, seed)]
    rows = []
    for kind, heads in sets:
        kept = {}

        def keep(k, hook, kept=kept):
            kept[hook.layer()] = k.clone()
            return k

        def swap(k, hook, kept=kept):
            idx = sorted(groups[hook.layer()])
            k[:, :, idx] = kept[hook.layer()][:, :, idx]
            return k

        reference = None if method == "zero" else data.reference  # zero ablation reads none
        hooks = ablation_hooks(model, heads, method=method, reference=reference, seed=seed)
        names = [get_act_name("k", layer) for layer in sorted(groups)]
        with torch.inference_mode():
            model.run_with_hooks(tokens, fwd_hooks=hooks + [(n, keep) for n in names], stop_at_layer=max(groups) + 1)
            value = float(metric.full(model.run_with_hooks(tokens, fwd_hooks=[(n, swap) for n in names])))
        rows.append({"kind": kind, "heads": format_heads(heads), "metric": value, "effect": value - clean})
    return pd.DataFrame(rows)

"""Path patching and edge ablation: one driver that corrupts chosen edges of the graph and reads a metric.

An edge run (Goldowsky-Dill et al. 2023 "Localizing model behavior with path patching"; Wang et al. 2022 for IOI)
starts from the clean run. For each corrupted edge ``s -> r[i]`` the receiver's input ``i`` becomes

    input_r = (input_r in this run) + (source_s - output_s in this run)

and nothing else is touched: every other receiver reads every sender as it is in this run, and everything downstream
of ``r`` is recomputed. ``source_s`` is sender ``s``'s output on the corrupted prompt (``ablation="resample"``: path
patching proper; one corrupted edge = the path-patching effect of ``s`` on ``r`` through ``i``) or its mean over a
separate set of prompts of the same task (``ablation="mean"``, per position). For a key input the queries stay clean
(only the k slot of ``r`` changes), and with GQA only ``r``'s own copy of its kv head's keys does
(:mod:`headlens.circuits.graph`). Corrupting every edge out of one sender equals patching that sender's output
everywhere (TransformerLens' ``get_act_patch_attn_head_out_all_pos`` from the corrupted cache into the clean run);
corrupting every edge reproduces the corrupted (or the mean) run.

The driver follows :func:`headlens.engine.intervene.run_interventions`: the clean run's ``resid_pre`` of every layer is
cached once, runs are grouped by the first layer they touch and restarted there (``start_at_layer``), ``k`` runs are
stacked along the batch axis of one forward, and only the metric's positions are unembedded. Senders that write
before the restart layer are the clean run's (cached, ``[batch pos sender d_model]``); later senders are read in the
stacked forward (``hook_z @ W_O`` per head, ``hook_mlp_out``) and only where a run corrupts one of their edges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.circuits.graph import LOGITS, Graph
from headlens.data.probes import check_token_ids
from headlens.engine.intervene import LOGITS_BUDGET, Metric, unembed_at, value
from headlens.errors import HeadlensError, check_count, check_model
from headlens.progress import tqdm

ABLATIONS = ("resample", "mean")
ACT_BUDGET = 2**27
"""Most floats the stacked runs of one pass may hold in sender outputs and split head inputs (bounds ``k``)."""
EdgeRun = tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
"""The corrupted edges of one run: (sender indices, slot indices)."""


# ---------------------------------------------------------------- model mode


@contextlib.contextmanager
def split_inputs(model: HookedTransformer) -> Iterator[None]:
    """Run with per-head q/k/v inputs (``use_split_qkv_input``), k/v per q head (``ungroup_grouped_query_attention``)
    and an MLP input hook (``use_hook_mlp_in``): the receiver slots of the graph. Same logits; restored after."""
    check_model(model)
    cfg = model.cfg
    before = (cfg.use_split_qkv_input, cfg.ungroup_grouped_query_attention, cfg.use_hook_mlp_in)
    cfg.use_split_qkv_input = True
    cfg.ungroup_grouped_query_attention = cfg.n_key_value_heads is not None
    cfg.use_hook_mlp_in = True
    try:
        yield
    finally:
        cfg.use_split_qkv_input, cfg.ungroup_grouped_query_attention, cfg.use_hook_mlp_in = before


def slot_hook(layer: int, kind: str) -> str:
    """The TransformerLens hook holding the receiver inputs of ``kind`` at ``layer`` (split-input mode)."""
    return f"blocks.{layer}.hook_mlp_in" if kind == "mlp" else f"blocks.{layer}.hook_{kind}_input"


# ---------------------------------------------------------------- one recorded run


@dataclass
class Run:
    """One forward's metric, the residual stream entering each layer (``resid[n_layers]``: the final one), the one
    entering each MLP (``mid``; empty for attention-only models) and every sender's output
    ``[batch pos sender d_model]``."""

    metric: float
    resid: list[Float[Tensor, "batch pos d_model"]]
    outputs: Float[Tensor, "batch pos sender d_model"]
    mid: list[Float[Tensor, "batch pos d_model"]] = field(default_factory=list)


def head_outputs(
    z: Float[Tensor, "batch pos head d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "batch pos head d_model"]:
    """Each head's write into the residual stream, ``z_h @ W_O[h]`` (``b_O`` excluded: it is no head's)."""
    return einops.einsum(z, W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")


def check_tokens(model: HookedTransformer, **tokens: Tensor | None) -> None:
    """Refuse, before any forward, token batches (by name; None: not given) that are not ``[batch, pos]`` ids of
    ``model``'s vocabulary (an id of -1 would read the embedding table from its end), or hold no token."""
    check_model(model)
    for what, batch in tokens.items():
        if batch is not None:
            check_token_ids(model, batch, f"{what.replace('_', ' ')}")
            if batch.ndim != 2 or not batch.numel():
                raise HeadlensError(
                    f"{what.replace('_', ' ')} must be a non-empty [batch, pos] tensor, got {tuple(batch.shape)}"
                )


def record(model: HookedTransformer, graph: Graph, tokens: Int[Tensor, "batch pos"], metric: Metric | None) -> Run:
    """One forward (split-input mode expected): metric, ``resid_pre`` of every layer and every sender's output."""
    check_tokens(model, tokens=tokens)
    b, p = tokens.shape
    outputs = torch.zeros(b, p, graph.n_senders, model.cfg.d_model, dtype=torch.float32, device=tokens.device)
    resid: list[Tensor] = [None] * (graph.n_layers + 1)
    mid: list[Tensor] = [None] * graph.n_layers if graph.has_mlp else []

    def keep_mid(act, hook):
        mid[hook.layer()] = act.detach()

    def keep_resid(act, hook):
        layer = hook.layer()
        resid[layer] = act.detach()
        if layer == 0:
            outputs[:, :, 0] = act.detach().float()

    def keep_z(z, hook):
        layer = hook.layer()
        first = graph.head_sender(layer, 0)
        outputs[:, :, first : first + graph.n_heads] = head_outputs(z.detach(), model.blocks[layer].attn.W_O).float()

    def keep_mlp(act, hook):
        outputs[:, :, graph.mlp_sender(hook.layer())] = act.detach().float()

    hooks = []
    for layer in range(graph.n_layers):
        hooks += [(f"blocks.{layer}.hook_resid_pre", keep_resid), (f"blocks.{layer}.attn.hook_z", keep_z)]
        if graph.has_mlp:
            hooks += [(f"blocks.{layer}.hook_mlp_out", keep_mlp), (f"blocks.{layer}.hook_resid_mid", keep_mid)]
    with torch.inference_mode():
        final = model.run_with_hooks(tokens, stop_at_layer=graph.n_layers, fwd_hooks=hooks)
        resid[graph.n_layers] = final
        m = float("nan") if metric is None else value(metric(unembed_at(model, final, metric.positions)))
    return Run(m, resid, outputs, mid)


def mean_run(model: HookedTransformer, graph: Graph, tokens: Int[Tensor, "n_seqs pos"], *, batch_size: int = 8) -> Run:
    """Sender outputs and residual streams averaged over ``tokens`` (a separate set of prompts of the task), per
    position (batch axis of size 1)."""
    check_model(model)
    if tokens.ndim != 2 or len(tokens) == 0:
        raise HeadlensError("mean ablation needs a non-empty [n_seqs, pos] batch of prompts to average over")
    total = None
    for start in range(0, len(tokens), batch_size):
        run = record(model, graph, tokens[start : start + batch_size], None)
        parts = [run.outputs, *run.resid, *run.mid]
        sums = [x.float().sum(0, keepdim=True) for x in parts]
        total = sums if total is None else [a + b for a, b in zip(total, sums)]
    means = [x / len(tokens) for x in total]
    n = graph.n_layers + 1
    return Run(float("nan"), means[1 : 1 + n], means[0], means[1 + n :])


def mean_outputs(
    model: HookedTransformer, graph: Graph, tokens: Int[Tensor, "n_seqs pos"], *, batch_size: int = 8
) -> Float[Tensor, "1 pos sender d_model"]:
    """Every sender's output averaged over ``tokens`` (a separate set of prompts of the task), per position."""
    return mean_run(model, graph, tokens, batch_size=batch_size).outputs


# ---------------------------------------------------------------- the setting of a set of runs


@dataclass
class Setting:
    """What edge runs share: the graph, the clean run, the source of corrupted edges and the metric.

    ``source`` is ``[batch pos sender d_model]`` (resample: the corrupted run's outputs) or ``[1 pos sender d_model]``
    (mean); ``source_run`` holds the matching residual streams (the sum of all sources, used when a run keeps fewer
    edges into a receiver than it corrupts); ``corrupted`` is the metric with every edge corrupted (the corrupted
    run's metric for resample).
    """

    graph: Graph
    clean: Run
    source: Float[Tensor, "_ pos sender d_model"]
    metric: Metric
    ablation: str
    corrupted: float = float("nan")
    source_run: Run | None = None


def prepare_pair(
    model: HookedTransformer, pair, *, mean_tokens=None, ablation: str = "resample", graph=None
) -> Setting:
    """:func:`prepare` for a prompt pair (``clean``, ``corrupted``, ``metric``): what every edge-ablation study starts from."""
    check_model(model)
    return prepare(
        model,
        pair.clean,
        pair.metric,
        corrupted=pair.corrupted,
        mean_tokens=mean_tokens,
        ablation=ablation,
        graph=graph,
    )


def prepare(
    model: HookedTransformer,
    clean: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    corrupted: Int[Tensor, "batch pos"] | None = None,
    mean_tokens: Int[Tensor, "n_seqs pos"] | None = None,
    ablation: str = "resample",
    graph: Graph | None = None,
) -> Setting:
    """Record the clean run and the source of corrupted edges (split-input mode expected)."""
    check_model(model)
    if ablation not in ABLATIONS:
        raise HeadlensError(f"unknown ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
    check_tokens(model, clean_tokens=clean, corrupted_tokens=corrupted, mean_tokens=mean_tokens)
    graph = graph or Graph.of(model)
    base = record(model, graph, clean, metric)
    if ablation == "resample":
        if corrupted is None:
            raise HeadlensError("resample ablation needs the corrupted prompts")
        if corrupted.shape != clean.shape:
            raise HeadlensError(f"corrupted tokens {tuple(corrupted.shape)} must match clean {tuple(clean.shape)}")
        other = record(model, graph, corrupted, metric)
        return Setting(graph, base, other.outputs, metric, ablation, other.metric, other)
    if mean_tokens is None:
        raise HeadlensError(
            "mean ablation needs a separate set of prompts of the same task to average over (mean_tokens); "
            "a user pair has none: use ablation='resample'"
        )
    if mean_tokens.shape[1] != clean.shape[1]:
        raise HeadlensError(
            f"the mean prompts have {mean_tokens.shape[1]} tokens, the clean ones {clean.shape[1]}: positional means "
            "need prompts of the same length"
        )
    means = mean_run(model, graph, mean_tokens.to(clean.device))
    return Setting(graph, base, means.outputs, metric, ablation, source_run=means)


# ---------------------------------------------------------------- the driver


def _restart_layer(graph: Graph, run: EdgeRun) -> int:
    _, slots = run
    if len(slots) == 0:
        return graph.n_layers
    return min(graph.slots[int(r)].layer for r in torch.unique(slots))


def _late_senders(graph: Graph, run: EdgeRun, layer: int) -> set[int]:
    """The senders of ``run`` that write at or after the restart ``layer`` (read in the stacked forward)."""
    first_late = 1 + layer * graph.per_layer
    return {int(s) for s in torch.unique(run[0]) if int(s) >= first_late}


def run_edges(
    model: HookedTransformer,
    setting: Setting,
    runs: Sequence[EdgeRun],
    *,
    runs_per_pass: int = 16,
    progress: bool = True,
    desc: str = "edge runs",
) -> list[float]:
    """The metric after each run's corrupted edges (see the module docstring); split-input mode expected.

    Runs restarting at the same layer share a forward, ``runs_per_pass`` at most, fewer where the logits
    (:data:`headlens.engine.intervene.LOGITS_BUDGET`) or the stacked activations (:data:`ACT_BUDGET`) say so.
    """
    check_model(model)
    runs_per_pass = check_count("runs_per_pass", runs_per_pass)
    if not runs:
        return []
    graph, clean = setting.graph, setting.clean
    b, p, _, d = clean.outputs.shape
    n_pos = p if setting.metric.positions is None else len(setting.metric.positions)
    restart = [_restart_layer(graph, run) for run in runs]
    order = sorted(range(len(runs)), key=lambda i: restart[i])
    out = [float("nan")] * len(runs)
    early = setting.source - clean.outputs  # batch pos sender d: what a corrupted edge from an early sender adds
    bar = tqdm(total=len(runs), desc=desc, disable=not progress, leave=False)
    i = 0
    while i < len(order):
        layer = restart[order[i]]
        job, late = [order[i]], _late_senders(graph, runs[order[i]], layer)
        while i + len(job) < len(order) and restart[order[i + len(job)]] == layer and len(job) < int(runs_per_pass):
            nxt = order[i + len(job)]
            union = late | _late_senders(graph, runs[nxt], layer)
            k = len(job) + 1
            if (
                k * b * n_pos * model.cfg.d_vocab_out > LOGITS_BUDGET
                or k * b * p * d * (len(union) + 3 * graph.n_heads) > ACT_BUDGET
            ):
                break
            job.append(nxt)
            late = union
        values = _one_pass(model, setting, [runs[j] for j in job], layer, early)
        for j, v in zip(job, values):
            out[j] = v
        i += len(job)
        bar.update(len(job))
    bar.close()
    return out


def _one_pass(  # noqa: C901 - one stacked forward and the hooks that share its tensors (split, they would pass 9 arrays)
    model: HookedTransformer, setting: Setting, runs: list[EdgeRun], layer: int, early: Tensor
) -> list[float]:
    """``k`` runs restarting at ``layer``, stacked along the batch axis of one forward.

    A receiver's correction is ``sum_s mask[k, s, n] * (source_s - output_s)`` over its corrupted edges. Senders before
    ``layer`` are the clean run's: their ``early`` differences are shared by all ``k`` runs (``E``). Later senders
    are read in this forward, per run (``L[k]``), only those some run needs. Where a run keeps fewer edges into a
    receiver than it corrupts (a small circuit), the same input is built from the other side: the source's residual
    stream plus ``sum over kept edges of (output_s - source_s)``, which costs as many senders as are kept.
    """
    graph, clean, source = setting.graph, setting.clean, setting.source
    k = len(runs)
    b, p, _, d = clean.outputs.shape
    device = clean.outputs.device
    valid = graph.valid.to(device)
    mask = torch.zeros(k, graph.n_senders, graph.n_slots, dtype=torch.bool, device=device)
    for j, (s, r) in enumerate(runs):
        mask[j, s.to(device), r.to(device)] = True
    if bool((mask & ~valid).any()):
        raise HeadlensError("an edge run names a sender that writes after its receiver reads: not an edge")
    first_late = 1 + layer * graph.per_layer
    groups = []  # (slot range, hook name or None for the logits, per-head input?, complement?)
    for l in range(layer, graph.n_layers + 1):
        for kind in ("q", "k", "v", "mlp") if l < graph.n_layers else (LOGITS,):
            if kind == "mlp" and not graph.has_mlp:
                continue
            sl = graph.layer_slots(l, kind)
            ablated = int(mask[:, :, sl].sum())
            if not ablated:
                continue
            kept = k * int(valid[:, sl].sum()) - ablated
            complement = setting.source_run is not None and kept < ablated
            groups.append((l, kind, sl, complement))
    # the senders whose differences some group reads: those with a corrupted edge, or with a kept one where the
    # group is built from the source's side
    need = torch.zeros(graph.n_senders, dtype=torch.bool, device=device)
    for _, _, sl, complement in groups:
        m = (valid[:, sl] & ~mask[:, :, sl]) if complement else mask[:, :, sl]
        need |= m.any(0).any(1) if m.ndim == 3 else m.any(1)
    used = torch.nonzero(need).flatten().tolist()
    early_ids = [s for s in used if s < first_late]
    late_ids = [s for s in used if s >= first_late]
    late_pos = {s: j for j, s in enumerate(late_ids)}
    E = einops.rearrange(early[:, :, early_ids], "b p s d -> s (b p d)").float() if early_ids else None
    L = torch.zeros(k, len(late_ids), b * p * d, device=device) if late_ids else None
    W_O = [block.attn.W_O for block in model.blocks]

    def keep_late(s: int, current: Tensor) -> None:  # current: (k b) p d
        delta = source[:, :, s].unsqueeze(0) - current.float().view(k, b, p, d)
        L[:, late_pos[s]] = delta.reshape(k, -1)

    def keep_z(z, hook):
        l = hook.layer()
        for h in range(graph.n_heads):
            s = graph.head_sender(l, h)
            if s in late_pos:
                keep_late(s, z[:, :, h] @ W_O[l][h])

    def keep_mlp(act, hook):
        keep_late(graph.mlp_sender(hook.layer()), act)

    def weighted(m: Tensor) -> Tensor | None:
        """``sum_s m[k, s, n] * (source_s - output_s)`` as ``[k, n, (b p d)]`` over the senders used (None: no term)."""
        out = None
        if E is not None:
            me = m[:, early_ids]
            if bool(me.any()):
                out = einops.einsum(me.float(), E, "k s n, s x -> k n x")
        if L is not None:
            ml = m[:, late_ids]
            rows = torch.nonzero(ml.any(0).any(1)).flatten()
            if len(rows):
                if len(rows) < len(late_ids) // 4:  # few senders: gather them
                    part = torch.bmm(ml[:, rows].float().transpose(1, 2), L[:, rows])
                else:
                    hi = int(rows.max()) + 1  # a prefix view, no copy
                    part = torch.bmm(ml[:, :hi].float().transpose(1, 2), L[:, :hi])
                out = part if out is None else out + part
        return out

    def correction(l: int, kind: str, sl: slice, complement: bool, act: Tensor) -> Tensor:
        """The new input of the slots ``sl`` (``[k, b, p, n, d]``) from this run's input ``act`` (same shape)."""
        if not complement:
            upd = weighted(mask[:, :, sl])
            return act + einops.rearrange(upd, "k n (b p d) -> k b p n d", b=b, p=p).to(act.dtype)
        src = setting.source_run
        base = src.resid[l] if kind in ("q", "k", "v", LOGITS) else src.mid[l]  # (1|b) p d
        new = base.to(act.dtype)[None, :, :, None, :].expand_as(act)
        keep = valid[None, :, sl] & ~mask[:, :, sl]
        upd = weighted(keep)
        if upd is None:
            return new.clone()
        return new - einops.rearrange(upd, "k n (b p d) -> k b p n d", b=b, p=p).to(act.dtype)

    def correct(l: int, kind: str, sl: slice, complement: bool):
        def hook(act, hook):
            heads = kind in ("q", "k", "v")
            view = act.view(k, b, *act.shape[1:])
            view = view if heads else view[:, :, :, None, :]
            new = correction(l, kind, sl, complement, view)
            return (new if heads else new[:, :, :, 0]).flatten(0, 1)

        return hook

    hooks = []
    for l in range(layer, graph.n_layers):
        if any(graph.head_sender(l, h) in late_pos for h in range(graph.n_heads)):
            hooks.append((f"blocks.{l}.attn.hook_z", keep_z))
        if graph.has_mlp and graph.mlp_sender(l) in late_pos:
            hooks.append((f"blocks.{l}.hook_mlp_out", keep_mlp))
    for l, kind, sl, complement in groups:
        if kind != LOGITS:
            hooks.append((slot_hook(l, kind), correct(l, kind, sl, complement)))
    x = einops.repeat(clean.resid[layer], "b p d -> (k b) p d", k=k)
    with torch.inference_mode():
        if layer < graph.n_layers:
            resid = model.run_with_hooks(x, start_at_layer=layer, stop_at_layer=graph.n_layers, fwd_hooks=hooks)
        else:
            resid = x
        for l, kind, sl, complement in groups:
            if kind == LOGITS:
                view = resid.view(k, b, p, 1, d)
                resid = correction(l, kind, sl, complement, view)[:, :, :, 0].flatten(0, 1)
        logits = unembed_at(model, resid, setting.metric.positions)
        logits = logits.view(k, b, *logits.shape[1:])
        return [value(setting.metric(logits[j])) for j in range(k)]


# ---------------------------------------------------------------- thin variants


def single_edges(graph: Graph, senders: np.ndarray, slots: np.ndarray) -> list[EdgeRun]:
    """One run per edge ``(senders[i], slots[i])``."""
    return [(torch.tensor([int(s)]), torch.tensor([int(r)])) for s, r in zip(senders, slots)]


def sender_runs(graph: Graph, senders: Sequence[int]) -> list[EdgeRun]:
    """One run per sender: every edge out of it (= patching its output wherever it is read)."""
    valid = graph.valid
    runs = []
    for s in senders:
        r = torch.nonzero(valid[int(s)]).flatten()
        runs.append((torch.full_like(r, int(s)), r))
    return runs


def mask_run(mask: torch.Tensor) -> EdgeRun:
    """A run from a boolean ``[sender, slot]`` mask of corrupted edges."""
    s, r = torch.nonzero(mask, as_tuple=True)
    return s, r


def _edges_arg(graph: Graph, edges) -> tuple[np.ndarray, np.ndarray]:
    """Edges given as ``(sender, receiver, input)`` names or as (sender index, slot index) arrays."""
    if isinstance(edges, tuple) and len(edges) == 2 and not isinstance(edges[0], str):
        s, r = graph.check_edges(*edges)
        if not len(s):
            raise HeadlensError("no edges given")
        return s, r
    if isinstance(edges, str) or not all(isinstance(e, Sequence) and len(e) == 3 for e in edges):
        raise HeadlensError('give edges as (sender, receiver, input) triples, e.g. [("L0H2", "L1H2", "k")]')
    pairs = [graph.edge(*e) for e in edges]
    if not pairs:
        raise HeadlensError("no edges given")
    return np.array([s for s, _ in pairs]), np.array([r for _, r in pairs])


@dataclass
class PathPatchingResult:
    """What :func:`path_patching` and :func:`sender_patching` return.

    - ``table``: one row per edge (``sender, receiver, input, metric, delta``) or per sender (``node, metric,
      delta``), ``delta`` = patched − clean metric;
    - ``clean``, ``corrupted``: the metric on the clean run and on the run with everything corrupted;
    - ``ablation``: what replaced the corrupted edges (``resample``: the corrupted prompt; ``mean``).
    """

    table: pd.DataFrame
    clean: float
    corrupted: float
    ablation: str


def path_patching(
    model: HookedTransformer,
    pair,
    edges,
    *,
    ablation: str = "resample",
    mean_tokens: Tensor | None = None,
    runs_per_pass: int = 16,
    progress: bool = True,
) -> PathPatchingResult:
    """The exact effect of corrupting each edge alone (path patching; see the module docstring).

    ``pair`` is a :class:`headlens.interventions.patching.PromptPair` (or a :class:`headlens.circuits.tasks.CircuitTask`);
    ``edges`` a list of ``(sender, receiver, input)``, e.g. ``[("L0H2", "L1H2", "k")]``, or (sender index, slot
    index) arrays of :class:`Graph`. The result's table: ``sender, receiver, input, metric, delta`` with ``delta`` =
    patched − clean metric.
    """
    check_model(model)
    pair, mean_tokens = _unwrap(pair, mean_tokens)
    graph = Graph.of(model)
    s, r = _edges_arg(graph, edges)
    with split_inputs(model):
        setting = prepare_pair(model, pair, mean_tokens=mean_tokens, ablation=ablation, graph=graph)
        values = run_edges(
            model,
            setting,
            single_edges(graph, s, r),
            runs_per_pass=runs_per_pass,
            progress=progress,
            desc="path patching",
        )
    return PathPatchingResult(_edge_table(graph, s, r, values, setting), *_metrics(setting))


def sender_patching(
    model: HookedTransformer, pair, senders: Sequence[str], *, runs_per_pass: int = 16, progress: bool = True
) -> PathPatchingResult:
    """Corrupt every edge out of each sender (its output patched wherever it is read): ``node, metric, delta``."""
    check_model(model)
    pair, _ = _unwrap(pair, None)
    graph = Graph.of(model)
    if isinstance(senders, str) or not len(senders):
        raise HeadlensError('give senders as a non-empty list of node names, e.g. ["L0H2", "MLP0"]')
    idx = []
    for name in senders:
        s, _ = graph.edge(name, "logits", LOGITS)
        idx.append(s)
    with split_inputs(model):
        setting = prepare_pair(model, pair, graph=graph)
        values = run_edges(model, setting, sender_runs(graph, idx), runs_per_pass=runs_per_pass, progress=progress)
    df = pd.DataFrame({"node": [graph.senders[i] for i in idx], "metric": values})
    df["delta"] = df["metric"] - setting.clean.metric
    return PathPatchingResult(df, *_metrics(setting))


def _metrics(setting: Setting) -> tuple[float, float, str]:
    return setting.clean.metric, setting.corrupted, setting.ablation


def _unwrap(pair, mean_tokens):
    """A CircuitTask gives its pair and its mean prompts; a PromptPair is used as is."""
    inner = getattr(pair, "pair", None)
    if inner is not None:
        return inner, mean_tokens if mean_tokens is not None else getattr(pair, "mean_tokens", None)
    return pair, mean_tokens


def _edge_table(graph: Graph, s: np.ndarray, r: np.ndarray, values: list[float], setting: Setting) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "sender": [graph.senders[int(i)] for i in s],
            "receiver": [graph.slots[int(j)].node for j in r],
            "input": [graph.slots[int(j)].input for j in r],
            "metric": values,
        }
    )
    df["delta"] = df["metric"] - setting.clean.metric
    return df

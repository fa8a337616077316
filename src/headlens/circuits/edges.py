"""Edge attribution: EAP and EAP-IG scores for every edge of the graph in a few forward/backward passes.

EAP (Syed et al. 2023, "Attribution patching outperforms automated circuit discovery") estimates the path-patching
effect of corrupting edge ``s -> r[i]`` (:mod:`headlens.circuits.paths`) to first order at the clean run:

    score(s -> r[i]) = sum over batch, positions of (out_s(corrupted) − out_s(clean)) · ∂m/∂input_r[i]  (clean run)

so one clean forward/backward gives every edge: the gradient at each receiver input (one per head and q/k/v, per MLP,
and at the final residual for the logits) times every earlier sender's activation difference. The score is in metric
units and has the sign of the patch's effect (negative: corrupting the edge lowers the metric).

Both are taken with respect to the ablation the circuit will be evaluated with: ``ablation="resample"`` uses the
corrupted prompt's sender outputs (and, for EAP-IG, its input embedding), ``ablation="mean"`` the sender outputs
averaged over the task's separate mean set (and the mean input embedding). A ranking made for one and evaluated
with the other misses edges: on repeated tokens the embedding read by an induction head's query is the same in the
clean and the corrupted prompt (resample score 0) but very different from the mean embedding.

EAP-IG (Hanna et al. 2024, "Have faith in faithfulness") replaces the clean-run gradient by its average over
``steps`` inputs on the straight line from the corrupted to the clean input embedding, ``α = 0, 1/steps, ...,
(steps − 1)/steps`` (as the authors' code does), which is much less fooled by saturated softmaxes. Cost: ``steps``
forward/backward passes instead of one; the gradient passes run one after another (memory of one).

The activation differences ``[batch pos sender d_model]`` are held once; each receiver's gradient is contracted with
them inside its backward hook and dropped, so no pass holds all receivers' gradients.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.circuits.graph import LOGITS, Graph
from headlens.circuits.paths import ABLATIONS, check_tokens, mean_outputs, record, slot_hook, split_inputs
from headlens.engine.intervene import Metric, unembed_at
from headlens.errors import HeadlensError, check_count, check_model
from headlens.progress import tqdm

METHODS = ("eap", "eap-ig")
IG_STEPS = 5


def ig_alphas(steps: int) -> list[float]:
    """EAP-IG's interpolation points from the corrupted (0) towards the clean (1) input: ``k / steps``, k < steps."""
    return [k / steps for k in range(steps)]


def edge_attribution(
    model: HookedTransformer,
    pair,
    *,
    method: str = "eap-ig",
    steps: int | None = None,
    ablation: str = "resample",
    mean_tokens: Tensor | None = None,
    graph: Graph | None = None,
    progress: bool = True,
) -> Float[Tensor, "sender slot"]:
    """Estimated effect of corrupting each edge, ``[sender, slot]`` (0 where there is no edge; see :class:`Graph`).

    ``pair``: a :class:`headlens.interventions.patching.PromptPair` or a :class:`headlens.circuits.tasks.CircuitTask`;
    ``method``: ``"eap"`` (gradient at the clean run) or ``"eap-ig"`` (``steps`` points, default :data:`IG_STEPS`);
    ``ablation``: ``"resample"`` (the corrupted prompt) or ``"mean"`` (``mean_tokens``, by default the task's).
    """
    check_model(model)
    if method not in METHODS:
        raise HeadlensError(f"unknown edge attribution method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "eap" and steps is not None:
        raise HeadlensError("steps is for method='eap-ig' (EAP takes the gradient at the clean run alone)")
    if method == "eap-ig":
        steps = IG_STEPS if steps is None else steps
        steps = check_count("steps", steps, why="gradients along the input path")
    if ablation not in ABLATIONS:
        raise HeadlensError(f"unknown ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
    if mean_tokens is None:
        mean_tokens = getattr(pair, "mean_tokens", None)
    pair = getattr(pair, "pair", pair)
    check_tokens(model, clean_tokens=pair.clean, corrupted_tokens=pair.corrupted, mean_tokens=mean_tokens)
    graph = graph or Graph.of(model)
    metric: Metric = pair.metric
    with split_inputs(model):
        clean = record(model, graph, pair.clean, None)
        if ablation == "resample":
            source = record(model, graph, pair.corrupted, None).outputs
        elif mean_tokens is None:
            raise HeadlensError(
                "mean ablation needs a separate set of prompts of the task (mean_tokens); use 'resample'"
            )
        else:
            source = mean_outputs(model, graph, mean_tokens.to(pair.clean.device))
        diff = source - clean.outputs
        start = source[:, :, 0].expand_as(clean.resid[0])  # the embedding sender's output is the input embedding
        alphas = [1.0] if method == "eap" else ig_alphas(int(steps))
        scores = torch.zeros(graph.n_senders, graph.n_slots, dtype=torch.float32, device=diff.device)
        for alpha in tqdm(alphas, desc=method, disable=not progress or len(alphas) == 1, leave=False):
            embed = torch.lerp(start.to(clean.resid[0].dtype), clean.resid[0], alpha)
            _gradient_pass(model, graph, pair.clean, embed, metric, diff, scores)
        scores /= len(alphas)
    del clean, source, diff
    return scores * graph.valid.to(scores.device)


def _gradient_pass(model, graph: Graph, tokens, embed, metric: Metric, diff, scores) -> None:
    """One forward from ``embed`` (the residual entering layer 0) and one backward; adds diff · grad to ``scores``."""

    def contract(sl: slice, n_before: int, heads: bool):
        def on_grad(grad: Tensor) -> None:
            g = grad.float()
            if heads:
                part = einops.einsum(diff[:, :, :n_before], g, "b p s d, b p n d -> s n")
            else:
                part = einops.einsum(diff[:, :, :n_before], g, "b p s d, b p d -> s")[:, None]
            scores[:n_before, sl] += part

        return on_grad

    def watch(sl: slice, n_before: int, heads: bool):
        def hook(act, hook):
            if act.requires_grad:
                act.register_hook(contract(sl, n_before, heads))
            return act

        return hook

    leaf = embed.detach().clone().requires_grad_(True)
    hooks = [("blocks.0.hook_resid_pre", lambda act, hook: leaf)]
    for layer in range(graph.n_layers):
        for kind in ("q", "k", "v") + (("mlp",) if graph.has_mlp else ()):
            sl = graph.layer_slots(layer, kind)
            n_before = graph.senders_before(graph.slots[sl.start])
            hooks.append((slot_hook(layer, kind), watch(sl, n_before, kind != "mlp")))
    with torch.inference_mode(False), torch.enable_grad():
        final = model.run_with_hooks(tokens, stop_at_layer=graph.n_layers, fwd_hooks=hooks)
        final.register_hook(contract(graph.layer_slots(graph.n_layers, LOGITS), graph.n_senders, False))
        m = metric(unembed_at(model, final, metric.positions))
        torch.autograd.grad(m, leaf)

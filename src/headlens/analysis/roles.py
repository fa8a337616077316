"""Task roles: what every head does on one task (a user's prompt pair or a built-in one), not on generic probes.

A census label says what a head looks like on probes; a head labelled ``first_token`` may still move the answer of
your prompt. :func:`task_roles` measures, per head, on a :class:`~headlens.interventions.patching.PromptPair`:

- ``patching``: exact activation patching of the head's ``z`` from the clean into the corrupted run (share of the
  clean-corrupted metric gap it restores alone; 1 = all of it);
- ``dla``: direct logit attribution on the clean run — the head's output at the metric positions, through the final
  norm's scale, on the unembedding direction answer − wrong (answer − mean of the vocabulary when there is no wrong
  token), in logits, averaged over sequences and positions;
- ``attn_answer``: the head's attention from the metric positions to earlier positions that hold the answer token
  (NaN when the answer does not occur in the prompt), the signature of a head that moves the answer there.

Answers: the ``answer``/``wrong`` tokens given, else the clean run's top next token and, where it differs, the
corrupted run's (as :func:`headlens.interventions.patching.text_pair` defines its metric).
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import check_heads, kv_heads
from headlens.interventions.patching import PromptPair, activation_patching, check_pair_tokens


def _one_token(model: HookedTransformer, text: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if len(ids) != 1:
        raise HeadlensError(f"{text!r} is {len(ids)} tokens; give a single token (mind the leading space)")
    return int(ids[0])


def _answers(
    model: HookedTransformer, pair: PromptPair, clean_logits, corrupted_logits, answer, wrong
) -> tuple[Int[Tensor, "batch n_pos"], Int[Tensor, "batch n_pos"] | None]:
    shape = clean_logits.shape[:2]
    if pair.name == "induction":  # the built-in induction pair's answers are the repeated tokens themselves
        return pair.clean[:, pair.positions + 1].cpu(), None
    if answer is not None:
        right = torch.full(shape, _one_token(model, answer))
        bad = torch.full(shape, _one_token(model, wrong)) if wrong is not None else None
        return right, bad
    right, other = clean_logits.argmax(-1), corrupted_logits.argmax(-1)
    return right, (other if bool((right != other).all()) else None)


def answer_direction(
    model: HookedTransformer, right: Int[Tensor, "batch n_pos"], wrong: Int[Tensor, "batch n_pos"] | None
) -> Float[Tensor, "batch n_pos d_model"]:
    """The unembedding direction right − wrong at each metric position (right − the vocabulary mean without ``wrong``)."""
    check_model(model)
    W_U = model.W_U.float()
    direction = W_U[:, right].permute(1, 2, 0)
    return direction - (W_U[:, wrong].permute(1, 2, 0) if wrong is not None else W_U.mean(-1))


def direct_logit_attribution(
    model: HookedTransformer,
    z: Float[Tensor, "batch n_pos head d_head"],
    layer: int,
    scale: Float[Tensor, "batch n_pos 1"],
    direction: Float[Tensor, "batch n_pos d_model"],
) -> Float[Tensor, " head"]:
    """Each head of ``layer``: its output (``z`` through W_O, divided by the final norm's scale) on ``direction``
    (:func:`answer_direction`), mean over sequences and positions."""
    check_model(model)
    out = torch.einsum("bphe,hed->bphd", z, model.blocks[layer].attn.W_O.float()) / scale[..., None]
    return torch.einsum("bphd,bpd->h", out, direction) / (z.shape[0] * z.shape[1])


def task_roles(
    model: HookedTransformer,
    pair: PromptPair,
    *,
    answer: str | None = None,
    wrong: str | None = None,
    heads=None,
    runs_per_pass: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per head: ``layer, head, kv_head, task, patching, dla, attn_answer`` (module docstring).

    ``heads`` restricts the patching (the costly part) to those heads; the others' ``patching`` is NaN."""
    check_model(model)
    runs_per_pass = check_count("runs_per_pass", runs_per_pass)
    check_pair_tokens(model, pair)
    if heads is not None:
        heads = check_heads(model, heads)  # a list: ``heads`` may be a one-pass iterator
    L, H = model.cfg.n_layers, model.cfg.n_heads
    positions = pair.positions
    if pair.name == "induction" and int(positions.max()) == pair.clean.shape[1] - 1:
        raise HeadlensError(
            "an induction pair's answer at a metric position is the next token: the last position has none; "
            "build the pair with headlens.interventions.patching.induction_pair"
        )
    names = {f"blocks.{l}.attn.hook_{a}" for l in range(L) for a in ("z", "pattern")} | {"ln_final.hook_scale"}
    with torch.inference_mode():
        clean_logits, cache = model.run_with_cache(pair.clean, names_filter=lambda n: n in names)
        corrupted_logits = model(pair.corrupted)
    right, bad = _answers(
        model, pair, clean_logits[:, positions].cpu(), corrupted_logits[:, positions].cpu(), answer, wrong
    )
    scale = cache["ln_final.hook_scale"][:, positions] if "ln_final.hook_scale" in cache else torch.ones(1, 1, 1)
    tokens = pair.clean.cpu()
    # keys holding the answer, at or before each metric position: [batch, n_pos, pos]
    before = torch.arange(tokens.shape[1])[None, :] <= positions[:, None]
    holds = (tokens[:, None, :] == right[..., None]) & before[None]
    has = holds.any(-1)
    dla, attn = [], []
    with torch.inference_mode():
        direction = answer_direction(
            model, right.to(model.W_U.device), None if bad is None else bad.to(model.W_U.device)
        )
        for layer in range(L):
            z = cache[f"blocks.{layer}.attn.hook_z"][:, positions].float()
            dla.append(direct_logit_attribution(model, z, layer, scale.float(), direction).cpu())
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, positions].float().cpu()  # [b, head, n_pos, pos]
            mass = (pattern * holds[:, None].float()).sum(-1)  # [b, head, n_pos]
            attn.append(mass.permute(1, 0, 2)[:, has].mean(-1) if has.any() else torch.full((H,), float("nan")))
    patched = activation_patching(
        model, pair, activation="z", heads=heads, runs_per_pass=runs_per_pass, progress=progress
    ).table.set_index(["layer", "head"])["effect"]
    grid = pd.MultiIndex.from_product([range(L), range(H)], names=["layer", "head"])
    task = pair.info.get("metric", pair.name)
    return pd.DataFrame(
        {
            "layer": [l for l in range(L) for _ in range(H)],
            "head": [h for _ in range(L) for h in range(H)],
            "kv_head": [g for _ in range(L) for g in kv_heads(model)],
            "task": f"{pair.name}: {task}",
            "patching": patched.reindex(grid).to_numpy(dtype=float),
            "dla": torch.stack(dla).flatten().numpy(),
            "attn_answer": torch.stack(attn).flatten().numpy(),
        }
    )

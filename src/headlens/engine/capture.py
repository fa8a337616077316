"""Stream attention patterns through per-layer reductions, one batch and one layer at a time.

A hook on ``blocks.{l}.attn.hook_pattern`` hands the pattern to a reducer and drops it, so memory
is one layer's attention, never a full cache. The forward stops at the last hooked layer's pattern: the rest of
that block (its attention output and MLP), the blocks after it and the unembedding never run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, utils

from headlens.data.probes import check_token_ids
from headlens.errors import HeadlensError, check_model
from headlens.heads import check_head, check_layers, parse_head
from headlens.progress import tqdm

VIEW_TOKENS = 128
"""The longest prompt an attention view (CircuitsVis pattern, report head view) shows."""

Reducer = Callable[[int, Float[Tensor, "batch head q k"], slice], None]


class _Done(Exception):
    """Raised by the last layer's hook: nothing after its pattern is needed."""


def stream_patterns(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    reducer: Reducer,
    *,
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "attention",
) -> None:
    """Call ``reducer(layer, pattern, rows)`` for every layer's pattern of every batch of ``tokens``.

    ``rows`` is the slice of ``tokens`` the batch covers, so a reducer can look up per-sequence metadata.
    """
    check_model(model)
    layers = check_layers(model, layers)
    if getattr(tokens, "ndim", None) != 2:
        raise HeadlensError(
            f"tokens must be [batch, pos], got shape {tuple(getattr(tokens, 'shape', ()))}: add a batch axis"
        )
    tokens = check_token_ids(model, tokens).to(model.cfg.device)
    starts = range(0, tokens.shape[0], batch_size)
    # the bar moves once per (batch, layer): a probe that is a single batch still shows progress
    with tqdm(total=len(starts) * len(layers), desc=desc, unit="layer", disable=not progress, leave=False) as bar:
        for start in starts:
            rows = slice(start, min(start + batch_size, tokens.shape[0]))

            def hook(pattern, hook, rows=rows):
                reducer(hook.layer(), pattern, rows)
                bar.update(1)
                if hook.layer() == layers[-1]:
                    raise _Done

            hooks = [(utils.get_act_name("pattern", layer), hook) for layer in layers]
            with torch.inference_mode(), contextlib.suppress(_Done):
                model.run_with_hooks(tokens[rows], fwd_hooks=hooks, stop_at_layer=layers[-1] + 1)


def str_tokens(model: HookedTransformer, ids: Sequence[int]) -> list[str]:
    """Each token id as text (``t17`` for a model without a tokenizer, e.g. the toy model)."""
    check_model(model)
    if model.tokenizer is None:
        return [f"t{int(t)}" for t in ids]
    return [model.tokenizer.decode([int(t)]) for t in ids]


def head_patterns(
    model: HookedTransformer,
    prompt: str | Int[Tensor, " pos"],
    heads: Sequence[tuple[int, int]],
    *,
    max_tokens: int = VIEW_TOKENS,
) -> tuple[list[str], Float[Tensor, "head q k"]]:
    """String tokens of ``prompt`` (text, or token ids for a model without a tokenizer) and the attention pattern
    of each ``(layer, head)`` on it, in the order given.

    One forward, stopped after the last layer needed; each hook keeps only the chosen heads' rows.
    """
    check_model(model)
    heads = [parse_head(h) for h in heads]  # "L9H8", (9, 8) or Head(9, 8), in the order given
    if not heads:
        raise HeadlensError("no heads given: pass heads as a list of (layer, head) pairs, e.g. [(5, 3)]")
    for layer, head in heads:
        check_head(model, layer, head)
    if isinstance(prompt, Tensor):
        if prompt.ndim != 1 or prompt.numel() == 0:
            raise HeadlensError(f"pass token ids as one non-empty 1-d tensor, got shape {tuple(prompt.shape)}")
        tokens = prompt.long()[None].to(model.cfg.device)
    elif not isinstance(prompt, str) or not prompt:
        raise HeadlensError("the prompt is empty: pass a non-empty string")
    else:
        if model.tokenizer is None:
            raise HeadlensError("this model has no tokenizer: pass the prompt as a 1-d tensor of token ids")
        tokens = model.to_tokens(prompt, prepend_bos=False)
    if tokens.shape[1] > max_tokens:
        raise HeadlensError(
            f"the prompt is {tokens.shape[1]} tokens; attention views take at most max_tokens={max_tokens} "
            "(pass a shorter prompt or a larger max_tokens)"
        )
    kept: dict[int, Float[Tensor, "head q k"]] = {}
    wanted = sorted({layer for layer, _ in heads})

    def keep(layer, pattern, rows):
        kept[layer] = pattern[0].detach().float().cpu().clone()

    stream_patterns(model, tokens, keep, layers=wanted, batch_size=1, progress=False)
    patterns = torch.stack([kept[layer][head] for layer, head in heads])
    return str_tokens(model, tokens[0].tolist()), patterns

"""Stream attention patterns through per-layer reductions, one batch and one layer at a time.

A hook on ``blocks.{l}.attn.hook_pattern`` hands the pattern to a reducer and drops it, so memory
is one layer's attention, never a full cache. The forward stops after the last hooked layer
(``stop_at_layer``), which also skips the unembedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, utils

from headlens.progress import tqdm

Reducer = Callable[[int, Float[Tensor, "batch head q k"], slice], None]


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
    layers = sorted(range(model.cfg.n_layers) if layers is None else set(layers))
    tokens = tokens.to(model.cfg.device)
    starts = range(0, tokens.shape[0], batch_size)
    # the bar moves once per (batch, layer): a probe that is a single batch still shows progress
    with tqdm(total=len(starts) * len(layers), desc=desc, unit="layer", disable=not progress, leave=False) as bar:
        for start in starts:
            rows = slice(start, min(start + batch_size, tokens.shape[0]))

            def hook(pattern, hook, rows=rows):
                reducer(hook.layer(), pattern, rows)
                bar.update(1)

            hooks = [(utils.get_act_name("pattern", layer), hook) for layer in layers]
            with torch.inference_mode():
                model.run_with_hooks(tokens[rows], fwd_hooks=hooks, stop_at_layer=layers[-1] + 1)

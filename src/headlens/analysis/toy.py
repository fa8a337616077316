"""A toy attention-only transformer trained on CPU until induction heads form.

Ground truth for the head census and for the seed-004 claim that "induction heads form abruptly
during training" (Olsson et al. 2022): a 2-layer attention-only TransformerLens model (learned
positions, LayerNorm, no tokenizer) is trained with next-token loss on uniform random tokens in
which a few spans are pasted again later at random offsets, so that the repeats are predictable only
in context. Every ``record_every`` steps the history records the loss on both halves of a fixed
[A1..An A1..An] batch and every head's prefix-matching (``headlens.census.scores.induction``) and
previous-token score. Training runs on one thread with seeded generators: same arguments -> same
history. The checkpoint trained with :data:`TRAIN_DEFAULTS` ships in ``headlens/data``
(:func:`load_induction_model`, :func:`load_induction_history`, :func:`circuit_heads`).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig, utils

from headlens.census import scores
from headlens.data.probes import Probe, ProbeSet
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import head_name
from headlens.io import atomic_path, write_csv, write_text
from headlens.models import _recipe, private_rng
from headlens.progress import tqdm

CHECKPOINT = "toy_induction.safetensors"
TRAIN_DEFAULTS = dict(
    steps=6000,
    seed=0,
    n_layers=2,
    n_heads=4,
    d_model=64,
    d_vocab=64,
    seq_len=64,
    positional="standard",
    normalization="LN",
    batch_size=32,
    lr=1e-3,
    weight_decay=0.0,
    record_every=50,
    eval_batch=64,
)
"""The arguments the packaged checkpoint was trained with (``analyses/induction_phase_change.py``)."""


def toy_config(
    *,
    seed: int = 0,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 64,
    d_vocab: int = 64,
    seq_len: int = 64,
    positional: str = "standard",
    normalization: str | None = "LN",
) -> HookedTransformerConfig:
    """The attention-only ``HookedTransformerConfig`` of the toy model (learned positions, LayerNorm, no tokenizer)."""
    seed = check_count("seed", seed, minimum=0)
    n_layers = check_count("n_layers", n_layers)
    n_heads = check_count("n_heads", n_heads)
    d_model = check_count("d_model", d_model)
    d_vocab = check_count("d_vocab", d_vocab)
    seq_len = check_count("seq_len", seq_len)
    if d_model % n_heads:
        raise HeadlensError(
            f"d_model ({d_model}) must be a multiple of n_heads ({n_heads}); pick e.g. d_model={n_heads * 16}."
        )
    if seq_len < 8 or seq_len % 2:
        raise HeadlensError(f"seq_len must be an even number >= 8 (two copies of a segment), got {seq_len}.")
    if d_vocab < 8:
        raise HeadlensError(f"d_vocab must be at least 8 so random segments rarely repeat by chance, got {d_vocab}.")
    return HookedTransformerConfig(
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_model // n_heads,
        d_vocab=d_vocab,
        n_ctx=seq_len,
        attn_only=True,
        normalization_type=normalization,
        positional_embedding_type=positional,
        rotary_dim=d_model // n_heads if positional == "rotary" else None,
        default_prepend_bos=False,
        model_name="toy-induction",
        seed=seed,
        device="cpu",
    )


def repeated_tokens(n: int, *, n_seqs: int, d_vocab: int, generator: torch.Generator) -> Int[Tensor, "batch two_n"]:
    """Sequences [A1..An A1..An] of n distinct random tokens: the probe the prefix-matching score is defined on."""
    if not 2 <= n <= d_vocab:
        raise HeadlensError(f"a repeated probe needs 2 <= n <= d_vocab ({d_vocab}) distinct tokens, got n={n}.")
    half = torch.stack([torch.randperm(d_vocab, generator=generator)[:n] for _ in range(n_seqs)])
    return torch.cat([half, half], dim=1)


def training_batch(
    *, n_seqs: int, seq_len: int, d_vocab: int, generator: torch.Generator, copies: int = 3, min_len: int = 3
) -> Int[Tensor, "batch pos"]:
    """Uniform random tokens with ``copies`` spans pasted again later in the same sequence.

    Span lengths (``min_len`` to ``seq_len // (2 * copies)``) and offsets are drawn per span, so a
    head attending to a fixed relative position cannot predict the repeats; copying the token that
    followed the earlier occurrence of the current token (induction) can.
    """
    n_seqs = check_count("n_seqs", n_seqs)
    seq_len = check_count("seq_len", seq_len, minimum=2)
    copies = check_count("copies", copies)
    min_len = check_count("min_len", min_len)
    tokens = torch.randint(0, d_vocab, (n_seqs, seq_len), generator=generator)
    max_len = max(min_len, seq_len // (2 * copies))
    for b in range(n_seqs):
        for _ in range(copies):
            length = int(torch.randint(min_len, max_len + 1, (), generator=generator))
            dest = int(torch.randint(length, seq_len - length + 1, (), generator=generator))
            src = int(torch.randint(0, dest - length + 1, (), generator=generator))
            tokens[b, dest : dest + length] = tokens[b, src : src + length].clone()
    return tokens


def _loss_per_position(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    logprobs = logits[:, :-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]


def evaluate(model: HookedTransformer, tokens: Int[Tensor, "batch two_n"]) -> dict[str, float]:
    """Losses on the two halves of [A1..An A1..An] and every head's induction and previous-token score.

    Patterns are reduced to per-head scores inside the hook and dropped.
    """
    check_model(model)
    n = tokens.shape[1] // 2
    row: dict[str, float] = {}

    def hook(pattern: Float[Tensor, "batch head q k"], hook):
        layer = hook.layer()
        for h, (ind, prev) in enumerate(
            zip(scores.induction(pattern, n).tolist(), scores.previous_token(pattern).tolist())
        ):
            row[head_name(layer, h)] = ind
            row[f"prev_L{layer}H{h}"] = prev

    hooks = [(utils.get_act_name("pattern", layer), hook) for layer in range(model.cfg.n_layers)]
    with torch.inference_mode():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    loss = _loss_per_position(logits, tokens)
    first = loss[:, : n - 1].mean().item()
    repeated = loss[:, n:].mean().item()
    out = {"loss_first_half": first, "loss_repeated_half": repeated}
    out.update({k: row[k] for k in sorted(row, key=_column_order)})
    return out


def _column_order(name: str) -> tuple:
    prev = name.startswith("prev_")
    layer, head = name.removeprefix("prev_")[1:].split("H")
    return (prev, int(layer), int(head))


def train_induction_model(
    *,
    steps: int = 6000,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    record_every: int = 50,
    eval_batch: int = 64,
    progress: bool = True,
    **config,
) -> tuple[HookedTransformer, pd.DataFrame]:
    """Train the toy attention-only model; return it and its history (one row per recorded step).

    History columns: ``step``, ``loss`` (training batch), ``loss_first_half`` and ``loss_repeated_half``
    on a fixed eval batch of [A1..An A1..An] (n = seq_len // 2), then the induction (prefix-matching)
    score of every head as ``L{layer}H{head}`` and its previous-token score as ``prev_L{layer}H{head}``.
    ``config``: :func:`toy_config`'s arguments (``seed``, ``n_layers``, ``n_heads``, ``d_model``, ``d_vocab``,
    ``seq_len``, ``positional``, ``normalization``); ``seed`` also seeds the training data.
    Same arguments -> identical model and history.
    """
    steps = check_count("steps", steps)
    batch_size = check_count("batch_size", batch_size)
    record_every = check_count("record_every", record_every)
    eval_batch = check_count("eval_batch", eval_batch)
    with private_rng():  # the config's seed reseeds torch, numpy and random; the weights are drawn from it
        cfg = toy_config(**config)
        model = HookedTransformer(cfg)
    seed, seq_len, d_vocab = cfg.seed, cfg.n_ctx, cfg.d_vocab
    train_gen = torch.Generator().manual_seed(seed)
    eval_tokens = repeated_tokens(
        seq_len // 2, n_seqs=eval_batch, d_vocab=d_vocab, generator=torch.Generator().manual_seed(seed + 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rows = []
    loss = float("nan")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in tqdm(range(steps + 1), desc="training toy model", disable=not progress):
            if step % record_every == 0 or step == steps:
                model.eval()
                rows.append({"step": step, "loss": loss, **evaluate(model, eval_tokens)})
                model.train()
            if step == steps:
                break
            tokens = training_batch(n_seqs=batch_size, seq_len=seq_len, d_vocab=d_vocab, generator=train_gen)
            batch_loss = _loss_per_position(model(tokens), tokens).mean()
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            loss = batch_loss.item()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, pd.DataFrame(rows)


def checkpoint_path() -> Path:
    """Where the packaged toy checkpoint lives (``headlens/data/toy_induction.safetensors``; config + history beside it)."""
    return Path(str(files("headlens") / "data" / CHECKPOINT))


def save_induction_model(
    model: HookedTransformer, path: str | Path, *, train_args: dict | None = None, history: pd.DataFrame | None = None
) -> Path:
    """Write the weights as safetensors, the config + training arguments as JSON and the history as CSV beside it."""
    check_model(model)
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    cfg = {k: getattr(model.cfg, k) for k in ("n_layers", "n_heads", "d_model", "d_vocab")}
    cfg.update(
        seq_len=model.cfg.n_ctx,
        seed=model.cfg.seed,
        positional=model.cfg.positional_embedding_type,
        normalization=model.cfg.normalization_type,
    )
    meta = {"config": cfg, "train_args": train_args or {}}
    if history is not None:
        final = history.iloc[-1]
        last = model.cfg.n_layers - 1
        meta["circuit"] = {
            "induction": max(head_columns(history, layer=last), key=lambda c: final[c]),
            "previous_token": max(
                head_columns(history, kind="previous_token", layer=0), key=lambda c: final[c]
            ).removeprefix("prev_"),
        }
        write_csv(history, _history_path(path))
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return path


def load_induction_model(path: str | Path | None = None) -> HookedTransformer:
    """The trained toy induction model: from ``path`` or the checkpoint packaged with headlens (loads in < 1 s)."""
    from safetensors.torch import load_file

    weights = checkpoint_path() if path is None else Path(path)
    meta_path = weights.with_suffix(".json")
    if not weights.is_file() or not meta_path.is_file():
        raise HeadlensError(
            f"no toy checkpoint at {weights} (+ {meta_path.name}); train one with "
            "`python analyses/induction_phase_change.py --save-checkpoint` or headlens.analysis.toy.save_induction_model."
        )
    with private_rng():
        cfg = toy_config(**json.loads(meta_path.read_text())["config"])
        model = HookedTransformer(cfg)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()

    return _recipe(
        model, "headlens.analysis.toy:load_induction_model", path=None if path is None else str(Path(path).resolve())
    )


def circuit_heads(path: str | Path | None = None) -> dict[str, tuple[int, int]]:
    """(layer, head) of the induction head and of its layer-0 previous-token partner in the packaged (or ``path``) checkpoint.

    Recorded at save time from the last history row (highest scores); tests re-measure them on fresh probes.
    """
    meta_path = (checkpoint_path() if path is None else Path(path)).with_suffix(".json")
    circuit = json.loads(meta_path.read_text()).get("circuit") if meta_path.is_file() else None
    if not circuit:
        raise HeadlensError(
            f"{meta_path} records no circuit; re-save the checkpoint with save_induction_model(..., history=...)."
        )
    return {kind: tuple(int(x) for x in name[1:].split("H")) for kind, name in circuit.items()}


def load_induction_history(path: str | Path | None = None) -> pd.DataFrame:
    """The training history recorded when the packaged (or ``path``) checkpoint was trained."""
    csv = _history_path(checkpoint_path() if path is None else Path(path))
    if not csv.is_file():
        raise HeadlensError(
            f"no toy training history at {csv}; it is written by save_induction_model(..., history=...)."
        )
    return pd.read_csv(csv)


def _history_path(weights: Path) -> Path:
    return weights.with_name(weights.stem + "_history.csv")


def head_columns(history: pd.DataFrame, *, kind: str = "induction", layer: int | None = None) -> list[str]:
    """History columns holding per-head ``induction`` (``L1H3``) or ``previous_token`` (``prev_L1H3``) scores."""
    prefix = {"induction": "L", "previous_token": "prev_L"}[kind]
    cols = [c for c in history.columns if c.startswith(prefix) and c[len(prefix) :].replace("H", "", 1).isdigit()]
    return [c for c in cols if layer is None or c[len(prefix) :].split("H")[0] == str(layer)]


def phase_change(history: pd.DataFrame, *, threshold: float = 0.5, band: tuple[float, float] = (0.1, 0.9)) -> dict:
    """Locate the induction phase change in a training history and check that its two signatures coincide.

    - loss window: from the first recorded step where the repeated-half loss has fallen by ``band[0]``
      of its total fall (plateau = maximum after step 0, down to the minimum) to the first where it
      has fallen by ``band[1]``;
    - induction step: the first recorded step at which some head's prefix-matching score reaches
      ``threshold``; ``score_rise_in_window``: the share of the best head's total score rise (step 0
      to the end) that happens inside the loss window;
    - ``coincide``: the induction step lies inside the loss window, give or take
      ``tolerance`` = max(one record interval, 10% of the window).
    """
    if len(history) < 3 or "loss_repeated_half" not in history:
        raise HeadlensError(
            "phase_change needs a training history with >= 3 recorded steps (from train_induction_model)."
        )
    if not 0 < band[0] < band[1] < 1:
        raise HeadlensError(f"band must be two fractions 0 < low < high < 1, got {band}.")
    steps = history["step"].to_numpy()
    loss = history["loss_repeated_half"].to_numpy()
    ind_cols = head_columns(history)
    best = history[ind_cols].max(axis=1).to_numpy()
    hi, lo = float(loss[1:].max()), float(loss.min())
    fallen = (hi - loss) / (hi - lo) if hi > lo else np.zeros_like(loss)
    start = int(np.argmax(fallen >= band[0]))
    end = int(np.argmax(fallen >= band[1]))
    interval = int(np.diff(steps).max())
    tolerance = max(interval, int(0.1 * (steps[end] - steps[start])))
    crossed = (best >= threshold).nonzero()[0]
    rise = best[-1] - best[0]
    out = {
        "loss_plateau": hi,
        "loss_final": float(loss[-1]),
        "band": list(band),
        "window_start": int(steps[start]),
        "window_end": int(steps[end]),
        "window_steps": int(steps[end] - steps[start]),
        "window_loss_drop": float(loss[start] - loss[end]),
        "steepest_step": int(steps[2 + int(np.argmax(loss[1:-1] - loss[2:]))]),
        "threshold": threshold,
        "induction_step": int(steps[crossed[0]]) if len(crossed) else None,
        "induction_head": ind_cols[int(history[ind_cols].iloc[int(crossed[0])].to_numpy().argmax())]
        if len(crossed)
        else None,
        "score_at_window_start": float(best[start]),
        "score_at_window_end": float(best[end]),
        "score_final": float(best[-1]),
        "score_rise_in_window": float((best[end] - best[start]) / rise) if rise > 0 else 0.0,
        "record_interval": interval,
        "tolerance": tolerance,
        "total_steps": int(steps[-1]),
    }
    out["coincide"] = bool(len(crossed)) and bool(
        steps[start] - tolerance <= out["induction_step"] <= steps[end] + tolerance
    )
    return out


def toy_probes(model: HookedTransformer, *, seed: int = 0, n_seqs: int = 8, n: int | None = None):
    """A census ``ProbeSet`` for a tokenizer-less toy model, built from token ids alone.

    ``repeated``: [A1..An A1..An] of distinct random ids (n = n_ctx // 2 by default); ``natural``: the
    model's own training "text" (:func:`training_batch`). No delimiter probe: ids have no text.
    """
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    n_seqs = check_count("n_seqs", n_seqs)
    cfg = model.cfg
    n = cfg.n_ctx // 2 if n is None else check_count("n", n, minimum=2)
    gen = torch.Generator().manual_seed(int(seed) * 1000 + 7)
    repeated = repeated_tokens(n, n_seqs=n_seqs, d_vocab=cfg.d_vocab, generator=gen)
    text = training_batch(n_seqs=n_seqs, seq_len=cfg.n_ctx, d_vocab=cfg.d_vocab, generator=gen)
    return ProbeSet(
        repeated=Probe("repeated", repeated, torch.zeros_like(repeated, dtype=torch.bool), n=n, prefix=0),
        natural=Probe("natural", text, torch.zeros_like(text, dtype=torch.bool)),
        seed=seed,
    )

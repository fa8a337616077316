"""A toy attention-only transformer trained on CPU until induction heads form.

Ground truth for the head census and for the seed-004 claim that "induction heads form abruptly
during training" (Olsson et al. 2022): a 2-layer attention-only TransformerLens model is trained with
next-token loss on random tokens that contain a repeated segment of random length at a random
offset, so only a previous-token head + induction head circuit (not a fixed positional offset) can
predict the repeat. Training is seeded and deterministic; a trained checkpoint ships with the package.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import einops
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig, utils

from headlens.errors import HeadlensError

CHECKPOINT = "toy_induction.safetensors"
CONFIG = "toy_induction.json"
DEFAULTS = dict(n_layers=2, n_heads=4, d_model=64, d_vocab=64, seq_len=64)


def toy_config(*, seed: int = 0, n_layers: int = 2, n_heads: int = 4, d_model: int = 64, d_vocab: int = 64, seq_len: int = 64) -> HookedTransformerConfig:
    """The attention-only ``HookedTransformerConfig`` of the toy model (learned positions, LayerNorm, no tokenizer)."""
    if d_model % n_heads:
        raise HeadlensError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads}); pick e.g. d_model={n_heads * 16}.")
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
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=False,
        model_name="toy-induction",
        seed=seed,
        device="cpu",
    )


def repeated_tokens(n: int, *, batch: int, d_vocab: int, generator: torch.Generator) -> Int[Tensor, "batch two_n"]:
    """Sequences [A1..An A1..An] of uniform random tokens: the probe the prefix-matching score is defined on."""
    half = torch.randint(0, d_vocab, (batch, n), generator=generator)
    return torch.cat([half, half], dim=1)


def training_batch(*, batch: int, seq_len: int, d_vocab: int, generator: torch.Generator, min_len: int = 4) -> Int[Tensor, "batch pos"]:
    """Random tokens ending in a segment and its repeat, [R.. A1..An A1..An], with n drawn per sequence.

    The repeat offset n varies, so a head attending to a fixed relative position cannot solve the
    task; copying the token that followed the earlier occurrence (induction) can.
    """
    tokens = torch.randint(0, d_vocab, (batch, seq_len), generator=generator)
    lengths = torch.randint(min_len, seq_len // 2 + 1, (batch,), generator=generator)
    pos = torch.arange(seq_len)
    src = torch.where(pos >= (seq_len - lengths)[:, None], pos - lengths[:, None], pos)
    return tokens.gather(1, src)


def _loss_per_position(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_minus_1"]:
    logprobs = logits[:, :-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]


def evaluate(model: HookedTransformer, tokens: Int[Tensor, "batch two_n"]) -> dict[str, float]:
    """Losses on the two halves of [A1..An A1..An] and every head's induction and previous-token score.

    Patterns are reduced to per-head scores inside the hook and dropped.
    """
    from headlens import scores

    n = tokens.shape[1] // 2
    row: dict[str, float] = {}

    def hook(pattern: Float[Tensor, "batch head q k"], hook):
        layer = hook.layer()
        for h, (ind, prev) in enumerate(zip(scores.induction(pattern, n).tolist(), scores.previous_token(pattern).tolist())):
            row[f"L{layer}H{h}"] = ind
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
    steps: int = 1500,
    seed: int = 0,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 64,
    d_vocab: int = 64,
    seq_len: int = 64,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    record_every: int = 25,
    eval_batch: int = 64,
    progress: bool = True,
) -> tuple[HookedTransformer, pd.DataFrame]:
    """Train the toy attention-only model; return it and its history (one row per recorded step).

    History columns: ``step``, ``loss`` (training batch), ``loss_first_half`` and ``loss_repeated_half``
    on a fixed eval batch of [A1..An A1..An] (n = seq_len // 2), then the induction (prefix-matching)
    score of every head as ``L{layer}H{head}`` and its previous-token score as ``prev_L{layer}H{head}``.
    Same arguments -> identical model and history.
    """
    if steps < 1 or record_every < 1 or batch_size < 1 or eval_batch < 1:
        raise HeadlensError("steps, record_every, batch_size and eval_batch must be positive integers.")
    cfg = toy_config(seed=seed, n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_vocab=d_vocab, seq_len=seq_len)
    with torch.random.fork_rng(devices=[]):
        model = HookedTransformer(cfg)
    train_gen = torch.Generator().manual_seed(seed)
    eval_tokens = repeated_tokens(seq_len // 2, batch=eval_batch, d_vocab=d_vocab, generator=torch.Generator().manual_seed(seed + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rows = []
    loss = float("nan")
    for step in tqdm(range(steps + 1), desc="training toy model", disable=not progress):
        if step % record_every == 0 or step == steps:
            model.eval()
            rows.append({"step": step, "loss": loss, **evaluate(model, eval_tokens)})
            model.train()
        if step == steps:
            break
        tokens = training_batch(batch=batch_size, seq_len=seq_len, d_vocab=d_vocab, generator=train_gen)
        batch_loss = _loss_per_position(model(tokens), tokens).mean()
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        loss = batch_loss.item()
    model.eval()
    return model, pd.DataFrame(rows)


def save_induction_model(model: HookedTransformer, path: str | Path, *, train_args: dict | None = None) -> Path:
    """Write the weights as safetensors and the config (+ training arguments) as JSON next to it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))}, str(path))
    cfg = {k: getattr(model.cfg, k) for k in ("n_layers", "n_heads", "d_model", "d_vocab")}
    cfg["seq_len"] = model.cfg.n_ctx
    cfg["seed"] = model.cfg.seed
    path.with_suffix(".json").write_text(json.dumps({"config": cfg, "train_args": train_args or {}}, indent=2) + "\n")
    return path


def load_induction_model(path: str | Path | None = None) -> HookedTransformer:
    """The trained toy induction model: from ``path`` or the checkpoint shipped with headlens (loads in < 1 s)."""
    from safetensors.torch import load_file

    weights = Path(path) if path is not None else Path(str(files("headlens") / "data" / CHECKPOINT))
    meta_path = weights.with_suffix(".json")
    if not weights.exists() or not meta_path.exists():
        raise HeadlensError(f"no toy checkpoint at {weights} (+ {meta_path.name}); train one with headlens.toy.train_induction_model and save_induction_model.")
    cfg = toy_config(**json.loads(meta_path.read_text())["config"])
    with torch.random.fork_rng(devices=[]):
        model = HookedTransformer(cfg)
    model.load_state_dict(load_file(str(weights)), strict=False)
    model.eval()
    return model

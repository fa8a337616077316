"""OV-circuit head types: negative copying, copy suppression and successor heads.

Each type is a score per (layer, head) with a threshold; :mod:`headlens.census.builtin` registers them with the
census. Positional heads are in :mod:`headlens.census.positional`, code heads in :mod:`headlens.census.code_heads`,
retrieval heads in :mod:`headlens.census.retrieval`.

OV scores read a head's OV circuit through the *effective embedding* (Gould et al. 2023): a token's
residual stream after block 0 when it is alone in its sequence (its embedding plus layer 0's attention to
itself and MLP 0), RMS-normalised as the head's input is (layer norms are folded into W_V). The head's
output for token t is ``norm(eff(t)) W_V W_O`` and its effect on the logits is that times ``W_U``
(the final norm scales a row and does not change ranks within it).

- ``copying`` and ``negative_copying``, one measurement: over a fixed sample of ordinary word tokens (any token ids
  for a model without a tokenizer), the share of tokens t whose own logit is in the highest (``top``) and in the
  lowest (``negative_copying``) 1 % of the head's OV output for t over that sample; ``copying = top -
  negative_copying`` in [-1, 1]: +1 the head raises the very token it reads, -1 it pushes it down (McDougall et al.
  2023 report 85 % of tokens in the bottom 10 of the vocabulary for GPT-2's L10H7). The census used to take
  ``copying`` from the eigenvalues of W_E W_V W_O W_U instead; that reads the raw embedding, which is not what a
  head past block 0 sees, and it called L23H2 copying (0.83) while this test called it suppressing (0.96; ablating
  it lowers the repeated-half loss, as a suppressor's should).
- ``attention_to_predicted`` (pattern score): on natural text, for each query whose next-token prediction
  (the whole model's top-1) already occurs earlier in the sequence, the attention on those earlier
  occurrences (mean over such queries).
- copy-suppression heads: attention_to_predicted >= 0.3 AND negative_copying >= 0.5 — the head attends to
  the token about to be predicted and pushes that token down (``copy_suppression_score``, their product,
  ranks heads). The census's ``copy_suppression`` label is the cheaper rule on repeated tokens (prefix
  matching + ``negative_copying`` >= 0.5); the two score columns here sit next to it in the census table.
- ``successor`` (Gould et al. 2023): over ordinal sequences (digits, number words, ordinals, days, months,
  letters; single tokens only), the share of tokens t whose successor has the top OV logit for t among all
  ordinal tokens.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.census.scores import NEGATIVE_COPYING, add_defined, masked_attention
from headlens.data.predicted import model_predictions
from headlens.data.probes import natural_text, word_token_ids
from headlens.engine.capture import stream_patterns
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import head_frame
from headlens.io import once_per_weights

THRESHOLDS = {
    "attention_to_predicted": 0.3,
    "negative_copying": NEGATIVE_COPYING,
    "successor": 0.3,
}
"""Set before the default Qwen was scored (reasons in docs/head_types.md); the labelled one (successor) clears the
random-weights null (analyses/results/census_trust/null.csv)."""
CENSUS_COPY_SAMPLE = 1000
"""Word tokens the census's ``negative_copying`` column samples (the n x n OV logits per head are most of its cost;
the head-type study uses 2,000). Its label use is a 0.5 cut, where 1,000 tokens give a standard error <= 0.016."""

ORDINALS = {
    "digits": [str(i) for i in range(10)],
    "number_words": " one two three four five six seven eight nine ten eleven twelve".split(" ")[1:],
    "ordinals": " first second third fourth fifth sixth seventh eighth ninth tenth".split(" ")[1:],
    "days": " Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(" ")[1:],
    "months": " January February March April May June July August September October November December".split(" ")[1:],
    "letters": [" " + chr(c) for c in range(ord("A"), ord("Z") + 1)],
}
ORDINALS = {k: [(" " + w if k not in ("digits", "letters") else w) for w in v] for k, v in ORDINALS.items()}


# ---------------------------------------------------------------- OV circuit through the effective embedding


def effective_embedding(
    model: HookedTransformer, token_ids: Int[Tensor, " n"], *, batch_size: int = 512
) -> Float[Tensor, "n d_model"]:
    """Residual stream after block 0 of each token alone in its sequence (Gould et al.'s effective embedding)."""
    check_model(model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(token_ids), batch_size):
            # [t, t]: position 1 attends only to copies of t, so layer 0's attention output is v(t) whatever the
            # pattern (values carry no position under RoPE) and the residual equals that of t alone; two positions
            # keep hooks that assume a previous token (planted test models) valid.
            ids = token_ids[start : start + batch_size, None].expand(-1, 2).to(model.cfg.device)
            out.append(model(ids, stop_at_layer=1)[:, 1].float().cpu())
    return torch.cat(out)


def ov_logits(
    model: HookedTransformer, layer: int, eff: Float[Tensor, "n d_model"], targets: Int[Tensor, " m"]
) -> Float[Tensor, "head n m"]:
    """Logits that each head of ``layer`` writes on ``targets`` when it attends to tokens with effective embedding ``eff``."""
    check_model(model)
    x = eff / eff.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt()
    attn = model.blocks[layer].attn
    with torch.inference_mode():
        v = torch.einsum("nd,hde->hne", x.to(attn.W_V.device, attn.W_V.dtype), attn.W_V) + attn.b_V[:, None]
        out = torch.einsum("hne,hed->hnd", v, attn.W_O)
        return (out @ model.W_U[:, targets.to(model.W_U.device)]).float().cpu()


def own_rank_share(
    logits: Float[Tensor, "head n n"], *, lowest: float = 0.01
) -> tuple[Float[Tensor, " head"], Float[Tensor, " head"]]:
    """Shares of rows t whose own entry (column t) is among the highest / the lowest ``lowest`` fraction of the row
    (copying / negative copying; ties count against the token)."""
    n = logits.shape[-1]
    own = logits.diagonal(dim1=-2, dim2=-1)[..., None]
    cut = max(1, int(round(lowest * n)))
    from_bottom = (logits <= own).sum(-1) - 1  # other targets at or below the token itself
    from_top = (logits >= own).sum(-1) - 1  # other targets at or above it
    return (from_top < cut).float().mean(-1), (from_bottom < cut).float().mean(-1)


def successor_share(logits: Float[Tensor, "head n m"], successor: Int[Tensor, " n"]) -> Float[Tensor, " head"]:
    """Share of rows whose largest entry is the row's successor column (``-1``: no successor, row skipped)."""
    keep = successor >= 0
    rows = logits[:, keep]
    succ = rows.gather(-1, successor[keep][None, :, None].expand(rows.shape[0], -1, 1))
    return ((rows >= succ).sum(-1) == 1).float().mean(-1)  # the successor strictly above every other column


def _check_tokenizer(model: HookedTransformer, what: str):
    if getattr(model, "tokenizer", None) is None:
        raise HeadlensError(f"the {what} score needs a model with a tokenizer")
    return model.tokenizer


def ordinal_tokens(model: HookedTransformer) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], list[str]]:
    """Single-token members of the ordinal sequences: ids, the index of each one's successor in ids (-1 if none), names."""
    check_model(model)
    tok = _check_tokenizer(model, "successor")
    ids, succ, names = [], [], []
    for task, words in ORDINALS.items():
        enc = [tok.encode(w, add_special_tokens=False) for w in words]
        for i, e in enumerate(enc):
            if len(e) != 1 or e[0] >= model.cfg.d_vocab:
                continue
            nxt = enc[i + 1] if i + 1 < len(enc) else None
            ids.append(e[0])
            names.append(f"{task}:{words[i].strip()}")
            succ.append(nxt[0] if nxt is not None and len(nxt) == 1 else -1)
    if len(ids) < 4:
        raise HeadlensError("the tokenizer encodes too few ordinal words as single tokens for a successor score")
    index = {t: j for j, t in enumerate(ids)}
    return torch.tensor(ids), torch.tensor([index.get(s, -1) for s in succ]), names


def successor_scores(model: HookedTransformer) -> Float[Tensor, "layer head"]:
    """Successor score of every head (module doc): top-1 OV logit among ordinal tokens is the successor."""
    ids, succ, _ = ordinal_tokens(model)
    eff = effective_embedding(model, ids)
    return torch.stack(
        [successor_share(ov_logits(model, layer, eff, ids), succ) for layer in range(model.cfg.n_layers)]
    )


def copy_sample(model: HookedTransformer, n: int = 2000, seed: int = 0) -> Int[Tensor, " n"]:
    """A fixed sample of ordinary word tokens for OV copying scores (of all token ids without a tokenizer)."""
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    n = check_count("n", n, why="sampled tokens")
    has_tokenizer = getattr(model, "tokenizer", None) is not None
    pool = word_token_ids(model) if has_tokenizer else torch.arange(model.cfg.d_vocab)
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=gen)[: min(n, len(pool))]].sort().values


def copying_scores(
    model: HookedTransformer, *, n: int = 2000, lowest: float = 0.01, seed: int = 0
) -> dict[str, Float[Tensor, "layer head"]]:
    """``{"copying", "negative_copying"}`` of every head from one pass over its OV logits (module docstring)."""
    check_model(model)
    n = check_count("n", n, why="sampled tokens")
    ids = copy_sample(model, n, seed)
    eff = effective_embedding(model, ids)
    shares = [own_rank_share(ov_logits(model, layer, eff, ids), lowest=lowest) for layer in range(model.cfg.n_layers)]
    top = torch.stack([t for t, _ in shares])
    bottom = torch.stack([b for _, b in shares])
    return {"copying": top - bottom, "negative_copying": bottom}


def negative_copying(
    model: HookedTransformer, *, n: int = 2000, lowest: float = 0.01, seed: int = 0
) -> Float[Tensor, "layer head"]:
    """Share of sampled word tokens that each head's OV circuit ranks in the lowest ``lowest`` of its own output."""
    return copying_scores(model, n=n, lowest=lowest, seed=seed)["negative_copying"]


@once_per_weights
def census_copying(model: HookedTransformer) -> dict[str, Float[Tensor, "layer head"]]:
    """copying_scores(model, n=CENSUS_COPY_SAMPLE), computed once per model state (two census columns)."""
    return copying_scores(model, n=CENSUS_COPY_SAMPLE)


# ---------------------------------------------------------------- attention to the predicted token


def predicted_mask(tokens: Int[Tensor, "batch pos"], predicted: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch q k"]:
    """``mask[b, q, k]``: key k < q holds the token the model predicts at query q (k >= 1: the sink is never counted)."""
    n = tokens.shape[1]
    same = tokens[:, None, :] == predicted[:, :, None]
    before = torch.ones(n, n, dtype=torch.bool).tril(-1)
    before[:, 0] = False
    return same & before


def attention_to_predicted(
    pattern: Float[Tensor, "batch head q k"], mask: Bool[Tensor, "batch q k"]
) -> Float[Tensor, "batch head"]:
    """Per sequence: attention on earlier occurrences of the predicted token, mean over queries that have one (NaN if none)."""
    return masked_attention(pattern, mask)


def copy_suppression_scores(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"] | None = None, *, seed: int = 0, progress: bool = False
) -> pd.DataFrame:
    """Per head: attention_to_predicted (on ``tokens``, default 4 x 128 prose tokens of the ``score`` split),
    negative_copying, and their product copy_suppression (module doc)."""
    check_model(model)
    if tokens is None:
        tokens = natural_text(model, seq_len=128, n_seqs=4, seed=seed, split="score").tokens
    mask = predicted_mask(tokens, model_predictions(model, tokens))
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sums, counts = torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, H, dtype=torch.float64)

    def reduce(layer, pattern, rows):
        add_defined(sums, counts, layer, attention_to_predicted(pattern, mask[rows]))

    stream_patterns(model, tokens, reduce, progress=progress, desc="copy suppression")
    attn = (sums / counts).float()  # NaN for a head no query scores, as in the census
    neg = negative_copying(model, seed=seed)
    return head_frame(model, attention_to_predicted=attn, negative_copying=neg, copy_suppression_score=attn * neg)


def heads_above(frame: pd.DataFrame, score: str, threshold: float) -> list[tuple[int, int]]:
    """(layer, head) pairs whose ``score`` reaches ``threshold``, strongest first."""
    part = frame[frame[score] >= threshold].sort_values(score, ascending=False)
    return [(int(l), int(h)) for l, h in zip(part["layer"], part["head"])]

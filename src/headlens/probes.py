"""Deterministic token batches with the metadata that head scores need.

Three probe kinds, each an equal-length batch (no padding) built from a seed:

- ``repeated``: ``[P, A1..An, A1..An]`` — ``prefix`` tokens P, then n distinct random tokens twice.
  Tokens are drawn from the *ordinary word tokens* of the tokenizer (a space followed by 3+ ASCII
  letters, e.g. ``" river"``), so no special, added or padding tokens and no ids past the tokenizer;
  each probe decodes to plain text that re-encodes to the same ids. P is distinct from the A's, so
  the only duplicated tokens are the repeats (and the first copy of A1 is not the sink position 0).
- ``natural``: windows of the prose part of the packaged corpus.
- ``delimiter``: windows of the code/data part of the corpus (punctuation, brackets, newlines).

Text windows start at the beginning of a line whose first token is an ordinary (non-delimiter,
non-whitespace) token, so the first-token sink and the delimiter score are never confounded.
Every probe carries ``is_delim``: which positions hold delimiter tokens (see :func:`is_delimiter`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.errors import HeadlensError

Kind = Literal["repeated", "natural", "delimiter"]
KINDS: tuple[Kind, ...] = ("repeated", "natural", "delimiter")
SEED_OFFSET = {"repeated": 0, "natural": 1, "delimiter": 2}
_WORD = re.compile(r"[A-Za-z]{3,}")


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """The small natural-text corpus shipped with headlens (written for it, license-clean)."""
    return (files("headlens") / "data" / "corpus.txt").read_text(encoding="utf-8")


def corpus_sections() -> dict[str, str]:
    """The corpus split at its first empty line: ``{"prose": ..., "code": ...}`` (code/data is delimiter-rich)."""
    prose, _, code = corpus_text().partition("\n\n")
    return {"prose": prose.strip("\n") + "\n", "code": code.strip("\n") + "\n"}


# ---------------------------------------------------------------- probe objects


@dataclass(frozen=True)
class Probe:
    """One equal-length token batch plus what the scores need to read it.

    ``n`` and ``prefix`` are set for ``kind == "repeated"`` (``seq_len == prefix + 2 * n``);
    ``is_delim[b, i]`` says whether token ``i`` of sequence ``b`` is a delimiter.
    """

    kind: Kind
    tokens: Int[Tensor, "batch pos"]
    is_delim: Bool[Tensor, "batch pos"]
    n: int | None = None
    prefix: int = 0

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def text(self, tokenizer) -> list[str]:
        """The probe decoded, one string per sequence."""
        return tokenizer.batch_decode(self.tokens.tolist())


@dataclass(frozen=True)
class ProbeSet:
    """The probes a census runs; a kind left as ``None`` leaves its scores NaN."""

    repeated: Probe | None = None
    natural: Probe | None = None
    delimiter: Probe | None = None
    seed: int | None = field(default=None, compare=False)

    def __iter__(self) -> Iterator[Probe]:
        return (p for p in (self.repeated, self.natural, self.delimiter) if p is not None)

    def n_tokens(self) -> int:
        return sum(p.tokens.numel() for p in self)


def default_probes(
    model: HookedTransformer,
    *,
    seed: int = 0,
    batch: int = 4,
    n: int = 64,
    seq_len: int = 128,
) -> ProbeSet:
    """The census default: ``batch`` repeated sequences (``1 + 2n`` tokens) and ``batch`` windows each of natural and delimiter-rich text."""
    return ProbeSet(
        repeated=repeated_tokens(model, n=n, batch=batch, seed=seed),
        natural=natural_text(model, seq_len=seq_len, batch=batch, seed=seed),
        delimiter=delimiter_text(model, seq_len=seq_len, batch=batch, seed=seed),
        seed=seed,
    )


# ---------------------------------------------------------------- repeated random tokens


def repeated_tokens(model: HookedTransformer, *, n: int = 64, batch: int = 4, prefix: int = 1, seed: int = 0) -> Probe:
    """``batch`` sequences ``[P, A1..An, A1..An]`` of distinct ordinary word tokens (seeded)."""
    if int(n) < 2:
        raise HeadlensError(f"repeated-token probes need n >= 2 tokens per half (got n={n})")
    if int(prefix) < 0 or int(batch) < 1:
        raise HeadlensError(
            f"repeated-token probes need prefix >= 0 and batch >= 1 (got prefix={prefix}, batch={batch})"
        )
    tokenizer = _tokenizer(model)
    _check_len(model, prefix + 2 * n, "repeated-token probe")
    pool_t = word_token_ids(model)
    if len(pool_t) < prefix + n:
        raise HeadlensError(
            f"the tokenizer has only {len(pool_t)} ordinary word tokens; a repeated probe with n={n} and prefix={prefix} "
            f"needs {prefix + n} distinct ones. Lower n."
        )
    gen = torch.Generator().manual_seed(int(seed) * 1000 + SEED_OFFSET["repeated"])
    rows = []
    for _ in range(batch):
        ids = pool_t[torch.randperm(len(pool_t), generator=gen)[: prefix + n]]
        rows.append(torch.cat([ids[:prefix], ids[prefix:], ids[prefix:]]))
    tokens = torch.stack(rows)
    return Probe("repeated", tokens, delimiter_mask(tokenizer, tokens), n=int(n), prefix=int(prefix))


def word_token_ids(model: HookedTransformer) -> Int[Tensor, " n"]:
    """The model's ordinary word tokens (:func:`word_tokens`) that lie inside its embedding."""
    return torch.tensor([i for i in word_tokens(_tokenizer(model)) if i < model.cfg.d_vocab])


@lru_cache(maxsize=8)
def word_tokens(tokenizer) -> tuple[int, ...]:
    """Ids of ordinary word tokens (space + 3 or more ASCII letters) that decode and re-encode to themselves."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = [i for i in range(len(tokenizer)) if i not in special]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    candidates = [(i, p[1:]) for i, p in zip(ids, pieces) if p and p[0] in "Ġ▁" and _WORD.fullmatch(p[1:])]
    if not candidates:
        texts = tokenizer.batch_decode([[i] for i in ids])
        candidates = [(i, t[1:]) for i, t in zip(ids, texts) if t[:1] == " " and _WORD.fullmatch(t[1:])]
    strings = [" " + word for _, word in candidates]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encoded = [e.ids for e in backend.encode_batch(strings, add_special_tokens=False)]
    else:
        encoded = tokenizer(strings, add_special_tokens=False)["input_ids"] if strings else []
    return tuple(i for (i, _), e in zip(candidates, encoded) if e == [i])


# ---------------------------------------------------------------- text windows


def natural_text(
    model: HookedTransformer, *, seq_len: int = 128, batch: int = 4, seed: int = 0, text: str | None = None
) -> Probe:
    """``batch`` windows of ``seq_len`` tokens of ``text`` (default: the corpus prose), starting at line starts (seeded)."""
    return _text_probe(model, "natural", corpus_sections()["prose"] if text is None else text, seq_len, batch, seed)


def delimiter_text(
    model: HookedTransformer, *, seq_len: int = 128, batch: int = 4, seed: int = 0, text: str | None = None
) -> Probe:
    """Like :func:`natural_text` over delimiter-rich text (default: the corpus's code and data lines)."""
    return _text_probe(model, "delimiter", corpus_sections()["code"] if text is None else text, seq_len, batch, seed)


def _text_probe(model: HookedTransformer, kind: Kind, text: str, seq_len: int, batch: int, seed: int) -> Probe:
    if not isinstance(text, str) or not text.strip():
        raise HeadlensError(
            f"{kind} probe: the text is empty; pass some text (several lines, at least {seq_len} tokens)"
        )
    if int(seq_len) < 2 or int(batch) < 1:
        raise HeadlensError(f"{kind} probe: seq_len must be >= 2 and batch >= 1 (got seq_len={seq_len}, batch={batch})")
    _check_len(model, seq_len, f"{kind} probe")
    tokenizer = _tokenizer(model)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    if len(ids) < seq_len:
        raise HeadlensError(
            f"{kind} probe: the text has {len(ids)} tokens, fewer than seq_len={seq_len}; give more text or lower seq_len"
        )
    delim = delimiter_mask(tokenizer, ids[None])[0]
    pieces = tokenizer.batch_decode([[i] for i in ids.tolist()])
    starts = [
        t
        for t, (begin, _) in enumerate(enc["offset_mapping"])
        if t + seq_len <= len(ids) and (begin == 0 or text[begin - 1] == "\n") and not delim[t] and pieces[t].strip()
    ]
    if not starts:
        starts = [t for t in range(len(ids) - seq_len + 1) if not delim[t] and pieces[t].strip()] or [0]
    gen = torch.Generator().manual_seed(int(seed) * 1000 + SEED_OFFSET[kind])
    order = torch.randperm(len(starts), generator=gen).tolist()
    chosen = [starts[order[b % len(order)]] for b in range(batch)]
    tokens = torch.stack([ids[s : s + seq_len] for s in chosen])
    return Probe(kind, tokens, torch.stack([delim[s : s + seq_len] for s in chosen]))


# ---------------------------------------------------------------- delimiters


def is_delimiter(piece: str) -> bool:
    """A token is a delimiter when, spaces and tabs removed, it is non-empty punctuation, symbols and/or newlines.

    Partial UTF-8 pieces (decoded as U+FFFD) are not delimiters; whitespace-only indentation is not either.
    """
    core = piece.replace(" ", "").replace("\t", "")
    if not core or "\ufffd" in core:
        return False
    return all(c in "\r\n" or unicodedata.category(c)[0] in "PS" for c in core)


def delimiter_mask(tokenizer, tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Which positions of ``tokens`` are delimiters: special tokens ([SEP], [CLS], <|endoftext|>, ...) or :func:`is_delimiter` pieces."""
    special = set(tokenizer.all_special_ids)
    unique = sorted(set(tokens.flatten().tolist()))
    pieces = tokenizer.batch_decode([[i] for i in unique])
    lookup = {i: (i in special) or is_delimiter(p) for i, p in zip(unique, pieces)}
    return torch.tensor([[lookup[i] for i in row] for row in tokens.tolist()], dtype=torch.bool).reshape(tokens.shape)


# ---------------------------------------------------------------- checks


def check_probes(model: HookedTransformer, probes: ProbeSet) -> None:
    """Raise a HeadlensError when a probe cannot run on ``model`` or its metadata does not fit its tokens."""
    if not isinstance(probes, ProbeSet):
        raise HeadlensError(
            f"probes must be a headlens.probes.ProbeSet (got {type(probes).__name__}); build one with default_probes()"
        )
    if not any(True for _ in probes):
        raise HeadlensError("the probe set is empty: give at least one of repeated, natural or delimiter probes")
    for probe in probes:
        tokens = probe.tokens
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
            raise HeadlensError(
                f"{probe.kind} probe: tokens must be [batch, pos] with batch >= 1 and pos >= 2 (got {tuple(tokens.shape)})"
            )
        _check_len(model, probe.seq_len, f"{probe.kind} probe")
        if int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab:
            raise HeadlensError(f"{probe.kind} probe: token ids must lie in [0, {model.cfg.d_vocab}) for this model")
        if tuple(probe.is_delim.shape) != tuple(tokens.shape):
            raise HeadlensError(
                f"{probe.kind} probe: is_delim has shape {tuple(probe.is_delim.shape)}, tokens {tuple(tokens.shape)}"
            )
        if probe.kind == "repeated":
            if probe.n is None or probe.n < 2:
                raise HeadlensError(f"repeated probe: n must be >= 2 (got {probe.n})")
            if probe.prefix < 0 or probe.prefix + 2 * probe.n != probe.seq_len:
                raise HeadlensError(
                    f"repeated probe: seq_len {probe.seq_len} != prefix {probe.prefix} + 2 * n {probe.n}"
                )


def _check_len(model: HookedTransformer, seq_len: int, what: str) -> None:
    if seq_len > model.cfg.n_ctx:
        raise HeadlensError(
            f"{what} of {seq_len} tokens is longer than the model's context (n_ctx={model.cfg.n_ctx}); use shorter probes"
        )


def _tokenizer(model: HookedTransformer):
    if getattr(model, "tokenizer", None) is None:
        raise HeadlensError(
            "this probe needs a model with a tokenizer; for a tokenizer-less model pass probes= a ProbeSet built from token ids (e.g. headlens.toy.toy_probes(model))"
        )
    return model.tokenizer

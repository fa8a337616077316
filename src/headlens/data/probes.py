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
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.data import corpus
from headlens.errors import HeadlensError, check_count, check_model

Kind = str
KINDS: tuple[str, ...] = ("repeated", "natural", "delimiter")
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

    ``n`` and ``prefix`` are set for repeated probes: one number for all sequences, or a ``[batch]``
    tensor when the half-length varies (``seq_len == prefix + 2 * n`` per sequence). ``is_delim[b, i]``
    says whether token ``i`` of sequence ``b`` is a delimiter; ``sources`` names where each text
    window came from (``"file.py@token"``), empty for synthetic probes.
    """

    kind: str
    tokens: Int[Tensor, "batch pos"]
    is_delim: Bool[Tensor, "batch pos"]
    n: int | Tensor | None = None
    prefix: int | Tensor = 0
    sources: tuple[str, ...] = field(default=(), compare=False)

    @property
    def n_seqs(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_per_seq(self) -> Int[Tensor, " batch"]:
        """The repeat half-length of every sequence."""
        if self.n is None:
            raise HeadlensError(f"{self.kind} probe has no repeat half-length n")
        n = torch.as_tensor(self.n, dtype=torch.long).flatten()
        return n.expand(self.n_seqs).clone() if n.numel() == 1 else n

    @property
    def prefix_per_seq(self) -> Int[Tensor, " batch"]:
        """The prefix length of every sequence (repeated probes)."""
        return self.seq_len - 2 * self.n_per_seq

    def text(self, tokenizer) -> list[str]:
        """The probe decoded, one string per sequence."""
        return tokenizer.batch_decode(self.tokens.tolist())


class ProbeSet(Mapping):
    """The probes a census runs: a mapping kind -> :class:`Probe` (a kind left out leaves its scores NaN).

    Build it as ``ProbeSet({"repeated": p, "code": q})`` or ``ProbeSet(repeated=p, natural=q)``; kinds read as
    attributes too (``probes.repeated``, None when absent). Iterating yields the *probes* (not the kinds),
    as before; use ``keys()``/``items()`` for kinds.
    """

    def __init__(self, probes: Mapping[str, Probe] | None = None, *, seed: int | None = None, **kinds: Probe | None):
        merged = {**dict(probes or {}), **kinds}
        self._probes = {k: v for k, v in merged.items() if v is not None}
        self.seed = seed

    def __getitem__(self, kind: str) -> Probe:
        return self._probes[kind]

    def __getattr__(self, kind: str) -> Probe | None:
        if kind.startswith("_"):
            raise AttributeError(kind)
        return self.__dict__.get("_probes", {}).get(kind)

    def __iter__(self) -> Iterator[Probe]:
        return iter(list(self._probes.values()))

    def __len__(self) -> int:
        return len(self._probes)

    def __contains__(self, kind) -> bool:
        return kind in self._probes

    def keys(self):
        return self._probes.keys()

    def items(self):
        return self._probes.items()

    def values(self):
        return self._probes.values()

    def __eq__(self, other) -> bool:
        if not isinstance(other, ProbeSet) or self.keys() != other.keys():
            return False
        return all(_same_probe(self[k], other[k]) for k in self.keys())

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={tuple(p.tokens.shape)}" for k, p in self.items())
        return f"ProbeSet({inner}, seed={self.seed})"

    def n_tokens(self) -> int:
        return sum(p.tokens.numel() for p in self)


def _same_probe(a: Probe, b: Probe) -> bool:
    same_n = (a.n is None) == (b.n is None) and (a.n is None or torch.equal(a.n_per_seq, b.n_per_seq))
    return a.kind == b.kind and same_n and torch.equal(a.tokens, b.tokens) and torch.equal(a.is_delim, b.is_delim)


ProbeBuilder = Callable[..., Probe]
_BUILDERS: dict[str, ProbeBuilder] = {}


def register_probe(kind: str, builder: ProbeBuilder, *, replace: bool = False) -> None:
    """Make ``builder(model, *, seed, batch, seq_len) -> Probe`` the default probe of ``kind`` (used by :func:`default_probes`)."""
    if not isinstance(kind, str) or not kind.isidentifier():
        raise HeadlensError(f"probe kind must be an identifier string (got {kind!r})")
    if kind in _BUILDERS and not replace:
        raise HeadlensError(f"probe kind {kind!r} already has a builder; pass replace=True to overwrite it")
    if not callable(builder):
        raise HeadlensError(
            f"the builder of probe kind {kind!r} must be callable as builder(model, *, seed, batch, seq_len)"
        )
    _BUILDERS[kind] = builder


def probe_kinds() -> tuple[str, ...]:
    """The probe kinds :func:`default_probes` can build, in registration order."""
    return tuple(_BUILDERS)


DEFAULT_BATCH = 16
DEFAULT_SEQ_LEN = 128
DEFAULT_SIZES = {"repeated": 24, "natural": 48, "delimiter": 48, "code": 48, "predicted": 0}
"""Sequences per probe kind in the default census (other kinds: ``DEFAULT_BATCH``; 0: the kind is left out). Chosen
on development seeds of the default Qwen (``analyses/census_trust.py``, ``dev_sizes.csv``): the text kinds carry most
label changes between seeds, so they get the most sequences; ``code`` too, because scored bracket pairs are rare (2-3
per window). ``predicted`` feeds only a score column (``attention_to_predicted``) and needs an extra full forward with
the unembedding, so it is opt-in: ``default_probes(model, batch=8, kinds=["predicted"])`` builds it. Cost: the census
over these tokens takes 1.09x a forward that stops where it stops (109 s on 2 CPU cores,
``benchmarks/results/census.json``)."""


def default_probes(
    model: HookedTransformer,
    *,
    seed: int = 0,
    n_seqs: int | None = None,
    n: int = 64,
    seq_len: int = DEFAULT_SEQ_LEN,
    kinds: Iterable[str] | None = None,
) -> ProbeSet:
    """The census default: every registered probe kind (or ``kinds``), ``n_seqs`` sequences each.

    ``n_seqs=None`` takes :data:`DEFAULT_SIZES` per kind (``DEFAULT_BATCH`` for kinds it does not list).

    Repeated probes have ``seq_len = 2n + 1`` and half-lengths drawn from n/2..n per sequence; text
    probes are non-overlapping ``seq_len``-token windows (natural: the Python reference docs; delimiter:
    stdlib code; see :mod:`headlens.data.corpus`).
    """
    check_model(model)
    n_seqs = None if n_seqs is None else check_count("n_seqs", n_seqs)
    n = check_count("n", n, minimum=2, why="tokens per half of a repeated probe")
    seq_len = check_count("seq_len", seq_len, minimum=2)
    wanted = list(_BUILDERS) if kinds is None else list(kinds)
    unknown = [k for k in wanted if k not in _BUILDERS]
    if unknown:
        raise HeadlensError(
            f"no probe builder for kinds {unknown}; known: {', '.join(_BUILDERS)} (register_probe adds one)"
        )
    built = {}
    for kind in wanted:
        size = DEFAULT_SIZES.get(kind, DEFAULT_BATCH) if n_seqs is None else int(n_seqs)
        if size == 0:
            continue
        if kind == "repeated":
            built[kind] = repeated_tokens(model, n=n, n_min=max(2, n // 2), n_seqs=size, seed=seed)
        else:
            built[kind] = _BUILDERS[kind](model, seed=seed, n_seqs=size, seq_len=seq_len)
    return ProbeSet(built, seed=seed)


# ---------------------------------------------------------------- repeated random tokens


def repeated_tokens(
    model: HookedTransformer,
    *,
    n: int = 64,
    n_seqs: int = 4,
    prefix: int = 1,
    seed: int = 0,
    n_min: int | None = None,
    shuffled: bool = False,
) -> Probe:
    """``n_seqs`` sequences ``[P, A1..An, A1..An]`` of distinct ordinary word tokens (seeded).

    With ``n_min``, each sequence draws its own half-length from ``n_min..n`` and pads the front with
    more prefix tokens (equal length ``prefix + 2n``), so the induction key is not always at distance
    n - 1. ``shuffled=True`` permutes the second half (a structure-destroyed null probe: same tokens,
    no order to copy).
    """
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    n = check_count("n", n, minimum=2, why="tokens per half")
    n_seqs = check_count("n_seqs", n_seqs)
    prefix = check_count("prefix", prefix, minimum=0)
    n_min = None if n_min is None else check_count("n_min", n_min, minimum=2)
    if n_min is not None and n_min > n:
        raise HeadlensError(f"repeated-token probes need n_min <= n (got n={n}, n_min={n_min})")
    tokenizer = _tokenizer(model)
    seq_len = int(prefix) + 2 * int(n)
    _check_len(model, seq_len, "repeated-token probe")
    pool_t = word_token_ids(model)
    if len(pool_t) < seq_len - int(n):
        raise HeadlensError(
            f"the tokenizer has only {len(pool_t)} ordinary word tokens; a repeated probe with n={n} and prefix={prefix} "
            f"needs {seq_len - int(n)} distinct ones. Lower n."
        )
    gen = torch.Generator().manual_seed(int(seed) * 1000 + SEED_OFFSET["repeated"] + (500 if shuffled else 0))
    rows, ns = [], []
    for _ in range(n_seqs):
        k = int(n) if n_min is None else int(torch.randint(int(n_min), int(n) + 1, (1,), generator=gen))
        pre = seq_len - 2 * k
        ids = pool_t[torch.randperm(len(pool_t), generator=gen)[: pre + k]]
        second = ids[pre:][torch.randperm(k, generator=gen)] if shuffled else ids[pre:]
        rows.append(torch.cat([ids[:pre], ids[pre:], second]))
        ns.append(k)
    tokens = torch.stack(rows)
    if n_min is None:
        return Probe("repeated", tokens, delimiter_mask(tokenizer, tokens), n=int(n), prefix=int(prefix))
    n_t = torch.tensor(ns, dtype=torch.long)
    return Probe("repeated", tokens, delimiter_mask(tokenizer, tokens), n=n_t, prefix=seq_len - 2 * n_t)


def word_token_ids(model: HookedTransformer) -> Int[Tensor, " n"]:
    """The model's ordinary word tokens (:func:`word_tokens`) that lie inside its embedding."""
    check_model(model)
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
    model: HookedTransformer,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    n_seqs: int = 4,
    seed: int = 0,
    text: str | None = None,
    split: str | None = None,
) -> Probe:
    """``n_seqs`` non-overlapping ``seq_len``-token windows of prose: ``text``, or the Python reference docs (seeded).

    ``split`` (``score``, ``eval``, ``reference``: :mod:`headlens.data.corpus`) draws instead from that held-out split
    of the reference docs and the stdlib's docstrings, seed ``s`` taking the ``s``-th block of the split's windows:
    different seeds never share a window, different splits never share a file. Without it windows of two seeds may
    overlap.
    """
    check_model(model)
    return _text_probe(model, "natural", seq_len, n_seqs, seed, text, split)


def delimiter_text(
    model: HookedTransformer,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    n_seqs: int = 4,
    seed: int = 0,
    text: str | None = None,
    split: str | None = None,
) -> Probe:
    """Like :func:`natural_text` over delimiter-rich text: ``text``, or the Python standard library's code."""
    check_model(model)
    return _text_probe(model, "delimiter", seq_len, n_seqs, seed, text, split)


def _check_text(text, kind: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise HeadlensError(
            f"{kind} probe: the text is empty; pass some text (several lines, enough tokens for the windows)"
        )
    return text


_TEXT_SOURCES = {"natural": (corpus.prose_documents, 4), "delimiter": (corpus.code_documents, 1)}
"""Each text kind's documents (seeded) and how many windows one document may give."""
_SPLIT_SOURCES = {"natural": ("prose", None), "delimiter": ("code", "delimiter")}
"""Each text kind's documents in a held-out split: :func:`headlens.data.corpus.split_documents`' kind and part."""


def _text_probe(
    model: HookedTransformer, kind: str, seq_len: int, n_seqs: int, seed: int, text: str | None, split: str | None
) -> Probe:
    seq_len, n_seqs = check_count("seq_len", seq_len, minimum=2), check_count("n_seqs", n_seqs)
    documents, per_document = _TEXT_SOURCES[kind]
    if text is None:
        docs = documents(seed=seed)
    else:
        docs, per_document = [corpus.Document("text", _check_text(text, kind))], n_seqs
    _check_len(model, seq_len, f"{kind} probe")
    tokenizer = _tokenizer(model)
    if split is not None:
        if text is not None:
            raise HeadlensError(f"{kind} probe: give text= or split=, not both")
        tokens, sources = split_windows(
            tokenizer, *_SPLIT_SOURCES[kind], split, seq_len=seq_len, n_seqs=n_seqs, seed=seed
        )
        return Probe(kind, tokens, delimiter_mask(tokenizer, tokens), sources=sources)
    tokens, sources = corpus.text_windows(
        tokenizer,
        docs,
        seq_len=seq_len,
        n_seqs=n_seqs,
        seed=int(seed) * 1000 + SEED_OFFSET[kind],
        per_document=per_document,
        is_delim=lambda ids: delimiter_mask(tokenizer, ids[None])[0],
    )
    return Probe(kind, tokens, delimiter_mask(tokenizer, tokens), sources=sources)


_TOKENIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_cache(tokenizer, name: str) -> dict:
    """A cache ``name`` private to ``tokenizer`` and dropped with it: keyed by the object, not by ``id()``, which a
    later tokenizer can reuse (with the same vocabulary size it would have read the dead one's token ids)."""
    try:
        return _TOKENIZED.setdefault(tokenizer, {}).setdefault(name, {})
    except TypeError:  # not weakly referenceable: no cache, only a re-tokenization
        return {}


def split_windows(
    tokenizer, kind: str, part: str | None, split: str, *, seq_len: int, n_seqs: int, seed: int
) -> tuple[Int[Tensor, "batch pos"], tuple[str, ...]]:
    """Windows of ``seq_len`` tokens from a held-out split (:func:`headlens.data.corpus.split_documents` of ``kind``
    and ``part``): seed ``s`` takes its own stretch of the split's fixed window order
    (:func:`headlens.data.corpus.window_block`)."""
    ids_of: dict[str, Tensor] = {}
    candidates = _split_candidates(tokenizer, kind, part, split, seq_len, ids_of)
    chosen = corpus.window_block(candidates, n_seqs=n_seqs, block=seed)
    tokens = torch.stack([ids_of[name][t : t + seq_len] for name, t in chosen])
    return tokens, tuple(f"{name}@{t}" for name, t in chosen)


def _split_candidates(tokenizer, kind: str, part: str | None, split: str, seq_len: int, ids_of: dict):
    """``(document, its disjoint window starts)`` of the split in its fixed order; fills ``ids_of[document]``."""
    cache = tokenizer_cache(tokenizer, "windows")  # document -> (token ids, disjoint window starts)
    for doc in corpus.split_documents(kind, split, part):
        key = (len(tokenizer), doc.name, len(doc.text), seq_len)
        if key not in cache:
            enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor(enc["input_ids"], dtype=torch.long)
            starts = []
            if len(ids) >= seq_len:
                delim = delimiter_mask(tokenizer, ids[None])[0]
                starts = corpus.disjoint_starts(
                    corpus.line_starts(doc.text, enc["offset_mapping"], delim, seq_len), seq_len
                )
            cache[key] = (ids, starts)
        ids_of[doc.name], starts = cache[key]
        yield doc.name, starts


def window_capacity(
    model: HookedTransformer, kind: str, *, split: str = "score", seq_len: int = DEFAULT_SEQ_LEN
) -> int:
    """How many windows the ``natural`` or ``delimiter`` probe can draw from ``split``: seeds that never share one
    ask for that many in all (:func:`headlens.data.corpus.window_block`). For ``code``:
    :func:`headlens.data.code.code_capacity`."""
    check_model(model)
    if kind not in _SPLIT_SOURCES:
        raise HeadlensError(f"window_capacity counts the text kinds {list(_SPLIT_SOURCES)} (got {kind!r})")
    corpus.check_split(split)
    seq_len = check_count("seq_len", seq_len, minimum=2)
    return sum(len(s) for _, s in _split_candidates(_tokenizer(model), *_SPLIT_SOURCES[kind], split, seq_len, {}))


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


TOKEN_DTYPES = (torch.int64, torch.int32)
"""What an embedding lookup takes as ids: int16 fails deep inside torch, and uint8 indexes as a mask."""


def check_token_ids(model: HookedTransformer, tokens: Tensor, what: str = "tokens") -> Tensor:
    """``tokens`` when they are integer ids of ``model``'s vocabulary: an id < 0 would silently read the embedding
    table from its end (``W_E[-1]``), one past it or a float id fails deep inside torch."""
    check_model(model)
    if not isinstance(tokens, Tensor) or tokens.dtype not in TOKEN_DTYPES:
        raise HeadlensError(
            f"{what} must be a tensor of integer token ids (got {getattr(tokens, 'dtype', type(tokens).__name__)}): "
            "use model.to_tokens"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab):
        bad = int(tokens.min()) if int(tokens.min()) < 0 else int(tokens.max())
        raise HeadlensError(
            f"{what}: token id {bad} is not in this model's vocabulary (ids 0..{model.cfg.d_vocab - 1}): "
            "tokenize with this model (model.to_tokens)"
        )
    return tokens


def check_probes(model: HookedTransformer, probes: ProbeSet) -> None:
    """Raise a HeadlensError when a probe cannot run on ``model`` or its metadata does not fit its tokens."""
    check_model(model)
    if not isinstance(probes, ProbeSet):
        raise HeadlensError(
            f"probes must be a headlens.data.probes.ProbeSet (got {type(probes).__name__}); build one with default_probes()"
        )
    if not len(probes):
        raise HeadlensError("the probe set is empty: give at least one probe (e.g. repeated, natural or delimiter)")
    for kind, probe in probes.items():
        if probe.kind != kind:
            raise HeadlensError(
                f"the probe set holds a {probe.kind!r} probe under {kind!r}: key each probe by its kind"
            )
        tokens = check_token_ids(model, probe.tokens, f"{probe.kind} probe")
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
            raise HeadlensError(
                f"{probe.kind} probe: tokens must be [batch, pos] with batch >= 1 and pos >= 2 (got {tuple(tokens.shape)})"
            )
        _check_len(model, probe.seq_len, f"{probe.kind} probe")
        if tuple(probe.is_delim.shape) != tuple(tokens.shape):
            raise HeadlensError(
                f"{probe.kind} probe: is_delim has shape {tuple(probe.is_delim.shape)}, tokens {tuple(tokens.shape)}"
            )
        if probe.kind == "repeated":
            if probe.n is None:
                raise HeadlensError("repeated probe: n (the repeat half-length) must be set")
            n = probe.n_per_seq
            prefix = torch.as_tensor(probe.prefix, dtype=torch.long).flatten().expand(probe.n_seqs)
            if n.numel() != probe.n_seqs or int(n.min()) < 2:
                raise HeadlensError(f"repeated probe: n must be >= 2, one number or one per sequence (got {probe.n})")
            if int(prefix.min()) < 0 or bool((prefix + 2 * n != probe.seq_len).any()):
                raise HeadlensError(
                    f"repeated probe: seq_len {probe.seq_len} != prefix {probe.prefix} + 2 * n {probe.n}"
                )


def _check_len(model: HookedTransformer, seq_len: int, what: str) -> None:
    if seq_len > model.cfg.n_ctx:
        raise HeadlensError(
            f"{what} of {seq_len} tokens is longer than the model's context (n_ctx={model.cfg.n_ctx}); use shorter sequences (seq_len, --seq-len)"
        )


def _tokenizer(model: HookedTransformer):
    if getattr(model, "tokenizer", None) is None:
        raise HeadlensError(
            "this probe needs a model with a tokenizer; for a tokenizer-less model pass probes= a ProbeSet built from token ids (e.g. headlens.analysis.toy.toy_probes(model))"
        )
    return model.tokenizer

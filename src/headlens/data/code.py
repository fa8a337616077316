"""Probes of real Python code (the standard library) with bracket and identifier metadata.

:func:`code_probe` takes windows of ``seq_len`` model tokens from standard-library sources
(``sysconfig.get_paths()["stdlib"]``, the running Python's own files) and marks, with Python's own
``tokenize`` (so brackets inside strings and comments do not count):

- bracket pairs: for each closing ``)``/``]``/``}``, marked at the token *before* it (the position whose
  prediction is the closer), the position of its matching opener, with the nesting depth of the pair in the
  whole file (1 = outermost). Only pairs where both brackets are their own model token (the token's text,
  spaces stripped, is the bracket: ``))`` or ``):`` merge and are skipped) and whose opener is at least
  ``MIN_GAP`` tokens before that position (so that the opener's region lies beyond the local window of 3
  keys and a previous-token or local head does not score) are kept.
- closers: every position whose next token *starts* with a closing bracket (``)``, ``):``, ``)\n``, `` ]``: most
  closers share their token) whose opener is at least ``MIN_GAP`` tokens back, whatever the opener's token.
- identifier uses: each occurrence of a name (not a keyword) whose model token is the name itself, and that
  already occurred earlier in the window; its keys are all model tokens of those earlier occurrences.

The scores over these probes are in :mod:`headlens.census.code_heads`.
"""

from __future__ import annotations

import io
import keyword
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.data.corpus import check_split, disjoint_starts, split_documents, window_block
from headlens.data.probes import Probe, delimiter_mask, tokenizer_cache
from headlens.errors import HeadlensError, check_count, check_model

MIN_GAP = 5
"""A scored pair's opener is at least this many tokens before the token that predicts its closer, so that the whole
region (opener + ``REGION``) is beyond the local window of 3 keys."""
REGION = 1
"""The bracket score counts the keys from opener - REGION to opener + REGION."""
OPEN, CLOSE = "([{", ")]}"


@dataclass(frozen=True)
class CodeProbe(Probe):
    """Windows of real code (kind ``code``) with bracket and identifier metadata (see the module doc).

    ``opener[b, q]``: when token q + 1 is a scored closing bracket, the position of its opener, else -1;
    ``depth[b, q]``: that pair's nesting depth (0 elsewhere); ``closer[b, q]``: token q + 1 starts with a closing
    bracket whose opener is in the window, >= ``MIN_GAP`` tokens before q (a superset of ``opener >= 0``);
    ``is_opener[b, k]``: token k is an opening bracket that is its own token; ``ident[b, q, k]``: key k is an
    earlier occurrence of the name used at q; ``sources``: ``"file.py@token"`` where each window starts.
    """

    opener: Tensor | None = None
    closer: Tensor | None = None
    depth: Tensor | None = None
    is_opener: Tensor | None = None
    ident: Tensor | None = None


def stdlib_sources(names) -> dict[str, str]:
    """The named standard-library files' text (the running Python's; recorded with results as ``sys.version``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for name in names:
        path = root / name
        if not path.is_file():
            raise HeadlensError(f"standard-library file {path} is missing; pass other files= that exist under {root}")
        out[name] = path.read_text(encoding="utf-8")
    return out


def _annotate(text: str):
    """(bracket pairs [(open_char, close_char, depth)], names [(start_char, end_char, name)]) of Python source ``text``."""
    line_start = [0]
    for line in text.splitlines(keepends=True):
        line_start.append(line_start[-1] + len(line))
    pairs, names, stack = [], [], []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        start = line_start[tok.start[0] - 1] + tok.start[1]
        if tok.type == tokenize.OP and tok.string in OPEN:
            stack.append((start, tok.string))
        elif tok.type == tokenize.OP and tok.string in CLOSE and stack:
            begin, char = stack.pop()
            if OPEN.index(char) == CLOSE.index(tok.string):
                pairs.append((begin, start, len(stack) + 1))
        elif tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
            names.append((start, start + len(tok.string), tok.string))
    return pairs, names


def _file_arrays(tokenizer, text: str):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offsets = enc["offset_mapping"]
    char_tok = {}
    for t, (a, b) in enumerate(offsets):
        for c in range(a, b):
            char_tok.setdefault(c, t)
    pieces = [text[a:b] for a, b in offsets]
    pairs, names = _annotate(text)
    # position predicting a closer that starts its token (the token before it) -> (opening-token position, depth,
    # scored: both brackets are their own token)
    closers = {}
    for a, b, depth in pairs:
        ta, tb = char_tok.get(a), char_tok.get(b)
        if ta is None or tb is None or tb - 1 - ta < MIN_GAP or text[offsets[tb][0] : b].strip():
            continue
        closers[tb - 1] = (ta, depth, pieces[ta].strip() == text[a] and pieces[tb].strip() == text[b])
    occurrences = []  # (token positions of the occurrence, name, is-own-token)
    for a, b, name in names:
        toks = sorted({char_tok[c] for c in range(a, b) if c in char_tok})
        own = len(toks) == 1 and pieces[toks[0]].strip() == name
        occurrences.append((toks, name, own))
    openers = sorted(
        {char_tok[a] for a, _, _ in pairs if char_tok.get(a) is not None and pieces[char_tok[a]].strip() == text[a]}
    )
    return ids, offsets, closers, occurrences, openers


def code_probe(
    model: HookedTransformer,
    *,
    seq_len: int = 128,
    n_seqs: int = 8,
    seed: int = 0,
    split: str = "score",
    min_pairs: int = 2,
) -> CodeProbe:
    """``n_seqs`` windows of stdlib code from one held-out ``split``, each starting at a line start and holding
    >= ``min_pairs`` scored bracket pairs.

    The split's files come in a fixed order (:func:`headlens.data.corpus.split_documents`), each file's windows are
    disjoint, and seed ``s`` takes block ``s`` of that order (:func:`headlens.data.corpus.window_block`): two seeds
    never share a token, two splits never share a file (``eval`` for causal checks, ``reference`` for ablation means).
    """
    check_model(model)
    seed = check_count("seed", seed, minimum=0)
    seq_len = check_count("seq_len", seq_len, minimum=8)
    n_seqs = check_count("n_seqs", n_seqs)
    min_pairs = check_count("min_pairs", min_pairs, minimum=0, why="bracket pairs a window must hold")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise HeadlensError("the code probe needs a model with a tokenizer")
    if seq_len < 8 or n_seqs < 1 or seq_len > model.cfg.n_ctx:
        raise HeadlensError(
            f"code probe: need 8 <= seq_len <= n_ctx={model.cfg.n_ctx} and n_seqs >= 1 (got {seq_len}, {n_seqs})"
        )
    arrays: dict = {}  # file -> token ids, offsets, bracket pairs, names, openers
    try:
        chosen = window_block(_candidates(tokenizer, split, seq_len, min_pairs, arrays), n_seqs=n_seqs, block=seed)
    except HeadlensError as err:
        raise HeadlensError(f"code probe ({split} split, >= {min_pairs} bracket pairs per window): {err}") from None
    tokens = torch.zeros(n_seqs, seq_len, dtype=torch.long)
    opener_t = torch.full((n_seqs, seq_len), -1, dtype=torch.long)
    depth_t = torch.zeros(n_seqs, seq_len, dtype=torch.long)
    closer_t = torch.zeros(n_seqs, seq_len, dtype=torch.bool)
    is_opener = torch.zeros(n_seqs, seq_len, dtype=torch.bool)
    ident = torch.zeros(n_seqs, seq_len, seq_len, dtype=torch.bool)
    for b, (name, s) in enumerate(chosen):
        ids, _, closers, occ, openers = arrays[name]
        tokens[b] = torch.tensor(ids[s : s + seq_len])
        for o in openers:
            if s <= o < s + seq_len:
                is_opener[b, o - s] = True
        for c, (o, depth, is_scored) in closers.items():
            if s <= o and c + 1 < s + seq_len:
                closer_t[b, c - s] = True
                if is_scored:
                    opener_t[b, c - s], depth_t[b, c - s] = o - s, depth
        seen: dict[str, list[int]] = {}
        for toks, nm, own in occ:
            if not toks or toks[0] < s or toks[-1] >= s + seq_len:
                continue
            if own and seen.get(nm):
                ident[b, toks[0] - s, seen[nm]] = True
            seen.setdefault(nm, []).extend(t - s for t in toks)
    sources = tuple(f"{name}@{s}" for name, s in chosen)
    mask = delimiter_mask(tokenizer, tokens)
    return CodeProbe(
        "code",
        tokens,
        mask,
        sources=sources,
        opener=opener_t,
        depth=depth_t,
        closer=closer_t,
        is_opener=is_opener,
        ident=ident,
    )


def _candidates(tokenizer, split: str, seq_len: int, min_pairs: int, arrays: dict):
    """``(file, its disjoint window starts holding >= min_pairs scored pairs)`` of the split's code files in their
    fixed order; fills ``arrays[file]``."""
    cache = tokenizer_cache(tokenizer, "code")
    for doc in split_documents("code", split, "code"):
        key = (len(tokenizer), doc.name, len(doc.text))
        if key not in cache:
            cache[key] = _file_arrays(tokenizer, doc.text)
        ids, offsets, closers, occ, openers = arrays[doc.name] = cache[key]
        text = doc.text
        scored = np.array([(c, o) for c, (o, _, is_scored) in closers.items() if is_scored]).reshape(-1, 2)
        starts = [
            t
            for t, (a, _) in enumerate(offsets)
            if (a == 0 or text[a - 1] == "\n")
            and t + seq_len <= len(ids)
            and int(((scored[:, 1] >= t) & (scored[:, 0] + 1 < t + seq_len)).sum()) >= min_pairs
        ]
        yield doc.name, disjoint_starts(starts, seq_len)


def code_capacity(model: HookedTransformer, *, split: str = "score", seq_len: int = 128, min_pairs: int = 1) -> int:
    """How many windows :func:`code_probe` can draw from ``split`` (the census's code probe: ``min_pairs=1``): seeds
    that never share one ask for that many in all (:func:`headlens.data.corpus.window_block`)."""
    check_model(model)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise HeadlensError("the code probe needs a model with a tokenizer")
    seq_len = check_count("seq_len", seq_len, minimum=8)
    min_pairs = check_count("min_pairs", min_pairs, minimum=0, why="bracket pairs a window must hold")
    check_split(split)
    return sum(len(s) for _, s in _candidates(tokenizer, split, seq_len, min_pairs, {}))


def code_probe_builder(model: HookedTransformer, *, seed: int, n_seqs: int, seq_len: int) -> CodeProbe:
    """The census's ``code`` probe: :func:`code_probe` on the ``score`` split, windows with a scored bracket pair.

    Scored pairs are rare (2,839 in the 416 usable stdlib files for Qwen's tokenizer: most brackets merge into tokens
    such as ``()`` or ``):``). The score split holds 1,381 disjoint 128-token windows with one or more, but only 332
    with two or more: too few for seeds that never share a window.
    """
    return code_probe(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed, split="score", min_pairs=1)


def python_version() -> str:
    return sys.version.split()[0]

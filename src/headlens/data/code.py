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

from headlens.data.probes import Probe, delimiter_mask
from headlens.errors import HeadlensError

MIN_GAP = 5
"""A scored pair's opener is at least this many tokens before the token that predicts its closer, so that the whole
region (opener + ``REGION``) is beyond the local window of 3 keys."""
REGION = 1
"""The bracket score counts the keys from opener - REGION to opener + REGION."""
STDLIB_FILES = (
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "difflib.py",
    "pprint.py",
    "shlex.py",
    "csv.py",
    "fractions.py",
    "heapq.py",
    "bisect.py",
    "string.py",
    "calendar.py",
    "configparser.py",
    "ipaddress.py",
    "statistics.py",
    "tokenize.py",
    "ast.py",
)
OPEN, CLOSE = "([{", ")]}"
_FILE_CACHE: dict = {}  # (id(tokenizer), file, length) -> its token ids, offsets, bracket pairs and names


@dataclass(frozen=True)
class CodeProbe(Probe):
    """Windows of real code (kind ``code``) with bracket and identifier metadata (see the module doc).

    ``opener[b, q]``: when token q + 1 is a scored closing bracket, the position of its opener, else -1;
    ``depth[b, q]``: that pair's nesting depth (0 elsewhere); ``closer[b, q]``: token q + 1 starts with a closing
    bracket whose opener is in the window, >= ``MIN_GAP`` tokens before q (a superset of ``opener >= 0``);
    ``ident[b, q, k]``: key k is an earlier occurrence of the name used at q; ``files``: ``"file.py@token"``
    where each window starts.
    """

    opener: Tensor | None = None
    closer: Tensor | None = None
    depth: Tensor | None = None
    ident: Tensor | None = None
    files: tuple[str, ...] = ()


def stdlib_sources(names=STDLIB_FILES) -> dict[str, str]:
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
    return ids, offsets, closers, occurrences


def code_probe(
    model: HookedTransformer,
    *,
    seq_len: int = 128,
    n_seqs: int = 8,
    seed: int = 0,
    files=STDLIB_FILES,
    min_pairs: int = 2,
    exclude=(),
) -> CodeProbe:
    """``n_seqs`` windows of stdlib code, each starting at a line start and holding >= ``min_pairs`` bracket pairs (seeded).

    ``exclude``: windows not to draw (``"file.py@token"``, e.g. another probe's ``files``), for held-out data.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise HeadlensError("the code probe needs a model with a tokenizer")
    if seq_len < 8 or n_seqs < 1 or seq_len > model.cfg.n_ctx:
        raise HeadlensError(
            f"code probe: need 8 <= seq_len <= n_ctx={model.cfg.n_ctx} and n_seqs >= 1 (got {seq_len}, {n_seqs})"
        )
    candidates = []
    for name, text in stdlib_sources(files).items():
        key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), name, len(text))
        if key not in _FILE_CACHE:
            _FILE_CACHE[key] = _file_arrays(tokenizer, text)
        ids, offsets, closers, occ = _FILE_CACHE[key]
        starts = [t for t, (a, _) in enumerate(offsets) if (a == 0 or text[a - 1] == "\n") and t + seq_len <= len(ids)]
        scored = [(c, o) for c, (o, _, is_scored) in closers.items() if is_scored]
        opens = np.array([o for _, o in scored])
        closes = np.array([c for c, _ in scored])
        for s in starts[:: max(1, len(starts) // 200)]:
            if f"{name}@{s}" in exclude:
                continue
            if int(((opens >= s) & (closes + 1 < s + seq_len)).sum()) >= min_pairs:
                candidates.append((name, s, ids, closers, occ))
    if len(candidates) < n_seqs:
        raise HeadlensError(
            f"code probe: only {len(candidates)} windows with >= {min_pairs} bracket pairs; lower batch or min_pairs"
        )
    gen = torch.Generator().manual_seed(int(seed) * 1000 + 7)
    chosen = [candidates[i] for i in torch.randperm(len(candidates), generator=gen)[:n_seqs].tolist()]
    tokens = torch.zeros(n_seqs, seq_len, dtype=torch.long)
    opener_t = torch.full((n_seqs, seq_len), -1, dtype=torch.long)
    depth_t = torch.zeros(n_seqs, seq_len, dtype=torch.long)
    closer_t = torch.zeros(n_seqs, seq_len, dtype=torch.bool)
    ident = torch.zeros(n_seqs, seq_len, seq_len, dtype=torch.bool)
    for b, (_, s, ids, closers, occ) in enumerate(chosen):
        tokens[b] = torch.tensor(ids[s : s + seq_len])
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
    files = tuple(f"{c[0]}@{c[1]}" for c in chosen)
    mask = delimiter_mask(tokenizer, tokens)
    return CodeProbe("code", tokens, mask, opener=opener_t, depth=depth_t, closer=closer_t, ident=ident, files=files)


def code_probe_builder(model: HookedTransformer, *, seed: int, n_seqs: int, seq_len: int) -> CodeProbe:
    """The census's ``code`` probe: :func:`code_probe` (at least 2 scored bracket pairs per window when they are long).

    Scored pairs are rare (about 300 in the 20 files: most brackets merge into tokens such as ``()`` or ``):``),
    so of the sampled line-start windows of 128 tokens 168 hold two or more, and 9 hold four.
    """
    return code_probe(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed, min_pairs=2 if seq_len >= 96 else 1)


def python_version() -> str:
    return sys.version.split()[0]

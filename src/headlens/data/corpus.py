"""License-clean text corpora found on every machine: the Python standard library's own sources and docs.

- :func:`code_documents`: ``.py`` files of ``sysconfig.get_paths()["stdlib"]`` (PSF license) — real code for
  delimiter, bracket and identifier probes. Tests, ``idlelib``, ``encodings``, ``site-packages`` and files
  that are not UTF-8 are left out; the list is sorted, then a seeded shuffle picks the files.
- :func:`prose_documents`: the prose of ``pydoc_data.topics`` (the Python reference documentation,
  also PSF-licensed), one document per topic, sorted by topic name.

:func:`text_windows` cuts token windows from documents: every window starts at the beginning of a line
whose first token is an ordinary token (not a delimiter, not whitespace), windows never overlap, and
each window records where it came from (``"file.py@token"``). :func:`provenance` gives the Python
version and corpus root to store with results.

Held-out splits. Every document belongs to one *unit* (:func:`document_unit`: its stdlib file, or its topic of the
reference docs) and every unit to one split (:func:`split_of`, a fixed hash of the unit's name): ``score`` (60 %:
what census scores are measured on), ``eval`` (20 %: what causal checks measure) and ``reference`` (20 %: what
ablation means are taken over). Data of two splits never share a file. Inside a split, :func:`window_block` draws
windows without replacement: the windows of the split are put in one fixed order and seed ``s`` takes its own
stretch of it (from window ``s * SEED_STRIDE``), so two seeds never share a token.
"""

from __future__ import annotations

import ast
import hashlib
import platform
import random
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import zip_longest
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from headlens.errors import HeadlensError, check_count

SPLITS = {"score": 0.6, "eval": 0.2, "reference": 0.2}
"""The held-out splits and the share of units (files, reference-docs topics) in each."""
SEED_STRIDE = 80
"""Seed ``s`` of a split draws from windows ``s * SEED_STRIDE ..`` of its fixed order (:func:`window_block`), so
probes of up to 80 windows never share one across seeds, whatever their sizes."""
EXCLUDED_DIRS = ("test", "tests", "idlelib", "encodings", "site-packages", "dist-packages", "__pycache__", "turtledemo")
MIN_BYTES = 2_000


@dataclass(frozen=True)
class Document:
    """One text of a corpus and its name (a path relative to the corpus root, or a topic name)."""

    name: str
    text: str


def stdlib_root() -> Path:
    """The directory holding the standard library's ``.py`` sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise HeadlensError(f"the Python standard library sources are not at {root}; the code corpus needs them")
    return root


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Sorted relative paths of the usable stdlib ``.py`` files (see the module docstring for what is left out)."""
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith("test_") for part in rel.parts):
            continue
        if rel.as_posix() == "pydoc_data/topics.py" or path.stat().st_size < MIN_BYTES:
            continue
        out.append(rel.as_posix())
    if not out:
        raise HeadlensError(f"no usable .py files under {root}")
    return tuple(out)


def code_documents(*, seed: int = 0, n_files: int | None = None, names=None) -> Iterator[Document]:
    """``n_files`` stdlib source files (all by default) in a seeded order, or ``names`` in their order, read lazily;
    non-UTF-8 files are skipped."""
    seed = check_count("seed", seed, minimum=0)
    if names is None:
        names = list(stdlib_files())
        random.Random(f"headlens-code-{int(seed)}").shuffle(names)
    count = 0
    for name in names:
        if n_files is not None and count >= n_files:
            return
        try:
            text = (stdlib_root() / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        count += 1
        yield Document(name, text)


@lru_cache(maxsize=1)
def _topics() -> tuple[Document, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # pragma: no cover - part of every CPython install
        raise HeadlensError("pydoc_data (the Python reference docs) is missing from this Python install") from err
    docs = (Document(f"pydoc_data/topics.py:{name}", _prose(topics[name])) for name in sorted(topics))
    return tuple(d for d in docs if d.text.strip())


def _prose(text: str) -> str:
    """The prose paragraphs of a reference-docs topic: unindented, mostly letters and spaces (no code, tables, grammar)."""
    keep = []
    for para in text.split("\n\n"):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any(ln[:1].isspace() for ln in lines):
            continue
        body = " ".join(lines)
        words = sum(c.isalpha() or c == " " for c in body)
        if len(body) >= 80 and words >= 0.9 * len(body):
            keep.append("\n".join(lines))
    return "\n\n".join(keep) + ("\n" if keep else "")


def prose_documents(*, seed: int = 0) -> list[Document]:
    """The Python reference documentation topics (``pydoc_data.topics``) in a seeded order."""
    seed = check_count("seed", seed, minimum=0)
    docs = list(_topics())
    random.Random(f"headlens-prose-{int(seed)}").shuffle(docs)
    return docs


def document_unit(name: str) -> str:
    """The unit a document or window name belongs to: ``"json/decoder.py"`` for ``"json/decoder.py@120"`` and for
    its docstrings ``"json/decoder.py#docstrings@7"``; a reference-docs topic (``"pydoc_data/topics.py:if@0"``) is
    its own unit."""
    return name.rsplit("@", 1)[0].split("#", 1)[0]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise HeadlensError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def _docstring_prose(text: str) -> str:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return _prose("\n\n".join(d for d in docs if d))


CODE_PARTS = {"code": (0.0, 0.7), "delimiter": (0.7, 1.0)}
"""Inside a split, the code files are shared out between the two probe kinds that read code (bracket/identifier
windows, delimiter windows), so that no window of one kind at one seed overlaps a window of the other at another."""


def _fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(name: str) -> str:
    """The held-out split (``score``, ``eval``, ``reference``) of a document's unit: a fixed hash of its name."""
    u, edge = _fraction(f"headlens-split:{document_unit(name)}"), 0.0
    for split, share in SPLITS.items():
        edge += share
        if u < edge:
            return split
    return split


def split_documents(kind: str, split: str, part: str | None = None) -> Iterator[Document]:
    """The documents of one split in a fixed order (the same for every seed), read lazily.

    ``kind="code"``: stdlib ``.py`` files (``part``: only the share :data:`CODE_PARTS` gives that probe kind);
    ``kind="prose"``: the reference-docs topics and the prose of each stdlib file's docstrings
    (``"file.py#docstrings"``, the same unit as the file), interleaved.
    """
    check_split(split)
    if kind not in ("code", "prose"):
        raise HeadlensError(f"split documents are 'code' or 'prose' (got {kind!r})")
    lo, hi = CODE_PARTS[part] if part is not None else (0.0, 1.0)
    files = [f for f in stdlib_files() if split_of(f) == split and lo <= _fraction(f"headlens-part:{f}") < hi]
    random.Random(f"headlens-split-order-{split}").shuffle(files)
    if kind == "code":
        yield from code_documents(names=files)
        return
    topics = [d for d in _topics() if split_of(d.name) == split]
    random.Random(f"headlens-split-order-topics-{split}").shuffle(topics)
    docstrings = (Document(f"{d.name}#docstrings", _docstring_prose(d.text)) for d in code_documents(names=files))
    for pair in zip_longest(topics, (d for d in docstrings if d.text.strip())):
        yield from (d for d in pair if d is not None)


def line_starts(text: str, offsets, delim, seq_len: int) -> list[int]:
    """Token positions that start a line with an ordinary token and leave ``seq_len`` tokens (window starts)."""
    return [
        t
        for t, (begin, end) in enumerate(offsets)
        if t + seq_len <= len(offsets)
        and (begin == 0 or text[begin - 1] == "\n")
        and not delim[t]
        and text[begin:end].strip()
    ]


def disjoint_starts(starts: Iterable[int], seq_len: int) -> list[int]:
    """Greedy non-overlapping windows among sorted candidate starts."""
    out, cursor = [], 0
    for t in starts:
        if t >= cursor:
            out.append(t)
            cursor = t + seq_len
    return out


def window_block(candidates: Iterable[tuple[str, list[int]]], *, n_seqs: int, block: int) -> list[tuple[str, int]]:
    """``n_seqs`` windows for seed ``block``: positions ``block * stride ..`` of one fixed order of all candidate
    windows (without replacement), ``stride = max(SEED_STRIDE, n_seqs)``.

    ``candidates`` yields ``(document name, its disjoint window starts)`` in the split's fixed order; the order
    takes one window from each document in turn (a document's windows in a fixed shuffle of its own), then a second
    one from each, and so on, so early blocks come from different files. Documents are read only as far as needed.
    Two seeds never share a window when both ask for at most ``SEED_STRIDE`` windows (or for the same number).
    """
    if int(n_seqs) < 1 or int(block) < 0:
        raise HeadlensError(f"window blocks need n_seqs >= 1 and a seed >= 0 (got n_seqs={n_seqs}, seed={block})")
    first = int(block) * max(SEED_STRIDE, int(n_seqs))
    need = first + int(n_seqs)
    lists = []
    for name, starts in candidates:
        if starts:
            starts = list(starts)
            random.Random(f"headlens-window-order-{name}").shuffle(starts)
            lists.append((name, starts))
            if len(lists) >= need:
                break
    pool: list[tuple[str, int]] = []
    for rank in range(max((len(s) for _, s in lists), default=0)):
        pool += [(name, starts[rank]) for name, starts in lists if rank < len(starts)]
        if len(pool) >= need:
            break
    if len(pool) < need:  # every document was read: the pool is all the split holds
        stride = max(SEED_STRIDE, int(n_seqs))
        fits = (
            f"seeds 0..{(len(pool) - int(n_seqs)) // stride} fit"
            if len(pool) >= int(n_seqs)
            else "no seed fits: ask for fewer or shorter sequences"
        )
        raise HeadlensError(
            f"seed {block} needs windows {first}..{need - 1} of its split, which holds only {len(pool)}: {fits}"
        )
    return pool[first:need]


def provenance() -> dict:
    """Python version and corpus root, to record with any result computed on these corpora."""
    return {"python_version": platform.python_version(), "python": sys.version.split()[0], "stdlib": str(stdlib_root())}


def text_windows(
    tokenizer,
    documents: Iterable[Document],
    *,
    seq_len: int,
    n_seqs: int,
    seed: int = 0,
    per_document: int = 2,
    is_delim=None,
) -> tuple[Int[Tensor, "batch pos"], tuple[str, ...]]:
    """``n_seqs`` non-overlapping windows of ``seq_len`` tokens, at most ``per_document`` per document.

    Documents are read in the given order; each contributes windows starting at line starts (first
    token ordinary; ``is_delim(ids) -> bool tensor`` marks delimiters), chosen by a seeded draw among its
    disjoint candidates. Returns the tokens and one ``"name@token_offset"`` per window.
    """
    if int(seq_len) < 2 or int(n_seqs) < 1 or int(per_document) < 1:
        raise HeadlensError(
            f"text windows need seq_len >= 2, n_seqs >= 1, per_document >= 1 (got {seq_len}, {n_seqs}, {per_document})"
        )
    gen = random.Random(f"headlens-windows-{int(seed)}")
    rows, names = [], []
    for doc in documents:
        if len(rows) >= n_seqs:
            break
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        if len(ids) < seq_len:
            continue
        delim = is_delim(ids) if is_delim is not None else torch.zeros(len(ids), dtype=torch.bool)
        text = doc.text
        starts = line_starts(text, enc["offset_mapping"], delim, seq_len)
        disjoint = disjoint_starts(starts, seq_len)  # greedy disjoint candidates, then a seeded pick among them
        for t in sorted(gen.sample(disjoint, min(per_document, len(disjoint)))):
            if len(rows) < n_seqs:
                rows.append(ids[t : t + seq_len])
                names.append(f"{doc.name}@{t}")
    if len(rows) < n_seqs:
        raise HeadlensError(
            f"the corpus gave only {len(rows)} non-overlapping windows of {seq_len} tokens, {n_seqs} requested; "
            "ask for fewer sequences (n_seqs, --n-seqs) or shorter ones (seq_len, --seq-len)"
        )
    return torch.stack(rows), tuple(names)

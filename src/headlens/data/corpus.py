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
"""

from __future__ import annotations

import platform
import random
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from headlens.errors import HeadlensError

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


def code_documents(*, seed: int = 0, n_files: int | None = None) -> Iterator[Document]:
    """``n_files`` stdlib source files (all by default) in a seeded order, read lazily; non-UTF-8 files are skipped."""
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
    docs = list(_topics())
    random.Random(f"headlens-prose-{int(seed)}").shuffle(docs)
    return docs


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
        starts = [
            t
            for t, (begin, end) in enumerate(enc["offset_mapping"])
            if t + seq_len <= len(ids)
            and (begin == 0 or text[begin - 1] == "\n")
            and not delim[t]
            and text[begin:end].strip()
        ]
        disjoint, cursor = [], 0  # greedy disjoint candidates, then a seeded pick among them
        for t in starts:
            if t >= cursor:
                disjoint.append(t)
                cursor = t + seq_len
        for t in sorted(gen.sample(disjoint, min(per_document, len(disjoint)))):
            if len(rows) < n_seqs:
                rows.append(ids[t : t + seq_len])
                names.append(f"{doc.name}@{t}")
    if len(rows) < n_seqs:
        raise HeadlensError(
            f"the corpus gave only {len(rows)} non-overlapping windows of {seq_len} tokens, {n_seqs} requested; "
            "lower batch or seq_len"
        )
    return torch.stack(rows), tuple(names)

"""The stdlib corpus: deterministic file lists, exclusions, provenance, non-overlapping windows."""

import pytest
import torch

from headlens import HeadlensError
from headlens.data import corpus


def test_file_list_is_sorted_and_leaves_out_tests_and_tables():
    files = corpus.stdlib_files()
    assert list(files) == sorted(files) and len(files) > 100
    assert not any(part in corpus.EXCLUDED_DIRS for f in files for part in f.split("/"))
    assert "pydoc_data/topics.py" not in files and "ast.py" in files


def test_documents_are_seeded():
    first = [d.name for d in corpus.code_documents(seed=0, n_files=5)]
    assert first == [d.name for d in corpus.code_documents(seed=0, n_files=5)]
    assert first != [d.name for d in corpus.code_documents(seed=1, n_files=5)]
    prose = corpus.prose_documents(seed=0)
    assert prose and all(d.name.startswith("pydoc_data/topics.py:") and d.text.strip() for d in prose)


def test_provenance_records_the_python_version():
    info = corpus.provenance()
    assert info["python_version"].count(".") == 2 and info["stdlib"]


def test_windows_are_disjoint_slices(tiny_qwen):
    docs = [corpus.Document("a", "first line here\n" * 60), corpus.Document("b", "second doc line\n" * 60)]
    tokens, names = corpus.text_windows(tiny_qwen.tokenizer, docs, seq_len=20, n_seqs=4, seed=0, per_document=2)
    assert tokens.shape == (4, 20) and [n.split("@")[0] for n in names] == ["a", "a", "b", "b"]
    starts = [int(n.split("@")[1]) for n in names[:2]]
    assert abs(starts[0] - starts[1]) >= 20
    with pytest.raises(HeadlensError, match="non-overlapping windows"):
        corpus.text_windows(tiny_qwen.tokenizer, docs, seq_len=20, n_seqs=5, per_document=2)
    again, _ = corpus.text_windows(tiny_qwen.tokenizer, docs, seq_len=20, n_seqs=4, seed=0, per_document=2)
    assert torch.equal(tokens, again)

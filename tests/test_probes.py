"""Probes: seeded, equal-length, ordinary tokens only, correct metadata, clear errors."""

import re

import pytest
import torch

from headlens import HeadlensError
from headlens.data.probes import (
    ProbeSet,
    check_probes,
    corpus_sections,
    corpus_text,
    default_probes,
    delimiter_mask,
    delimiter_text,
    is_delimiter,
    natural_text,
    repeated_tokens,
    word_tokens,
)


def test_corpus_is_small_and_has_prose_and_code():
    text = corpus_text()
    assert 100 <= len(text.splitlines()) <= 400
    sections = corpus_sections()
    assert "def " in sections["code"] and "def " not in sections["prose"]
    assert sections["prose"].startswith("The river") and "{" not in sections["prose"]


def test_same_seed_same_probes(tiny_qwen):
    a, b = default_probes(tiny_qwen, seed=3), default_probes(tiny_qwen, seed=3)
    for pa, pb in zip(a, b):
        assert torch.equal(pa.tokens, pb.tokens) and torch.equal(pa.is_delim, pb.is_delim)
    c = default_probes(tiny_qwen, seed=4)
    assert all(not torch.equal(pa.tokens, pc.tokens) for pa, pc in zip(a, c))
    assert [p.kind for p in a] == ["repeated", "natural", "delimiter", "code"]  # predicted is opt-in (size 0)
    assert [p.n_seqs for p in a] == [24, 48, 48, 48]
    opt_in = default_probes(tiny_qwen, seed=3, n_seqs=2, kinds=["predicted"])
    assert [p.kind for p in opt_in] == ["predicted"] and opt_in.predicted.n_seqs == 2


def check_repeated(model, probe, n, prefix, n_seqs):
    tok = model.tokenizer
    assert probe.tokens.shape == (n_seqs, prefix + 2 * n) and probe.n == n and probe.prefix == prefix
    first, second = probe.tokens[:, prefix : prefix + n], probe.tokens[:, prefix + n :]
    assert torch.equal(first, second)
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    for row, text in zip(probe.tokens.tolist(), probe.text(tok)):
        assert len(set(row[: prefix + n])) == prefix + n  # prefix and A's all distinct
        assert not special & set(row) and max(row) < min(len(tok), model.cfg.d_vocab)
        assert re.fullmatch(r"( [A-Za-z]{3,})+", text)
        assert model.to_tokens(text, prepend_bos=False)[0].tolist() == row  # decodes and re-encodes to itself
    assert not probe.is_delim.any()


@pytest.mark.parametrize("n, prefix, n_seqs", [(2, 0, 1), (30, 1, 3), (40, 5, 2)])
def test_repeated_tokens(tiny_qwen, n, prefix, n_seqs):
    check_repeated(tiny_qwen, repeated_tokens(tiny_qwen, n=n, prefix=prefix, n_seqs=n_seqs, seed=1), n, prefix, n_seqs)


def _document(name: str) -> str:
    from headlens.data import corpus

    if name.startswith("pydoc_data/topics.py:"):
        return {d.name: d.text for d in corpus.prose_documents()}[name]
    return (corpus.stdlib_root() / name).read_text(encoding="utf-8")


def test_text_windows_start_at_lines_do_not_overlap_and_carry_the_delimiter_mask(tiny_qwen):
    tok = tiny_qwen.tokenizer
    for make in (natural_text, delimiter_text):
        probe = make(tiny_qwen, seq_len=50, n_seqs=5, seed=2)
        assert probe.tokens.shape == (5, 50) and probe.n is None and len(probe.sources) == 5
        taken = set()
        for row, mask, source in zip(probe.tokens.tolist(), probe.is_delim.tolist(), probe.sources):
            name, start = source.rsplit("@", 1)
            stream = tok(_document(name), add_special_tokens=False)["input_ids"]
            start = int(start)
            assert stream[start : start + 50] == row, "window is not the recorded slice of its document"
            span = {(name, t) for t in range(start, start + 50)}
            assert not span & taken, "windows overlap"
            taken |= span
            pieces = tok.batch_decode([[t] for t in row])
            assert mask == [is_delimiter(p) for p in pieces]
            assert not mask[0] and pieces[0].strip()
            assert start == 0 or tok.decode(stream[:start]).endswith("\n")
    natural = natural_text(tiny_qwen, seed=0).is_delim.float().mean()
    code = delimiter_text(tiny_qwen, seed=0).is_delim.float().mean()
    assert code > 1.3 * natural > 0


def test_probes_are_deterministic_and_seeds_differ(tiny_qwen):
    a, b = natural_text(tiny_qwen, seq_len=40, n_seqs=3, seed=1), natural_text(tiny_qwen, seq_len=40, n_seqs=3, seed=1)
    assert torch.equal(a.tokens, b.tokens) and a.sources == b.sources
    assert a.sources != natural_text(tiny_qwen, seq_len=40, n_seqs=3, seed=2).sources
    rep = repeated_tokens(tiny_qwen, n=20, n_min=5, n_seqs=6, seed=0)
    n = rep.n_per_seq
    assert len(set(n.tolist())) > 1 and ((rep.prefix_per_seq + 2 * n) == rep.seq_len).all()
    for row, k in zip(rep.tokens, n.tolist()):
        assert torch.equal(row[-k:], row[-2 * k : -k]) and len(set(row[: rep.seq_len - k].tolist())) == rep.seq_len - k
    shuffled = repeated_tokens(tiny_qwen, n=20, n_seqs=2, seed=0, shuffled=True)
    first, second = shuffled.tokens[:, 1:21], shuffled.tokens[:, 21:]
    assert (first.sort(-1).values == second.sort(-1).values).all() and not torch.equal(first, second)


def test_text_probe_on_user_text(tiny_qwen):
    text = "alpha beta, gamma; delta.\n" * 20
    probe = natural_text(tiny_qwen, text=text, seq_len=30, n_seqs=2)
    assert probe.tokens.shape == (2, 30) and probe.is_delim.any()


@pytest.mark.parametrize(
    "piece, expected",
    [
        (",", True),
        (".\n", True),
        ("\n\n", True),
        (" (", True),
        ("{}", True),
        ("->", True),
        ("<|endoftext|>", False),
        ("    ", False),
        (" the", False),
        ("3", False),
        ("\ufffd", False),
        ("", False),
        ("x,", False),
    ],
)
def test_is_delimiter(piece, expected):
    assert is_delimiter(piece) is expected


def test_special_tokens_are_delimiters(tiny_qwen):
    tok = tiny_qwen.tokenizer
    comma, word = tok(",", add_special_tokens=False)["input_ids"], tok(" the", add_special_tokens=False)["input_ids"]
    assert len(comma) == len(word) == 1
    ids = torch.tensor([[tok.eos_token_id, comma[0], word[0]]])
    assert delimiter_mask(tok, ids).tolist() == [[True, True, False]]


def test_word_tokens_are_ordinary(tiny_qwen):
    tok = tiny_qwen.tokenizer
    words = word_tokens(tok)
    assert len(words) > 100
    assert all(re.fullmatch(r" [A-Za-z]{3,}", tok.decode([i])) for i in words)


def test_bad_input(tiny_qwen):
    n_ctx = tiny_qwen.cfg.n_ctx
    with pytest.raises(HeadlensError, match="n must be an integer >= 2"):
        repeated_tokens(tiny_qwen, n=1)
    with pytest.raises(HeadlensError, match=f"n_ctx={n_ctx}"):
        repeated_tokens(tiny_qwen, n=n_ctx // 2, prefix=1)
    with pytest.raises(HeadlensError, match="ordinary word tokens"):
        repeated_tokens(tiny_qwen, n=200, prefix=len(word_tokens(tiny_qwen.tokenizer)) - 199)
    with pytest.raises(HeadlensError, match="empty"):
        natural_text(tiny_qwen, text="")
    with pytest.raises(HeadlensError, match="empty"):
        delimiter_text(tiny_qwen, text=" \n \n")
    with pytest.raises(HeadlensError, match="only 0 non-overlapping windows"):
        natural_text(tiny_qwen, text="a short line.\n", seq_len=64)
    with pytest.raises(HeadlensError, match=f"n_ctx={n_ctx}"):
        delimiter_text(tiny_qwen, seq_len=n_ctx + 1)
    with pytest.raises(HeadlensError, match="empty"):
        check_probes(tiny_qwen, ProbeSet())
    good = repeated_tokens(tiny_qwen, n=4, n_seqs=1)
    bad = type(good)("repeated", good.tokens, good.is_delim, n=5, prefix=1)
    with pytest.raises(HeadlensError, match="prefix"):
        check_probes(tiny_qwen, ProbeSet(repeated=bad))
    wrong_ids = type(good)("natural", good.tokens + tiny_qwen.cfg.d_vocab, good.is_delim)
    with pytest.raises(HeadlensError, match="not in this model's vocabulary"):
        check_probes(tiny_qwen, ProbeSet(natural=wrong_ids))


@pytest.mark.slow
def test_repeated_tokens_on_qwen_are_ordinary(qwen):
    probe = repeated_tokens(qwen, n=64, n_seqs=4, seed=0)
    check_repeated(qwen, probe, 64, 1, 4)
    assert int(probe.tokens.max()) < 151643  # below Qwen's special/added tokens and its padding ids


def test_token_caches_belong_to_their_tokenizer_and_go_with_it():
    """The probes' tokenization caches are keyed by the tokenizer object (they were keyed by id(): a later tokenizer
    at a reused address with the same vocabulary size would have read a dead one's token ids)."""
    import gc

    from headlens.data import probes

    class Tokenizer:
        pass

    a, b = Tokenizer(), Tokenizer()
    probes.tokenizer_cache(a, "code")["file.py"] = "ids of a"
    assert probes.tokenizer_cache(b, "code") == {} and probes.tokenizer_cache(a, "windows") == {}
    assert probes.tokenizer_cache(a, "code") == {"file.py": "ids of a"}
    held = len(probes._TOKENIZED)
    del a
    gc.collect()
    assert len(probes._TOKENIZED) == held - 1


def test_token_dtypes_an_embedding_cannot_take_are_refused_everywhere(tiny_qwen):
    """int16 ids passed the token check and then failed inside torch with an IndexError traceback, uint8 ids were read
    as a mask; ablation refused both while circuits and patching took them. One rule now: int64 or int32 ids."""
    from headlens.census.attention_stats import scale_entropy_table
    from headlens.census.rope import distance_profile
    from headlens.circuits.paths import check_tokens
    from headlens.engine.intervene import embed
    from headlens.interventions.ablation import clean_metric, custom_metric
    from headlens.interventions.patching import check_pair_tokens, induction_pair

    fn = lambda logits, tokens: logits[..., 0].mean()  # noqa: E731
    pair = induction_pair(tiny_qwen, n_tokens=4, n_seqs=2)
    calls = {
        "ablation": lambda t: clean_metric(tiny_qwen, custom_metric(t, fn)),
        "circuits": lambda t: check_tokens(tiny_qwen, tokens=t),
        "patching": lambda t: check_pair_tokens(tiny_qwen, type(pair)(t, t, pair.positions, pair.metric)),
        "embed": lambda t: embed(tiny_qwen, t),
        "rope": lambda t: distance_profile(tiny_qwen, t),
        "attention_stats": lambda t: scale_entropy_table(tiny_qwen, t),
    }
    good = pair.clean
    for name, call in calls.items():
        # uint8: the test session's jaxtyping hook (conftest.CHECKED) refuses it first where a signature says Int;
        # users run without that hook
        for dtype in (torch.int16,) if name in ("patching", "embed") else (torch.int16, torch.uint8):
            with pytest.raises(HeadlensError, match="integer token"):
                call(good.to(dtype))
        call(good.to(torch.int32))  # what TransformerLens's embedding takes: accepted
    assert clean_metric(tiny_qwen, custom_metric(good.int(), fn)) == clean_metric(tiny_qwen, custom_metric(good, fn))
    with pytest.raises(HeadlensError, match="non-empty"):
        check_tokens(tiny_qwen, tokens=good[:0])

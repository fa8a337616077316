"""Held out means disjoint: census seeds never share a window, and no causal check evaluates on (or takes its ablation
means from) a file or a token the census scores on."""

import dataclasses
import json
from pathlib import Path

import pytest

from headlens import HeadlensError
from headlens.census.validate import TASKS, check_held_out, spans, task_data
from headlens.data import corpus
from headlens.data.code import code_capacity
from headlens.data.probes import DEFAULT_SIZES, default_probes, window_capacity

SEEDS = range(9)
"""The seeds of the census study (development 0-2, fresh 3-5, the rule check's 6-8); the fast tests take the first
three."""
RESULTS = Path(__file__).parents[1] / "analyses" / "results" / "census_trust"


def test_every_file_has_one_fixed_split():
    files = corpus.stdlib_files()
    splits = [corpus.split_of(f) for f in files]
    assert splits == [corpus.split_of(f) for f in files]
    shares = {s: splits.count(s) / len(splits) for s in corpus.SPLITS}
    assert all(abs(shares[s] - corpus.SPLITS[s]) < 0.08 for s in corpus.SPLITS), shares
    # a window, a file's docstrings and the file itself are one unit, so they share a split
    assert corpus.document_unit("json/decoder.py#docstrings@7") == corpus.document_unit("json/decoder.py@120")
    assert corpus.split_of("json/decoder.py#docstrings@7") == corpus.split_of("json/decoder.py")
    with pytest.raises(HeadlensError, match="unknown split"):
        list(corpus.split_documents("code", "train"))


def test_window_blocks_are_drawn_without_replacement():
    docs = [(f"doc{i}", list(range(0, 1000, 10))) for i in range(30)]
    taken = [corpus.window_block(iter(docs), n_seqs=n, block=s) for s, n in enumerate((5, 40, 80, 7, 80))]
    flat = [w for block in taken for w in block]
    assert len(flat) == len(set(flat))  # any sizes up to SEED_STRIDE: no window twice
    assert len({name for name, _ in taken[0]}) == 5  # early blocks take one window per document
    assert corpus.window_block(iter(docs), n_seqs=7, block=3) == taken[3]  # deterministic
    with pytest.raises(HeadlensError, match=r"holds only 200: seeds 0\.\.2 fit"):  # the error says which seeds do
        corpus.window_block(iter(docs[:2]), n_seqs=5, block=3)
    assert len(corpus.window_block(iter(docs[:2]), n_seqs=5, block=2)) == 5
    with pytest.raises(HeadlensError, match="no seed fits"):
        corpus.window_block(iter(docs[:1]), n_seqs=101, block=0)


@pytest.mark.parametrize("kind", ["natural", "delimiter", "code"])
def test_window_capacity_is_every_window_seeds_can_draw(tiny_qwen, kind):
    """A probe asking for as many windows as the score split holds gets them all, each once; one more is refused."""
    held = code_capacity(tiny_qwen) if kind == "code" else window_capacity(tiny_qwen, kind)
    probe = default_probes(tiny_qwen, seed=0, n_seqs=held, kinds=[kind])[kind]
    assert len(set(probe.sources)) == held > 500
    with pytest.raises(HeadlensError, match=f"holds only {held}: seeds 0..0 fit"):
        default_probes(tiny_qwen, seed=1, n_seqs=held // 2 + 1, kinds=[kind])
    with pytest.raises(HeadlensError, match="counts the text kinds"):
        window_capacity(tiny_qwen, "repeated")


def census_sources(model, seeds=SEEDS) -> dict[int, dict[str, tuple[str, ...]]]:
    """The default census probes' windows per seed and kind (repeated tokens: their generator seed)."""
    out = {}
    for seed in seeds:
        probes = default_probes(model, seed=seed)
        out[seed] = {kind: probes[kind].sources for kind in probes.keys() if probes[kind].sources}
        out[seed]["repeated_tokens"] = probes["repeated"].tokens
    return out


def check_seeds_disjoint(sources: dict) -> None:
    seen: set = set()
    for by_kind in sources.values():
        windows = set()
        for kind, names in by_kind.items():
            if kind == "repeated_tokens":
                continue
            assert all(corpus.split_of(n) == "score" for n in names), kind
            covered = spans(names, 128)
            assert len(covered) == 128 * len(names), f"{kind}: windows of one seed overlap"
            windows |= covered
        assert not windows & seen, "two seeds share a token"
        seen |= windows


@pytest.fixture(scope="module")
def tiny_sources(tiny_qwen):
    return census_sources(tiny_qwen, range(3))


def test_census_seeds_share_no_window(tiny_qwen, tiny_sources):
    check_seeds_disjoint(tiny_sources)
    assert [len(tiny_sources[0][k]) for k in ("natural", "delimiter", "code")] == [
        DEFAULT_SIZES[k] for k in ("natural", "delimiter", "code")
    ]
    rows = [tuple(r) for s in tiny_sources.values() for r in s["repeated_tokens"].tolist()]
    assert len(rows) == len(set(rows))  # repeated random tokens: no sequence twice


def check_tasks_held_out(model, sources: dict) -> None:
    scoring = [w for by_kind in sources.values() for k, ws in by_kind.items() if k != "repeated_tokens" for w in ws]
    census_rows = {tuple(r) for s in sources.values() for r in s["repeated_tokens"].tolist()}
    for task in TASKS:
        data = task_data(model, task, n_seqs=4)
        check_held_out(data, scoring)  # no file, no token shared; every window in its own split
        assert data.eval_sources and data.reference_sources
        if task == "repeat_loss":
            ref = task_data(model, task, n_seqs=4).reference
            halves = {tuple(r[1:33]) for r in data.metric.tokens.tolist()} | {tuple(r[1:33]) for r in ref.tolist()}
            assert not any(
                h == tuple(row[i : i + 32]) for h in halves for row in census_rows for i in range(len(row) - 31)
            )


def test_every_causal_task_is_disjoint_from_scoring_and_reference_data(tiny_qwen, tiny_sources):
    check_tasks_held_out(tiny_qwen, tiny_sources)


def test_the_overlap_check_fails_on_any_overlap(tiny_qwen, tiny_sources):
    data = task_data(tiny_qwen, "code_closer", n_seqs=4)
    scoring = list(tiny_sources[0]["code"])
    unused = next(f for f in corpus.stdlib_files() if corpus.split_of(f) == "score")
    doc, start = data.eval_sources[0].rsplit("@", 1)
    overlapping = f"{doc}@{int(start) + 64}"  # a reference window over the last 64 tokens of an evaluation window
    assert len(spans([data.eval_sources[0]], 128) & spans([overlapping], 128)) == 64
    cases = {
        "evaluation and scoring data share files": dataclasses.replace(data, eval_sources=(scoring[0],)),
        "evaluation and reference data share files": dataclasses.replace(data, reference_sources=(overlapping,)),
        "evaluation data from files outside the eval split": dataclasses.replace(data, eval_sources=(f"{unused}@0",)),
    }
    for match, bad in cases.items():
        with pytest.raises(HeadlensError, match=match):
            check_held_out(bad, scoring)
    rep = task_data(tiny_qwen, "repeat_loss", n_seqs=2)
    with pytest.raises(HeadlensError, match="generator seed"):
        check_held_out(dataclasses.replace(rep, reference_sources=rep.eval_sources))


@pytest.mark.slow
def test_on_qwen_seeds_and_causal_tasks_are_held_out_and_the_committed_sources_agree(qwen):
    sources = census_sources(qwen)
    check_seeds_disjoint(sources)
    check_tasks_held_out(qwen, sources)
    committed = json.loads((RESULTS / "sources.json").read_text())
    for seed, by_kind in committed.items():
        for kind, names in by_kind.items():
            assert tuple(names) == tuple(sources[int(seed)][kind][: len(names)]), (seed, kind)

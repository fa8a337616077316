"""analyses/prune_study.py: the pruning count with its spread over draws of text, on disjoint data.

The committed Qwen results are checked against themselves and the docs; the same script is regenerated on the tiny
model (seconds), so a change to the code that writes them shows here too."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from docs_numbers import doc_text
from scripts import ROOT, load_script

from headlens.data.corpus import document_unit

RESULTS = ROOT / "analyses" / "results" / "prune_study"
SKIP = ["seconds"]


def units(windows: str) -> set[str]:
    return {document_unit(w) for w in windows.split()}


def check_draws(per_seed: pd.DataFrame) -> None:
    """Fit and held-out text never share a document unit; two draws of one size never share a window."""
    for row in per_seed.itertuples():
        assert not units(row.fit_windows) & units(row.eval_windows), row.seed
    for n, group in per_seed.groupby("n_seqs"):
        windows = [set(w.split()) for w in group["fit_windows"]] + [set(w.split()) for w in group["eval_windows"]]
        assert sum(len(w) for w in windows) == len(set().union(*windows))
        assert all(len(w) == n for w in windows)


def run(out, *args) -> pd.DataFrame:
    cmd = [sys.executable, str(ROOT / "analyses" / "prune_study.py"), "--model", "tiny-qwen2", "--out", str(out)]
    subprocess.run([*cmd, *args], check=True, capture_output=True, text=True, timeout=600)
    return pd.read_csv(out / "per_seed.csv")


def test_prune_study_regenerates_on_the_tiny_model_and_a_draw_is_its_seed_alone(tmp_path):
    per_seed = run(tmp_path / "a", "--seeds", "2", "--n-seqs", "1", "2")
    assert per_seed[["n_seqs", "seed"]].values.tolist() == [[1, 0], [1, 1], [2, 0], [2, 1]]
    check_draws(per_seed)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    script = load_script("analyses/prune_study.py")
    orders = pd.read_csv(tmp_path / "a" / "prune_order.csv")
    for n in (1, 2):
        got = script.summarize(per_seed[per_seed["n_seqs"] == n], orders[orders["n_seqs"] == n], summary["n_heads"])
        assert summary["by_n_seqs"][str(n)] == got
        assert got["max_removed"]["per_seed"] == per_seed.loc[per_seed["n_seqs"] == n, "max_removed"].tolist()
    # draw (2 windows, seed 1) run on its own gives the same row: no state carries over from the other draws
    alone = run(tmp_path / "b", "--seed", "1", "--seeds", "1", "--n-seqs", "2")
    pd.testing.assert_frame_equal(
        alone.drop(columns=SKIP), per_seed.iloc[[3]].reset_index(drop=True).drop(columns=SKIP)
    )


def test_committed_prune_study_holds_five_disjoint_draws_per_size_and_the_docs_quote_it():
    per_seed = pd.read_csv(RESULTS / "per_seed.csv")
    summary = json.loads((RESULTS / "summary.json").read_text())
    assert summary["n_heads"] == 336 and summary["tolerance"] == 0.01
    assert sorted(summary["by_n_seqs"]) == ["2", "8"]
    check_draws(per_seed)
    script = load_script("analyses/prune_study.py")
    orders = pd.read_csv(RESULTS / "prune_order.csv")
    text = doc_text("findings")
    for n, found in summary["by_n_seqs"].items():
        rows = per_seed[per_seed["n_seqs"] == int(n)]
        assert rows["seed"].tolist() == [0, 1, 2, 3, 4]
        assert found == script.summarize(rows, orders[orders["n_seqs"] == int(n)], 336)
        m = found["max_removed"]
        quoted = f"{int(n)}×64 tokens: {m['median']:.0f} of 336 heads (range {m['min']:.0f}–{m['max']:.0f})"
        assert quoted in text, quoted
    big, small = summary["by_n_seqs"]["8"], summary["by_n_seqs"]["2"]
    held, clean, pruned = big["held_out_worsening"], big["repeat_clean"], big["repeat_pruned"]
    for quoted in (
        f"a median {100 * held['median']:.1f} % ({100 * held['min']:.1f}–{100 * held['max']:.1f} %, 8×64)",
        f"from {clean['min']:.2f}–{clean['max']:.2f} to {pruned['min']:.1f}–{pruned['max']:.1f} nats (8×64)",
        f"share {100 * small['pruned_set_jaccard']['mean']:.0f} % of their heads (Jaccard, 2×64) and "
        f"{100 * big['pruned_set_jaccard']['mean']:.0f} % (8×64)",
    ):
        assert quoted in text, quoted


@pytest.mark.parametrize("args", [["--seeds", "0"], ["--n-seqs", "0"]])
def test_prune_study_refuses_no_draws(tmp_path, args):
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run(tmp_path, *args)
    assert "must be at least 1" in failed.value.stderr and "Traceback" not in failed.value.stderr

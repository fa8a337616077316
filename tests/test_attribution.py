"""AtP* (attribution.py): where it is exact, where it beats plain AtP, and how estimates are scored."""

from functools import partial

import numpy as np
import pytest
import torch

from headlens import HeadlensError, attribution_patching
from headlens.attribution import estimate_quality
from headlens.patching import PromptPair, activation_patching, logprob
from headlens.patching import attribution_patching as old_import
from headlens.toy import load_induction_model


def test_old_import_paths_still_work():
    import headlens.attribution

    assert attribution_patching is headlens.attribution.attribution_patching and callable(old_import)


def test_estimate_quality_counts_recall_and_correlations():
    exact = [5.0, -4.0, 3.0, 0.1, 0.0, 0.2]
    estimate = [5.0, 0.0, 3.0, 0.1, 0.0, 0.2]  # misses the second-largest head
    q = estimate_quality(exact, estimate, k=2)
    assert q["recall_top2_in_4"] == 0.5 and q["missed"] == [1]
    assert q["pearson"] == pytest.approx(np.corrcoef(exact, estimate)[0, 1])
    with pytest.raises(HeadlensError):
        estimate_quality([1, 2], [1, 2])


@pytest.fixture(scope="module")
def toy_pair():
    model = load_induction_model()
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, model.cfg.d_vocab, (8, 20), generator=g)
    clean = torch.cat([first, first], 1)
    corrupted = torch.cat([first, torch.randint(0, model.cfg.d_vocab, (8, 20), generator=g)], 1)
    pair = PromptPair(clean, corrupted, torch.arange(20, 39), partial(logprob, targets=clean[:, 21:40]))
    return model, pair


def test_atp_star_recomputes_the_softmax_for_key_patches(toy_pair):
    """On the trained toy induction model, patching keys moves saturated induction attention: AtP* tracks it."""
    model, pair = toy_pair
    exact = activation_patching(model, pair, activation="k", progress=False)["effect"]
    plain = attribution_patching(model, pair, activations=["k"], method="atp")["effect"]
    star = attribution_patching(model, pair, activations=["k"])["effect"]
    err_plain, err_star = np.abs(exact - plain).max(), np.abs(exact - star).max()
    assert err_star < 0.5 * err_plain
    assert estimate_quality(exact, star, k=3)["pearson"] > 0.85 > estimate_quality(exact, plain, k=3)["pearson"]


def test_grad_drop_keeps_signs_and_reports_magnitudes(toy_pair):
    model, pair = toy_pair
    star = attribution_patching(model, pair, activations=["z"])
    dropped = attribution_patching(model, pair, activations=["z"], grad_drop=True)
    assert dropped.attrs["method"] == "atp*+graddrop"
    same_sign = (np.sign(dropped["effect"]) == np.sign(star["effect"])) | (star["effect"].abs() < 1e-6)
    assert same_sign.all()
    with pytest.raises(HeadlensError, match="unknown attribution method"):
        attribution_patching(model, pair, method="atp**")


def test_committed_path_study_agrees_with_the_exact_table_and_shows_pattern_paths():
    """analyses/atp_paths.py (the heads AtP misses) and bench_atp's exact table are two runs of the same patch."""
    import json
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).parents[1]
    paths = json.loads((root / "analyses" / "results" / "atp_paths" / "paths.json").read_text())
    exact = pd.read_csv(root / "benchmarks" / "results" / "atp_exact_4x61.csv").set_index(["layer", "head"])
    for name, row in paths["heads"].items():
        layer, head = (int(x) for x in name[1:].split("H"))
        assert row["all positions"]["effect"] == pytest.approx(exact.loc[(layer, head), "effect"], abs=1e-3)
        frozen = next(v for k, v in row.items() if k.startswith("later patterns frozen"))
        assert abs(frozen["nats"]) < 0.2 * abs(row["all positions"]["nats"])  # the effect goes through later patterns

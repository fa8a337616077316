"""Causal validation and null calibration on a planted tiny model (the real-Qwen numbers live in analyses/)."""

import numpy as np
from test_census import planted_model

from headlens.census.calibrate import null_levels, null_scores, random_weights_model
from headlens.census.run import run_census
from headlens.census.validate import causal_validation
from headlens.data.probes import default_probes


def test_random_weights_model_has_the_same_shape_and_new_weights():
    model = planted_model()
    null = random_weights_model(model, seed=0)
    assert null.cfg.n_layers == model.cfg.n_layers and null.W_Q.shape == model.W_Q.shape
    assert not np.allclose(null.W_Q.detach().numpy(), model.W_Q.detach().numpy())
    again = random_weights_model(model, seed=0)
    assert np.array_equal(null.W_Q.detach().numpy(), again.W_Q.detach().numpy())


def test_planted_thresholds_clear_the_nulls():
    model = planted_model()
    probes = default_probes(model, seed=0, n_seqs=4, n=16, seq_len=40)
    levels = null_levels(null_scores(model, probes, progress=False)).set_index("label")
    assert {"induction", "previous_token", "delimiter", "first_token"} <= set(levels.index)
    assert "shuffled_max" in levels.columns and np.isfinite(levels.loc["induction", "shuffled_max"])
    # the planted induction head is exact; with the repeat order destroyed it scores low
    assert levels.loc["induction", "shuffled_max"] < 0.3
    # every label's threshold is above the largest score of any randomly initialised head (near-uniform attention)
    assert levels["clears"].all(), levels
    assert "broad" not in levels.index  # breadth is what chance looks like: a score (entropy), never a label


def test_causal_validation_table():
    model = planted_model()
    table = run_census(model, default_probes(model, seed=0, n_seqs=4, n=16, seq_len=40), progress=False, n_boot=0).table
    result = causal_validation(
        model, table, labels=["induction", "previous_token"], n_random=3, n_seqs=2, progress=False
    )
    assert result["label"].tolist() == ["induction", "previous_token"]
    assert (result.n_heads == 1).all() and result["heads"].tolist() == ["L1H2", "L0H0"]
    row = result.iloc[0]
    assert row.ratio_lo <= row.ratio <= row.ratio_hi or not np.isfinite(row.ratio)
    assert 0.0 <= row.p_random_ge <= 1.0

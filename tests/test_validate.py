"""Causal validation and null calibration on a planted tiny model (the real-Qwen numbers live in analyses/)."""

import numpy as np
import pytest
from test_census import planted_model

from headlens import HeadlensError
from headlens.census.calibrate import null_levels, null_scores, random_weights_model
from headlens.census.run import run_census
from headlens.census.validate import LABEL_TASKS, TASKS, causal_validation, ratio_interval, verdict
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
    # every label's threshold is above the largest score of any randomly initialised head (near-uniform attention);
    # these short code windows hold no re-used name, so identifier has no null score to clear (NaN, not 0)
    assert levels["clears"].dropna().all(), levels
    assert levels["null_max"].isna().sum() <= 1 and np.isnan(levels.loc["identifier", "null_max"])
    assert "broad" not in levels.index  # breadth is what chance looks like: a score (entropy), never a label


def test_causal_validation_table():
    model = planted_model()
    table = run_census(model, default_probes(model, seed=0, n_seqs=4, n=16, seq_len=40), progress=False, n_boot=0).table
    result = causal_validation(
        model, table, labels=["induction", "previous_token", "first_token"], n_random=3, n_seqs=2, progress=False
    )
    assert result["label"].tolist() == ["induction", "previous_token", "first_token"]
    assert result["heads"].tolist()[:2] == ["L1H2", "L0H0"] and (result.n_heads[:2] == 1).all()
    assert (result.task[:2] == "repeat_loss").all() and result.behaviour.str.len().gt(10).all()
    row = result.iloc[0]
    assert row.ratio_lo <= row.ratio <= row.ratio_hi or not np.isfinite(row.ratio)
    assert 0.0 <= row.p_random_ge <= 1.0
    assert set(result.verdict[:2]) <= {"supported", "no evidence"} and result.verdict[2] == "descriptive"
    assert row.verdict == verdict(row.expected_sign, row.target_effect, np.array([row.random_min, row.random_max]))
    with pytest.raises(HeadlensError, match="no behaviour is defined"):
        causal_validation(model, table, labels=["broad"], n_random=3, progress=False)


def test_verdict_needs_the_expected_direction_and_every_random_set_beaten():
    assert verdict(1, 0.5, np.array([0.1, 0.4])) == "supported"
    assert verdict(1, 0.5, np.array([0.1, 0.5])) == "no evidence"  # a random set as large
    assert verdict(-1, -0.5, np.array([-0.1, 0.2])) == "supported"
    assert verdict(-1, 0.5, np.array([0.6, 0.7])) == "no evidence"  # wrong direction
    assert set(LABEL_TASKS) >= {"previous_token", "closer_to_opener", "bracket_matching", "first_token"}
    assert LABEL_TASKS["previous_token"].task == "repeat_loss"  # the induction task, not next-token text loss
    assert LABEL_TASKS["first_token"].task is None  # descriptive: no causal claim
    assert all(spec.task is None or spec.task in TASKS for spec in LABEL_TASKS.values())


def test_ratio_interval_resamples_the_random_sets():
    """Equal random effects leave no spread; two sets, 0.5 and 1.5, give means 0.5, 1 and 1.5 over resamples, so the
    ratio of a target of 2 spans 4/3 to 4 around its 2; a zero random mean has no ratio."""
    assert ratio_interval(2.0, [1.0, 1.0, 1.0]) == {"ratio": 2.0, "ratio_lo": 2.0, "ratio_hi": 2.0}
    got = ratio_interval(2.0, [0.5, 1.5], n_boot=4000)
    assert got["ratio"] == 2.0 and got["ratio_lo"] == pytest.approx(4 / 3) and got["ratio_hi"] == pytest.approx(4.0)
    assert np.isnan(ratio_interval(1.0, [-1.0, 1.0])["ratio"])


def test_position_metrics_end_at_their_last_position_and_keep_their_value():
    """next_token_logprob cuts the tokens after the last marked position's next token: on a causal model the value is
    the log-prob computed on the full sequence by hand; successor reads (and unembeds) only the last position."""
    import torch

    from headlens import tiny_model
    from headlens.census.validate import next_token_logprob

    model = tiny_model("qwen2", seed=1)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 20), generator=torch.Generator().manual_seed(0))
    marked = torch.zeros(3, 20, dtype=torch.bool)
    marked[0, 4], marked[1, 9], marked[2, 2], marked[2, 11] = True, True, True, True
    metric = next_token_logprob(tokens, marked, "x")
    assert metric.tokens.shape == (3, 13)  # up to position 11's next token
    with torch.inference_mode():
        full = model(tokens).log_softmax(-1)
        expected = torch.stack([full[b, q, tokens[b, q + 1]] for b, q in ((0, 4), (1, 9), (2, 2), (2, 11))]).mean()
        got = metric.full(model(metric.tokens))
    assert float(got) == pytest.approx(float(expected), abs=1e-5)

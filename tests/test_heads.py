import numpy as np
import pandas as pd
import pytest
import torch

from headlens import HeadlensError, heads_with_label, tiny_model
from headlens.census import CensusResult
from headlens.census.registry import HeadType, register, unregister
from headlens.heads import (
    Head,
    check_heads,
    format_heads,
    kv_group_heads,
    parse_head,
    parse_heads,
    random_heads,
    top_heads,
    unit_name,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=0, n_layers=4)


def test_one_spelling_both_ways():
    assert str(Head(5, 3)) == "L5H3" and Head(5, 3) == (5, 3)
    for text in ("L5H3", "l5h3", "L5 H3", "5.3", " 5 . 3 ", (5, 3), Head(5, 3)):
        assert parse_head(text) == Head(5, 3)
    assert parse_heads("L5H3, 12.0,l1h2") == [(5, 3), (12, 0), (1, 2)]
    assert format_heads([(1, 0), "L1H3"]) == "L1H0 L1H3"
    assert unit_name(4, pd.NA, 1) == "L4KV1" and unit_name(4, 2, 0) == "L4H2"


@pytest.mark.parametrize("bad", ["1:2", "L5", "H3", "5.3.1", "L-1H2"])
def test_bad_spellings_say_how_to_write_a_head(bad):
    with pytest.raises(HeadlensError, match="L5H3 or 5.3"):
        parse_head(bad)


def test_a_pair_holds_two_whole_numbers():
    """pandas gives a row's integers as floats, so 2.0 is layer 2; a bool is not a number here (True was layer 1),
    nor a string, a fraction or a one-element tensor."""
    for ok in ((2.0, 3), (np.int64(2), np.float32(3)), (torch.tensor(2), 3), tuple(pd.Series([2, 3.0]))):
        assert parse_head(ok) == Head(2, 3)
    for bad in ((True, 3), (2, np.False_), ("2", "3"), (2.5, 3), (float("nan"), 1), (torch.tensor([2]), 3), (1, 2, 3)):
        with pytest.raises(HeadlensError, match="integer pairs"):
            parse_head(bad)


def test_duplicates_are_an_error_not_dropped():
    with pytest.raises(HeadlensError, match="L5H3 is given twice"):
        parse_heads("L5H3,5.3")


def test_check_heads_sorts_dedupes_and_validates(model):
    assert check_heads(model, [(2, 1), "L0H3", (2, 1)]) == [(0, 3), (2, 1)]
    with pytest.raises(HeadlensError, match="head L9H0 is out of range"):
        check_heads(model, ["L9H0"])
    with pytest.raises(HeadlensError, match="head L0H-1 is out of range"):
        check_heads(model, [(0, -1)])


def test_a_head_counts_from_zero_and_heads_must_be_given():
    for layer, head in ((-1, 0), (0, -2)):
        with pytest.raises(HeadlensError, match="out of range: layers and heads count from 0"):
            Head(layer, head)
    assert Head(0, 0) == (0, 0) and Head(0, 0)._replace(head=3) == Head(0, 3)
    for bad in (None, 5):
        with pytest.raises(HeadlensError, match="heads must be a string like 'L5H3,5.3' or a list"):
            parse_heads(bad)


def test_selection_helpers(model):
    table = pd.DataFrame({"layer": [0, 1, 1, 2], "head": [1, 0, 2, 3], "label": ["induction", "other", "induction", "x"],
                          "score": [0.5, 0.9, 0.7, 0.1]})  # fmt: skip
    assert heads_with_label(table, "induction") == [(0, 1), (1, 2)]
    assert top_heads(table, "score", 2) == [(1, 0), (1, 2)]
    assert kv_group_heads(model, 1, 1) == [(1, 2), (1, 3)]


def test_heads_with_label_knows_the_labels_and_takes_a_census_result():
    table = pd.DataFrame({"layer": [0, 1, 1], "head": [1, 0, 2], "label": ["induction", "other", "x"]})
    with pytest.raises(HeadlensError, match=r"unknown label 'inducton': did you mean 'induction'\? known labels: .*"
                       r"previous_token.*copy_suppression.*other, x"):  # fmt: skip
        heads_with_label(table, "inducton")
    assert heads_with_label(table, "successor") == []  # a label no head has is an empty list, not an error
    assert heads_with_label(table, "x") == [(1, 2)]  # a label the table holds (e.g. from a type no longer registered)
    result = CensusResult(table, pd.DataFrame(), None, 0, {"late_sink": 0.8})
    assert heads_with_label(result, "induction") == [(0, 1)] and heads_with_label(result, "late_sink") == []
    with pytest.raises(HeadlensError, match="unknown label 'late_sink'"):
        heads_with_label(table, "late_sink")
    register(HeadType("late_sink", "natural", lambda p, probe, rows: p[..., -8:, 0].mean(-1), threshold=0.8, tier=2,
                      description="last queries sink"))  # fmt: skip
    try:
        assert heads_with_label(table, "late_sink") == []
    finally:
        unregister("late_sink")
    with pytest.raises(HeadlensError, match="needs a CensusResult or a census table"):
        heads_with_label([(0, 1)], "induction")


def test_random_heads_needs_a_count_of_at_least_one(model):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(HeadlensError, match="n must be an integer >= 1"):
            random_heads(model, bad)
    with pytest.raises(HeadlensError, match=r"n must equal the number of heads in like= \(2\), got 3"):
        random_heads(model, 3, like=[(1, 0), (1, 1)])


def test_layer_matched_draw_fills_a_full_layer_from_its_nearest_layers(model):
    """All 4 heads of layer 2 are targets (plus one in layer 0): layer 2 has none left, so its 4 come from the
    nearest layers (1 and 3 first); layer 0's one comes from layer 0. Deterministic for a seed."""
    target = [(2, h) for h in range(4)] + [(0, 0)]
    drawn = random_heads(model, len(target), like=target, exclude=target, seed=3)
    assert drawn == random_heads(model, len(target), like=target, exclude=target, seed=3)
    assert len(set(drawn)) == 5 and not set(drawn) & set(target)
    layers = sorted(layer for layer, _ in drawn)
    assert layers.count(0) == 1 and all(layer in (1, 3) for layer in layers if layer != 0)
    many = [(layer, h) for layer in (1, 2, 3) for h in range(4)]  # 12 targets, only layer 0's 4 heads are free
    with pytest.raises(HeadlensError, match="cannot draw 12"):
        random_heads(model, 12, like=many, exclude=many)
    assert sorted(random_heads(model, 4, like=many[:4], exclude=many)) == [(0, h) for h in range(4)]


def test_top_k_and_layer_matched_heads_are_checked(model):
    """top_heads(top_k=-1) kept all heads but the last (pandas' head(-1)); random_heads(like=[(9, 9)]) was a KeyError
    and an excluded head the model does not have was ignored."""
    table = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "x": [3, 2, 1]})
    with pytest.raises(HeadlensError, match="top_k must be an integer >= 1"):
        top_heads(table, "x", top_k=-1)
    for kwargs in ({"like": [(9, 9)]}, {"exclude": [(9, 9)]}):
        with pytest.raises(HeadlensError, match="head L9H9 is out of range"):
            random_heads(model, 1, **kwargs)

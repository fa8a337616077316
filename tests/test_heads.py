import pandas as pd
import pytest

from headlens import HeadlensError, tiny_model
from headlens.heads import (
    Head,
    check_heads,
    format_heads,
    heads_with_label,
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


def test_duplicates_are_an_error_not_dropped():
    with pytest.raises(HeadlensError, match="L5H3 is given twice"):
        parse_heads("L5H3,5.3")


def test_check_heads_sorts_dedupes_and_validates(model):
    assert check_heads(model, [(2, 1), "L0H3", (2, 1)]) == [(0, 3), (2, 1)]
    with pytest.raises(HeadlensError, match="out of range"):
        check_heads(model, ["L9H0"])


def test_selection_helpers(model):
    table = pd.DataFrame({"layer": [0, 1, 1, 2], "head": [1, 0, 2, 3], "label": ["induction", "other", "induction", "x"],
                          "score": [0.5, 0.9, 0.7, 0.1]})  # fmt: skip
    assert heads_with_label(table, "induction") == [(0, 1), (1, 2)]
    assert top_heads(table, "score", 2) == [(1, 0), (1, 2)]
    assert kv_group_heads(model, 1, 1) == [(1, 2), (1, 3)]


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

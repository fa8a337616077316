"""Census labels for circuit outputs: every head in an edge, node or composition table carries its census label and a
one-line card (label, its score, confidence, kv group), joined from a census table (``headlens census`` output or
:func:`headlens.census.run.census`)."""

from __future__ import annotations

import pandas as pd

from headlens.census.run import check_census_table
from headlens.circuits.graph import node_head, node_kind
from headlens.heads import head_name


def head_labels(census: pd.DataFrame) -> dict[tuple[int, int], str]:
    """``(layer, head) -> label``."""
    check_census_table(census)
    return {(int(r.layer), int(r.head)): str(r.label) for r in census.itertuples(index=False)}


def head_cards(census: pd.DataFrame) -> dict[tuple[int, int], str]:
    """``(layer, head) -> "L9H8 induction 0.93 (conf 1.00, kv 1)"``: the census card of each head, one line."""
    check_census_table(census)
    out = {}
    for r in census.itertuples(index=False):
        parts = [head_name(r.layer, r.head), str(r.label)]
        score = getattr(r, "label_score", None)
        if score is not None and score == score:
            parts.append(f"{float(score):.2f}")
        extra = []
        conf = getattr(r, "confidence", None)
        if conf is not None and conf == conf:
            extra.append(f"conf {float(conf):.2f}")
        kv = getattr(r, "kv_head", None)
        if kv is not None and kv == kv:
            extra.append(f"kv {int(kv)}")
        out[(int(r.layer), int(r.head))] = " ".join(parts) + (f" ({', '.join(extra)})" if extra else "")
    return out


def node_label(name: str, labels: dict[tuple[int, int], str]) -> str:
    """A node's label: the head's census label, or ``embed`` / ``mlp`` / ``logits`` for the other nodes."""

    head = node_head(name)
    if head is None:
        return node_kind(name)
    return labels.get((head.layer, head.head), "")

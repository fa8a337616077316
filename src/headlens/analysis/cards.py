"""Head cards: one or two sentences per head, generated from its evidence, and the evidence table behind them.

A card says, for one head: its label and the score that decided it (raw or sink-corrected, with its bootstrap
interval and threshold), the label's confidence, the runner-up label and why it lost, what the head reads (its
strongest query -> key pair on a prompt, and how much it parks on the first token), what it writes (the tokens its
OV circuit promotes and suppresses when it reads that key, through the effective embedding of
:mod:`headlens.census.ov`), the causal verdict of its label (:mod:`headlens.analysis.evidence`) and its role in a
task (:mod:`headlens.analysis.roles`) when one was measured.

Every number a card quotes is a cell of a table: :func:`explain` (one row per head: deciding column, score,
interval, runner-up) and :func:`score_table` (one head: every registered score, raw and ``_nosink``, against its
threshold, the deciding one marked). The console, the report and the cards all rank heads by ``label_score``, the
deciding score, so no view can contradict another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from transformer_lens import HookedTransformer

from headlens.census.ov import effective_embedding
from headlens.census.registry import head_types
from headlens.census.run import check_census_table, label_ratios, label_thresholds, table_scores
from headlens.engine.capture import head_patterns
from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import head_name

READ_PROMPT = (
    "The cat sat on the mat, and the dog sat on the log. The cat sat on the mat, and the dog sat on the log.\n"
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n"
)
"""The prompt a card's "reads" and "writes" come from (also the report's default attention prompt): repeated prose
for previous-token, duplicate and induction heads, code for delimiter and bracket heads."""
TOP_TOKENS = 3
"""Promoted / suppressed tokens a card names."""


# ---------------------------------------------------------------- what decided the label


def _limits(table: pd.DataFrame, thresholds: dict[str, float] | None) -> dict[str, float]:
    check_census_table(table)
    return label_thresholds(head_types(), thresholds)


def explain(table: pd.DataFrame, *, thresholds: dict[str, float] | None = None) -> pd.DataFrame:
    """Why each head has its label: one row per head of ``table`` (same order).

    Columns: ``layer, head, label, column`` (the score column that decided: e.g. ``delimiter_nosink`` where the head
    sinks on the delimiter probe), ``score`` (= the table's ``label_score``), ``lo, hi`` (its 95 % interval),
    ``threshold``, ``confidence``, ``runner_up`` (the best other label: a candidate if there is one, else the
    label whose score came closest to its threshold), ``runner_up_column``, ``runner_up_score``,
    ``runner_up_threshold`` and ``why`` (why the runner-up lost, in words).
    """
    types = head_types()
    limits = _limits(table, thresholds)
    eff = table_scores(table, types)
    ratios = label_ratios(eff, types, limits)
    rows = []
    for i, r in enumerate(table.itertuples(index=False)):
        label = str(r.label)
        own = types.get(label)
        column = _deciding(table, eff, own.column, i) if own is not None else None
        best, best_key = None, None
        for name, (ratio, ok) in ratios.items():
            if name == label or not np.isfinite(ratio[i]):
                continue
            key = (bool(ok[i]), float(ratio[i]))
            if best_key is None or key > best_key:
                best, best_key = name, key
        other = types.get(best) if best else None
        rows.append(
            {
                "layer": int(r.layer),
                "head": int(r.head),
                "label": label,
                "column": column,
                "score": _value(table, "label_score", i) if own is not None else np.nan,
                "lo": _value(table, "label_score_lo", i),
                "hi": _value(table, "label_score_hi", i),
                "threshold": limits.get(label, np.nan),
                "confidence": _value(table, "confidence", i),
                "runner_up": best,
                "runner_up_column": _deciding(table, eff, other.column, i) if other is not None else None,
                "runner_up_score": float(eff[other.column][i]) if other is not None else np.nan,
                "runner_up_threshold": limits.get(best, np.nan),
                "why": _why_lost(label, best, best_key, types, table, i) if best else "",
            }
        )
    return pd.DataFrame(rows)


def _value(table: pd.DataFrame, column: str, i: int) -> float:
    return float(table[column].iloc[i]) if column in table.columns else np.nan


def _deciding(table: pd.DataFrame, eff: dict, column: str, i: int) -> str:
    """``column`` or ``column_nosink``: whichever the sink-aware score of row ``i`` is (raw when both agree)."""
    alt = f"{column}_nosink"
    if alt in table.columns and column in table.columns:
        value, raw, nosink = eff[column][i], table[column].iloc[i], table[alt].iloc[i]
        if np.isfinite(value) and value == nosink and value != raw:
            return alt
    return column


def _why_lost(label: str, other: str, key: tuple[bool, float], types, table: pd.DataFrame, i: int) -> str:
    candidate, ratio = key
    if not candidate:
        if ratio >= 1.0:
            return f"its score clears the threshold but its condition fails ({types[other].description})"
        return f"its score is {ratio:.2f}x its threshold (below 1)"
    if label == "other" or label not in types:
        return "it is a candidate"  # cannot happen: a candidate always gives a label
    mine, theirs = types[label].tier, types[other].tier
    if theirs > mine:
        return f"a candidate too ({ratio:.2f}x its threshold), but tier {mine} labels come before tier {theirs}"
    return f"a candidate too, with a smaller score/threshold ratio ({ratio:.2f}x)"


def score_table(table: pd.DataFrame, layer: int, head: int, *, thresholds: dict[str, float] | None = None):
    """Every registered score of one head against its threshold: the evidence table of a card and a head view.

    One row per registered type: ``score`` (its name), ``raw`` and ``raw_lo``/``raw_hi``, ``nosink`` and its
    interval (NaN when the type has no sink-corrected column), ``read`` (which of the two the label rule reads for
    this head: ``raw`` or ``nosink``), ``threshold`` (NaN for a score that labels nothing), ``ratio`` (read /
    threshold), ``candidate`` (reaches the threshold and meets the type's condition) and ``decides`` (the row whose
    score gave the head its label). Types that label by another type's column (``copy_suppression`` reads
    ``induction``) show that column's values. :func:`score_tables` gives every head's (the report's head view).
    """
    return score_tables(table, thresholds=thresholds)(layer, head)


def score_tables(table: pd.DataFrame, *, thresholds: dict[str, float] | None = None):
    """``(layer, head) -> score_table(table, layer, head)`` with the table-wide work (sink-aware scores, ratios, the
    columns as arrays) done once, not once per head."""
    types = head_types()
    limits = _limits(table, thresholds)
    eff = table_scores(table, types)
    ratios = label_ratios(eff, types, limits)
    cols = {c: table[c].to_numpy(dtype=float) for c in table.select_dtypes("number").columns}
    layers, heads, labels = table["layer"].to_numpy(), table["head"].to_numpy(), table["label"].astype(str).to_numpy()

    def value(column: str, i: int) -> float:
        return float(cols[column][i]) if column in cols else np.nan

    def one(layer: int, head: int) -> pd.DataFrame:
        match = np.flatnonzero((layers == layer) & (heads == head))
        if len(match) != 1:
            raise HeadlensError(f"the census table has no head {head_name(layer, head)}")
        i = int(match[0])
        rows = []
        for name, t in types.items():
            column = t.column
            if column not in table.columns:
                continue
            deciding = _deciding(table, eff, column, i)
            ratio, ok = ratios.get(name, (None, None))
            rows.append(
                {
                    "score": name if column == name else f"{name} ({column})",
                    "raw": value(column, i),
                    "raw_lo": value(f"{column}_lo", i),
                    "raw_hi": value(f"{column}_hi", i),
                    "nosink": value(f"{column}_nosink", i),
                    "nosink_lo": value(f"{column}_nosink_lo", i),
                    "nosink_hi": value(f"{column}_nosink_hi", i),
                    "read": "nosink" if deciding.endswith("_nosink") else "raw",
                    "threshold": limits[name] if t.label else np.nan,
                    "ratio": float(ratio[i]) if ratio is not None else np.nan,
                    "candidate": bool(ok[i]) if ok is not None else False,
                    "decides": name == labels[i],
                }
            )
        return pd.DataFrame(rows)

    return one


# ---------------------------------------------------------------- what a head reads and writes


@dataclass(frozen=True)
class Reads:
    """What one head reads on a prompt: its strongest query -> key pair (first token excluded) and its sink share."""

    query: str
    key: str
    query_pos: int
    key_pos: int
    weight: float
    key_id: int | None
    sink: float


def reads(
    model: HookedTransformer, heads: Sequence[tuple[int, int]], prompt: str | torch.Tensor = READ_PROMPT
) -> dict[tuple[int, int], Reads]:
    """Each head's strongest attention pair on ``prompt`` beyond the first token, and its mean attention to it (one
    forward for all heads)."""
    check_model(model)
    heads = [(int(l), int(h)) for l, h in heads]
    tokens, patterns = head_patterns(model, prompt, heads)
    ids = model.to_tokens(prompt, prepend_bos=False)[0].tolist() if isinstance(prompt, str) else prompt.tolist()
    out = {}
    for (layer, head), pattern in zip(heads, patterns):
        body = pattern[1:, 1:].clone()  # queries and keys after the first token
        if body.numel() == 0:
            continue
        q, k = divmod(int(body.argmax()), body.shape[1])
        out[(layer, head)] = Reads(
            query=tokens[q + 1],
            key=tokens[k + 1],
            query_pos=q + 1,
            key_pos=k + 1,
            weight=float(body[q, k]),
            key_id=int(ids[k + 1]),
            sink=float(pattern[1:, 0].mean()),
        )
    return out


def writes(
    model: HookedTransformer, read: dict[tuple[int, int], Reads], *, top_k: int = TOP_TOKENS
) -> dict[tuple[int, int], tuple[list[str], list[str]]]:
    """Per head: the ``top_k`` tokens its OV circuit promotes and suppresses most when it attends to the key it reads
    most (the key's effective embedding through W_V W_O W_U, :func:`headlens.census.ov.effective_embedding`).

    Empty for a model without a tokenizer (nothing to name)."""
    check_model(model)
    if getattr(model, "tokenizer", None) is None or not read:
        return {}
    heads = list(read)
    ids = torch.tensor([read[h].key_id for h in heads])
    eff = effective_embedding(model, ids)
    x = eff / eff.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt()  # the head's input norm (folded into W_V)
    n_vocab = min(model.cfg.d_vocab, len(model.tokenizer))
    out = {}
    with torch.inference_mode():
        for layer in sorted({h[0] for h in heads}):
            mine = [(j, h) for j, h in enumerate(heads) if h[0] == layer]
            attn = model.blocks[layer].attn
            idx = torch.tensor([h for _, (_, h) in mine])
            rows = x[[j for j, _ in mine]].to(attn.W_V.device, attn.W_V.dtype)
            v = torch.einsum("nd,nde->ne", rows, attn.W_V[idx]) + attn.b_V[idx]
            written = torch.einsum("ne,ned->nd", v, attn.W_O[idx])
            logits = (written @ model.W_U).float().cpu()[:, :n_vocab]  # slicing W_U first would copy it
            up, down = logits.topk(top_k, -1).indices, (-logits).topk(top_k, -1).indices
            for row, (_, lh) in enumerate(mine):
                out[lh] = (
                    [model.tokenizer.decode([int(t)]) for t in up[row]],
                    [model.tokenizer.decode([int(t)]) for t in down[row]],
                )
    return out


# ---------------------------------------------------------------- the card


def _q(token: str) -> str:
    """A token quoted for a sentence: repr keeps spaces and newlines visible."""
    return repr(token)


def _score_text(column: str, score: float, lo: float, hi: float) -> str:
    name = column.removesuffix("_nosink")
    kind = "sink-corrected " if column.endswith("_nosink") else ""
    interval = f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
    return f"{kind}{name} score {score:.3f}{interval}"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def card_text(
    why: pd.Series,
    *,
    read: Reads | None = None,
    written: tuple[list[str], list[str]] | None = None,
    verdict: str | None = None,
    single: str | None = None,
    role: str | None = None,
    circuit: str | None = None,
) -> str:
    """The card of one head from its row of :func:`explain` and the optional evidence sentences."""
    name = head_name(why["layer"], why["head"])
    conf = f", confidence {why['confidence']:.2f}" if np.isfinite(why["confidence"]) else ""
    if why["label"] == "other":
        first = f"{name} has no label ('other'{conf}): no score reaches its threshold"
    elif not isinstance(why["column"], str):
        first = (
            f"{name} is labelled {why['label']!r}{conf}, which no registered head type gives: its evidence cannot be "
            "read here (register that type, or check the table)"
        )
    else:
        first = (
            f"{name} is {_article(why['label'])} {why['label']} head{conf}: its "
            f"{_score_text(why['column'], why['score'], why['lo'], why['hi'])} reaches the threshold {why['threshold']:g}"
        )
    if why["runner_up"]:
        first += (
            f"; runner-up {why['runner_up']} ({why['runner_up_column']} {why['runner_up_score']:.3f} vs "
            f"{why['runner_up_threshold']:g}) lost: {why['why']}"
        )
    parts = [first + "."]
    if read is not None:
        text = (
            f"On the example prompt it attends most from {_q(read.query)} (position {read.query_pos}) to {_q(read.key)} "
            f"(position {read.key_pos}, weight {read.weight:.2f}) and puts {read.sink:.0%} of its attention on the first "
            "token"
        )
        if written is not None:
            up, down = written
            text += (
                f"; reading {_q(read.key)} its OV circuit promotes {', '.join(map(_q, up))} and suppresses "
                f"{', '.join(map(_q, down))}"
            )
        parts.append(text + ".")
    for sentence in (verdict, single, role, circuit):
        if sentence:
            parts.append(sentence.rstrip(".") + ".")
    return " ".join(parts)


def head_cards(
    model: HookedTransformer,
    table: pd.DataFrame,
    *,
    prompt: str | torch.Tensor | None = None,
    evidence=None,
    roles: pd.DataFrame | None = None,
    circuit: pd.DataFrame | None = None,
    thresholds: dict[str, float] | None = None,
) -> pd.Series:
    """The card of every head of ``table`` (a Series aligned with it): store it as ``table["card"]``.

    ``prompt`` (default :data:`READ_PROMPT`; token ids for a model without a tokenizer) is what the heads are seen
    reading; ``evidence`` a :class:`headlens.analysis.evidence.LabelEvidence` (each label's causal verdict and the
    top heads' single-head effects); ``roles`` a :func:`headlens.analysis.roles.task_roles` table (each head's
    patching effect, direct logit attribution and attention to the answer on a task); ``circuit`` an edge table of
    :func:`headlens.circuits.find_circuit` (``edges.csv`` of ``headlens circuit``: each head's place in the circuit).
    """
    check_model(model)
    return _cards(
        model, table, None, prompt=prompt, evidence=evidence, roles=roles, circuit=circuit, thresholds=thresholds
    )


def head_card(
    model: HookedTransformer,
    table: pd.DataFrame,
    layer: int,
    head: int,
    *,
    prompt: str | torch.Tensor | None = None,
    evidence=None,
    roles: pd.DataFrame | None = None,
    circuit: pd.DataFrame | None = None,
    thresholds: dict[str, float] | None = None,
) -> str:
    """The card of one head (what ``headlens head`` prints): :func:`head_cards` for that head alone, in seconds."""
    check_model(model)
    score_table(table, layer, head)  # a clear error for a head the table lacks
    cards = _cards(
        model,
        table,
        (layer, head),
        prompt=prompt,
        evidence=evidence,
        roles=roles,
        circuit=circuit,
        thresholds=thresholds,
    )
    return str(cards.iloc[0])


def _cards(model, table, only, *, prompt, evidence, roles, circuit, thresholds) -> pd.Series:
    why = explain(table, thresholds=thresholds)
    if only is not None:
        why = why[(why["layer"] == only[0]) & (why["head"] == only[1])]
    heads = list(zip(why["layer"], why["head"]))
    if prompt is None and getattr(model, "tokenizer", None) is None:
        read = {}
    else:
        read = reads(model, heads, READ_PROMPT if prompt is None else prompt)
    written = writes(model, read)
    cards = []
    for _, row in why.iterrows():
        lh = (int(row["layer"]), int(row["head"]))
        verdict = single = role = place = None
        if evidence is not None:
            verdict, single = evidence.sentences(row["label"], *lh)
        if roles is not None:
            role = role_sentence(roles, *lh)
        if circuit is not None:
            place = circuit_sentence(circuit, *lh)
        cards.append(
            card_text(
                row,
                read=read.get(lh),
                written=written.get(lh),
                verdict=verdict,
                single=single,
                role=role,
                circuit=place,
            )
        )
    return pd.Series(cards, index=table.index[why.index], name="card")


def role_sentence(roles: pd.DataFrame, layer: int, head: int) -> str | None:
    """One sentence on a head's role in a task from a :func:`headlens.analysis.roles.task_roles` table."""
    part = roles[(roles["layer"] == layer) & (roles["head"] == head)]
    if part.empty:
        return None
    r = part.iloc[0]
    attn = f", {r['attn_answer']:.0%} of its attention on the answer token" if np.isfinite(r["attn_answer"]) else ""
    text = f"On the task ({r['task']}): "
    if np.isfinite(r["patching"]):
        measured = roles["patching"].dropna()
        rank = int((measured.abs() > abs(r["patching"])).sum()) + 1
        among = f", rank {rank} of {len(measured)} heads" if len(measured) > 1 else ""
        text += f"patching it alone restores {r['patching']:+.1%} of the clean-corrupted gap{among}; "
    dla_rank = int((roles["dla"].abs() > abs(r["dla"])).sum()) + 1
    return text + f"direct logit attribution {r['dla']:+.2f} (rank {dla_rank} of {len(roles)} by size){attn}"


def _edge_value(edge) -> float:
    """An edge's measured effect: the exact path-patching change where it was checked, else its attribution score."""
    exact = edge.get("exact", np.nan)
    return float(exact) if np.isfinite(exact) else float(edge["score"])


def _edge_list(edges: pd.DataFrame, end: str, top_k: int) -> str:
    rows = edges.assign(value=[_edge_value(e) for _, e in edges.iterrows()])
    rows = rows.reindex(rows["value"].abs().sort_values(ascending=False).index).head(top_k)
    named = []
    for _, e in rows.iterrows():
        kind = "exact" if np.isfinite(e.get("exact", np.nan)) else "score"
        named.append(f"{e[end]} [{e['input']}] ({kind} {e['value']:+.3f})")
    more = f" and {len(edges) - top_k} more" if len(edges) > top_k else ""
    return ", ".join(named) + more


def circuit_sentence(edges: pd.DataFrame, layer: int, head: int, *, top_k: int = 3) -> str | None:
    """One sentence on a head's place in a circuit, from an edge table (``sender, receiver, input, score`` and, when
    present, ``exact`` and ``in_circuit``): whose q/k/v inputs it feeds and what feeds it, strongest edges first.
    None when the table has no edge at this head."""
    missing = [c for c in ("sender", "receiver", "input", "score") if c not in edges.columns]
    if missing:
        raise HeadlensError(
            f"the circuit edge table lacks column(s) {', '.join(missing)} (use edges.csv of headlens circuit)"
        )
    top_k = check_count("top_k", top_k, why="edges named per direction")
    name = head_name(layer, head)
    kept = edges[edges["in_circuit"].astype(bool)] if "in_circuit" in edges.columns else edges
    out, into = kept[kept["sender"] == name], kept[kept["receiver"] == name]
    if out.empty and into.empty:
        touched = ((edges["sender"] == name) | (edges["receiver"] == name)).any()
        return f"In the circuit: {name} is not part of it (its edges rank below the cut)" if touched else None
    parts = []
    if not out.empty:
        parts.append(f"feeds {_edge_list(out, 'receiver', top_k)}")
    if not into.empty:
        parts.append(f"is fed by {_edge_list(into, 'sender', top_k)}")
    return f"In the circuit: {name} " + "; it ".join(parts)

"""One head vocabulary: the :class:`Head` type, parsing, checks, kv groups and head selection.

A head is ``Head(layer, head)``, a named tuple (so plain ``(layer, head)`` tuples keep working) that prints as
``L5H3``. :func:`parse_head` reads ``L5H3``, ``l5h3``, ``L5 H3``, ``5.3`` and tuples back.

GQA: q head ``h`` reads kv head ``h // (n_heads / n_kv_heads)`` (:func:`kv_heads`). Tables encode a unit that is
a whole kv group (ablating every q head of the group, or patching a shared k/v) ONE way everywhere: ``head`` is
<NA> (pandas ``Int64``) and ``kv_head`` names the group; its name prints as ``L5KV1`` (:func:`unit_name`).
"""

from __future__ import annotations

import numbers
import operator
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from headlens.errors import HeadlensError, check_count, check_model, is_whole

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens import HookedTransformer

_HEAD = re.compile(r"^\s*(?:L\s*(\d+)\s*H\s*(\d+)|(\d+)\s*\.\s*(\d+))\s*$", re.IGNORECASE)


class _Head(NamedTuple):
    layer: int
    head: int


class Head(_Head):
    """One attention head; ``str(Head(5, 3)) == "L5H3"``. Layers and heads count from 0."""

    __slots__ = ()

    def __new__(cls, layer: int, head: int) -> Head:
        if any(isinstance(x, numbers.Real) and x < 0 for x in (layer, head)):
            raise HeadlensError(f"head L{layer}H{head} is out of range: layers and heads count from 0")
        return super().__new__(cls, layer, head)

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


HeadLike = Head | tuple | str
"""What head arguments accept: a Head, a (layer, head) pair of integers, or 'L5H3' / '5.3'."""


def head_name(layer: int, head: int) -> str:
    """``L5H3``: the one spelling of a head in tables, figures and messages."""
    return str(Head(int(layer), int(head)))


def unit_name(layer: int, head, kv_head=None) -> str:
    """``L5H3`` for a q head, ``L5KV1`` for a kv-group row (``head`` is <NA> / None)."""
    if head is None or str(head) in ("<NA>", "nan", "None"):
        return f"L{int(layer)}KV{int(kv_head)}"
    return head_name(layer, head)


def format_heads(heads: Iterable) -> str:
    """Space-separated names, e.g. ``"L1H0 L1H3"``."""
    return " ".join(str(parse_head(h)) for h in heads)


def parse_head(item) -> Head:
    """A :class:`Head` from ``L5H3``, ``5.3``, ``L5 H3`` or a ``(layer, head)`` pair."""
    if isinstance(item, str):
        match = _HEAD.match(item)
        if not match:
            raise HeadlensError(f"bad head {item!r}: write heads as L5H3 or 5.3 (layer 5, head 3)")
        layer, head = (match.group(1), match.group(2)) if match.group(1) is not None else match.group(3, 4)
        return Head(int(layer), int(head))
    try:
        layer, head = item
    except (TypeError, ValueError):
        layer = head = None
    if not all(_head_number(x) for x in (layer, head)):
        raise HeadlensError(
            f"bad head {item!r}: heads are (layer, head) integer pairs, e.g. [(3, 5), (10, 0)], or 'L3H5'"
        )
    return Head(int(layer), int(head))


def _head_number(x) -> bool:
    """A layer or head number in a pair: a whole number (:func:`~headlens.errors.is_whole`), or a float with no
    fraction (pandas gives a row's integers as floats); never a bool (``True`` would be layer 1) or a string."""
    return is_whole(x) or (isinstance(x, numbers.Real) and not isinstance(x, bool) and float(x).is_integer())


def parse_heads(heads: str | Iterable) -> list[Head]:
    """Heads from ``"L5H3,5.3"`` (commas) or an iterable of heads, in the given order; duplicates are an error."""
    if not isinstance(heads, (str, Iterable)):
        raise HeadlensError(
            f"heads must be a string like 'L5H3,5.3' or a list of (layer, head) pairs (got {type(heads).__name__})"
        )
    items = [p.strip() for p in heads.split(",") if p.strip()] if isinstance(heads, str) else list(heads)
    out = [parse_head(h) for h in items]
    repeated = sorted(h for h, n in Counter(out).items() if n > 1)
    if repeated:
        raise HeadlensError(f"head {repeated[0]} is given twice: list each head once")
    return out


def check_head(model: HookedTransformer, layer: int, head: int) -> None:
    """Raise a clear error when (layer, head) is not a head of ``model``."""
    check_model(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if not (0 <= int(layer) < L and 0 <= int(head) < H):
        raise HeadlensError(
            f"head L{layer}H{head} is out of range: this model has layers 0..{L - 1} and heads 0..{H - 1}"
        )


def check_heads(model: HookedTransformer, heads: Iterable) -> list[Head]:
    """Validated, de-duplicated, sorted heads; a clear error for empty or out-of-range sets."""
    check_model(model)
    if isinstance(heads, str):
        heads = parse_heads(heads)
    if not isinstance(heads, Iterable):
        raise HeadlensError("heads must be a list of (layer, head) integer pairs, e.g. [(3, 5), (10, 0)]")
    pairs = [parse_head(h) for h in heads]
    if not pairs:
        raise HeadlensError("no heads given: pass at least one (layer, head) pair")
    for layer, head in pairs:
        check_head(model, layer, head)
    return sorted(set(pairs))


def check_layers(model: HookedTransformer, layers: Iterable[int] | None) -> list[int]:
    """Sorted distinct layers (all when None); a clear error when empty, out of range or not whole numbers (``int()``
    would silently read layer 0.5 as 0)."""
    check_model(model)
    n_layers = model.cfg.n_layers
    if layers is not None:
        if isinstance(layers, str) or not isinstance(layers, Iterable):
            raise HeadlensError(f"layers must be a list of layer numbers, e.g. [0, 3] (got {layers!r})")
        layers = list(layers)
        if not all(map(is_whole, layers)):
            raise HeadlensError(f"layers must be whole numbers, e.g. [0, 3] (got {layers!r})")
    layers = list(range(n_layers)) if layers is None else sorted({operator.index(l) for l in layers})
    if not layers:
        raise HeadlensError("no layers given: pass layers=None for all, or a non-empty list")
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise HeadlensError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
    return layers


def check_head_table(table, model: HookedTransformer | None = None, *, what: str = "the table") -> pd.DataFrame:
    """``table`` when it is a DataFrame with one row per head: ``layer`` and ``head`` whole numbers >= 0 (numbers, not
    text), no head twice and, with ``model``, every head one of its heads. Strings, fractions, negatives (which
    numpy indexing reads from the end) and repeated rows would put a head's values on another head."""
    import pandas as pd

    if not isinstance(table, pd.DataFrame):
        raise HeadlensError(f"{what} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in ("layer", "head") if c not in table.columns]
    if missing:
        raise HeadlensError(f"{what} lacks column(s) {', '.join(missing)}: it needs one row per (layer, head)")
    for column in ("layer", "head"):
        values = table[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise HeadlensError(f"{what}: column {column!r} must hold integers, not {values.dtype} values")
        bad = values[values.isna() | (values < 0) | (values % 1 != 0)]
        if len(bad):
            raise HeadlensError(f"{what}: column {column!r} holds {bad.iloc[0]}: layers and heads are integers >= 0")
    if table.duplicated(["layer", "head"]).any():
        raise HeadlensError(f"{what} lists some (layer, head) more than once: pass one row per head")
    if model is not None and len(table):
        worst = table.loc[(table["layer"] >= model.cfg.n_layers) | (table["head"] >= model.cfg.n_heads)]
        if len(worst):
            check_head(model, int(worst["layer"].iloc[0]), int(worst["head"].iloc[0]))
    return table


def kv_heads(model: HookedTransformer) -> list[int]:
    """The kv head each q head reads (GQA): q head h uses kv head h // (n_heads / n_kv_heads)."""
    check_model(model)
    n_heads = model.cfg.n_heads
    group = n_heads // (model.cfg.n_key_value_heads or n_heads)
    return [h // group for h in range(n_heads)]


def head_frame(model: HookedTransformer, **columns) -> pd.DataFrame:
    """One row per (layer, head) with its ``kv_head``, plus ``columns`` (``[layer, head]`` tensors, rounded to 1e-6)."""
    check_model(model)
    import numpy as np
    import pandas as pd

    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), H),
            "head": np.tile(np.arange(H), L),
            "kv_head": np.tile(np.asarray(kv_heads(model)), L),
        }
    )
    for name, value in columns.items():
        out[name] = value.double().flatten().numpy().round(6)
    return out


def kv_group_heads(model: HookedTransformer, layer: int, kv_head: int) -> list[Head]:
    """The q heads of ``layer`` that read kv head ``kv_head`` (ablating the group = ablating these)."""
    check_model(model)
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    check_head(model, layer, 0)
    if not 0 <= int(kv_head) < n_kv:
        raise HeadlensError(f"kv head {kv_head} is out of range: this model has kv heads 0..{n_kv - 1}")
    return [Head(int(layer), h) for h, g in enumerate(kv_heads(model)) if g == int(kv_head)]


def top_heads(table: pd.DataFrame, column: str, top_k: int = 10, *, largest: bool = True) -> list[Head]:
    """The ``top_k`` heads by ``column`` (largest first, or smallest with ``largest=False``)."""
    top_k = check_count("top_k", top_k, why="how many heads to keep")
    if column not in table.columns:
        raise HeadlensError(f"no column {column!r} in the table (columns: {', '.join(map(str, table.columns))})")
    ordered = table.sort_values(column, ascending=not largest, kind="stable").head(top_k)
    return [Head(int(l), int(h)) for l, h in zip(ordered["layer"], ordered["head"])]


def random_heads(
    model: HookedTransformer,
    n: int,
    *,
    seed: int = 0,
    exclude: Iterable = (),
    like: Iterable | None = None,
) -> list[Head]:
    """``n`` distinct random heads not in ``exclude``, sorted; with ``like``, matched to ``like``'s layers.

    Layer matching: each layer of ``like`` gets as many heads drawn from its own non-excluded heads. A layer
    with too few (e.g. 25 induction heads, most of them in one layer) takes what it has and the rest comes from
    the nearest layers: distance 1 (both neighbours pooled), then 2, ..., drawn at random from the free heads
    there. Deficits are filled after every layer's own draw, in layer order, so a fill never takes a head a
    layer needed for itself. Deterministic for a seed; an error only when the model has too few free heads.
    """
    check_model(model)
    import numpy as np  # imported here: this module stays light for the CLI

    n = check_count("n", n, why="the number of random heads to draw")
    if like is not None:
        like = list(like)
        if n != len(like):
            raise HeadlensError(f"n must equal the number of heads in like= ({len(like)}), got {n}: pass n=len(like)")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    banned = {parse_head(h) for h in exclude}
    for layer, head in [*banned, *map(parse_head, like or ())]:
        check_head(model, layer, head)
    g = np.random.default_rng(seed)
    free_in = {layer: [Head(layer, h) for h in range(H) if Head(layer, h) not in banned] for layer in range(L)}
    if like is None:
        free = [h for layer in range(L) for h in free_in[layer]]
        if n > len(free):
            raise HeadlensError(
                f"cannot draw {n} random heads: {len(free)} heads are available outside the excluded set"
            )
        return sorted(free[i] for i in g.choice(len(free), n, replace=False))
    counts: dict[int, int] = defaultdict(int)
    for layer, _ in map(parse_head, like):
        counts[layer] += 1
    total_free = sum(len(v) for v in free_in.values())
    if sum(counts.values()) > total_free:
        raise HeadlensError(
            f"cannot draw {sum(counts.values())} random heads: {total_free} heads are available outside the excluded set"
        )
    chosen: set[Head] = set()
    deficit: dict[int, int] = {}
    for layer, k in sorted(counts.items()):
        free = free_in[layer]
        take = min(k, len(free))
        chosen.update(free[i] for i in g.choice(len(free), take, replace=False))
        if k > take:
            deficit[layer] = k - take
    for layer, k in deficit.items():
        for distance in range(1, L):
            pool = [h for d in (-distance, distance) for h in free_in.get(layer + d, []) if h not in chosen]
            take = min(k, len(pool))
            chosen.update(pool[i] for i in g.choice(len(pool), take, replace=False))
            k -= take
            if k == 0:
                break
    return sorted(chosen)

"""The head-type registry: one table of head types that the census, labels, figures and report read.

This module imports nothing of headlens but the error type; the built-in types register from
:mod:`headlens.census` (its ``__init__``, through :mod:`headlens.census.builtin`).

A head type is data: a name (the label and its score column), the probe kind it is scored on (or
``"weights"``), a score function, a threshold, a tier and a one-line description. Register your own::

    from headlens.census.registry import HeadType, register

    def late_sink(pattern, probe, rows):  # [batch, head, q, k] -> [batch, head], one number per sequence
        return pattern[..., -8:, 0].mean(-1)

    register(HeadType("late_sink", "natural", late_sink, threshold=0.8, tier=2, description="last queries sink"))

and it appears as a column and a label of :func:`headlens.census.run.census` (tiers: the lowest tier holding
a candidate decides; inside it the largest score/threshold ratio wins; ties go to the type registered first).

Fields beyond the basic ones:

- ``nosink``: the census also computes the score on the pattern with key 0 removed and each query row
  renormalised (column ``<name>_nosink``), and labels with it where the head sinks (see ``headlens.census.run``).
- ``requires``: ``requires(scores) -> bool array`` — a head is a candidate only where it is true, e.g.
  induction needs positive OV copying; ``scores`` maps column names to arrays of equal shape.
- ``label_score``: the column the threshold is compared with (default: ``name``; ``copy_suppression`` reads ``induction``).
  With ``score=None`` the type adds no column of its own and labels by that column alone.
- ``label=False``: a score column only, never a label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from headlens.errors import HeadlensError

WEIGHTS = "weights"


@dataclass(frozen=True)
class HeadType:
    """One head type; see the module docstring for what each field does."""

    name: str
    probe: str
    score: Callable | None
    threshold: float
    tier: int
    description: str
    color: str = "#888888"
    label: bool = True
    nosink: bool = False
    requires: Callable | None = field(default=None, compare=False)
    label_score: str | None = None

    @property
    def column(self) -> str:
        """The score column the label threshold is compared with."""
        return self.label_score or self.name


_REGISTRY: dict[str, HeadType] = {}


def register(head_type: HeadType, *, replace: bool = False) -> HeadType:
    """Add ``head_type`` to the registry (``replace=True`` to overwrite one of the same name); returns it."""
    if not isinstance(head_type, HeadType):
        raise HeadlensError(f"register() takes a headlens.census.registry.HeadType (got {type(head_type).__name__})")
    name = head_type.name
    if not name or not name.isidentifier() or name == "other" or name.endswith("_nosink"):
        raise HeadlensError(f"head type name {name!r} must be an identifier, not 'other' and not end in '_nosink'")
    if name in _REGISTRY and not replace:
        raise HeadlensError(f"head type {name!r} is already registered; pass replace=True to overwrite it")
    if head_type.score is None and not head_type.label_score:
        raise HeadlensError(f"head type {name!r}: give a score function, or label_score= the column it labels by")
    if head_type.score is not None and not callable(head_type.score):
        raise HeadlensError(f"head type {name!r}: score must be callable")
    if not (float(head_type.threshold) == float(head_type.threshold)) or (head_type.label and head_type.threshold <= 0):
        raise HeadlensError(f"head type {name!r}: threshold must be a positive number (got {head_type.threshold})")
    if head_type.probe == WEIGHTS and head_type.nosink:
        raise HeadlensError(f"head type {name!r}: a weights score has no sink to remove (nosink=False)")
    _REGISTRY[name] = head_type
    return head_type


def unregister(name: str) -> None:
    """Remove a head type (a clear error when it is not registered)."""
    if name not in _REGISTRY:
        raise HeadlensError(f"no head type {name!r} is registered; known: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def head_types() -> dict[str, HeadType]:
    """All registered head types, in registration order (a copy)."""
    return dict(_REGISTRY)


def labels() -> tuple[str, ...]:
    """The label names (types with ``label=True``) in tier order, then ``"other"``."""
    types = [t for t in head_types().values() if t.label]
    return (*(t.name for t in sorted(types, key=lambda t: t.tier)), "other")

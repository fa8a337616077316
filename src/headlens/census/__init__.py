"""The census floor: head types (the registry and the built-ins), their scores, and the census that labels every head.

Importing this package registers the built-in head types (:mod:`headlens.census.builtin`) before anything reads
the registry, so :func:`run_census`, the labels and the report all see the same types.
"""

from headlens.census.builtin import register_builtins

register_builtins()

from headlens.census.run import (  # noqa: E402 (the registry must hold the built-ins before run.py reads it)
    COLUMNS,
    LABEL_SCORE,
    LABELS,
    THRESHOLDS,
    CensusResult,
    heads_with_label,
    label_counts,
    run_census,
)

__all__ = [
    "COLUMNS",
    "LABELS",
    "LABEL_SCORE",
    "THRESHOLDS",
    "CensusResult",
    "heads_with_label",
    "label_counts",
    "run_census",
]

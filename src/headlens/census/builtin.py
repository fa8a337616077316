"""The built-in head types, defined in one place and registered by :mod:`headlens.census` when it is imported.

Tier 1 holds the specific behaviours (previous-token, duplicate-token, induction, copy suppression, delimiter,
successor, bracket matching, closer-to-opener, identifier), tier 2 the bulk ones (first-token sink, local), tier 3 positional;
tier 9 types are score columns only (``label=False``). Registration order is the column order of the census.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from headlens.census import code_heads, ov, positional
from headlens.census import scores as s
from headlens.census.registry import WEIGHTS, HeadType, head_types, register


def _repeat_n(probe, rows: slice) -> Tensor:
    return probe.n_per_seq[rows]


def _evidence(cols: dict) -> tuple[np.ndarray, np.ndarray]:
    """(known, suppresses) per head, from the one OV copying measurement (:mod:`headlens.census.ov`): a head
    suppresses when it ranks at least half the sampled tokens in the bottom 1 % of its own OV output
    (``negative_copying`` >= 0.5). The eigenvalue sign of W_E W_V W_O W_U, used here before, called Qwen's layer-16
    induction heads suppressive, yet ablating them costs 2.5 nats of in-context copying (census_trust, first run)."""
    neg = np.asarray(cols.get("negative_copying", np.full(len(next(iter(cols.values()))), np.nan)), dtype=float)
    known = np.isfinite(neg)
    return known, known & (np.nan_to_num(neg) >= s.NEGATIVE_COPYING)


def _suppresses(cols: dict) -> np.ndarray:
    return _evidence(cols)[1]


def _has_copying(cols: dict) -> np.ndarray:
    known, supp = _evidence(cols)
    return known & ~supp


def _needs_tokenizer(fn):
    """A weights score that reads token strings: NaN for a tokenizer-less model (e.g. the toy model) instead of an error."""

    def score(model: HookedTransformer) -> Float[Tensor, "layer head"]:
        if getattr(model, "tokenizer", None) is None:
            return torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))
        return fn(model)

    return score


def _column(model: HookedTransformer, table: pd.DataFrame, name: str) -> Float[Tensor, "layer head"]:
    grid = table.set_index(["layer", "head"])[name]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    return torch.tensor([[float(grid.loc[(l, h)]) for h in range(H)] for l in range(L)])


def _predicted_score(pattern, probe, rows):
    return ov.attention_to_predicted(pattern, ov.predicted_mask(probe.tokens[rows], probe.predicted[rows]))


def _not_positional(eff: dict) -> np.ndarray:
    """A bracket head reads where the opener is; a positional head (content-free, e.g. always 6 back) can hit the
    opener (or its region) by its distance alone, so it is labelled neither bracket_matching nor closer_to_opener."""
    score = eff.get("positional")
    if score is None:
        return np.ones(len(next(iter(eff.values()))), dtype=bool)
    return np.nan_to_num(np.asarray(score, dtype=float)) < positional.THRESHOLD


def builtin_types() -> list[HeadType]:
    """The built-in head types, in the order the registry lists them (tier 1 first)."""
    return [
        HeadType(
            "previous_token",
            "natural",
            lambda p, probe, rows: s.previous_token_seq(p),
            0.4,
            1,
            "attention from i to i-1 on natural text",
            "#1f77b4",
            nosink=True,
        ),
        HeadType(
            "duplicate_token",
            "repeated",
            lambda p, probe, rows: s.duplicate_token_seq(p, _repeat_n(probe, rows)),
            0.3,
            1,
            "second A_i -> first A_i on repeated random tokens",
            "#ff7f0e",
            nosink=True,
        ),
        HeadType(
            "induction",
            "repeated",
            lambda p, probe, rows: s.induction_seq(p, _repeat_n(probe, rows)),
            0.3,
            1,
            "prefix matching (second A_i -> the token after the first A_i) and not copy-suppressing",
            "#d62728",
            nosink=True,
            requires=_has_copying,
        ),
        HeadType(
            "copy_suppression",
            "repeated",
            None,
            0.3,
            1,
            "prefix matching by a head whose OV pushes down the token it reads (negative_copying >= 0.5)",
            "#8c564b",
            requires=_suppresses,
            label_score="induction",
        ),
        HeadType(
            "copying",
            WEIGHTS,
            lambda m: ov.census_copying(m)["copying"],
            1.0,
            9,
            "share of tokens the OV circuit ranks at the top of its own output minus the share at the bottom: +1"
            " copies what it attends to, -1 suppresses it (a score only)",
            "#17becf",
            label=False,
        ),
        HeadType(
            "first_token",
            "natural",
            lambda p, probe, rows: s.first_token_seq(p),
            0.3,
            2,
            "attention to position 0 (the sink): >= 0.3, the sink threshold of Gu et al. 2024",
            "#7f7f7f",
        ),
        HeadType(
            "delimiter",
            "delimiter",
            lambda p, probe, rows: s.delimiter_seq(p, probe.is_delim[rows]),
            0.3,
            1,
            "excess attention on delimiter tokens over a uniform causal head",
            "#2ca02c",
            nosink=True,
        ),
        HeadType(
            "local",
            "natural",
            lambda p, probe, rows: s.local_seq(p),
            0.3,
            2,
            f"attention on the {s.LOCAL_WINDOW} previous keys and the query itself",
            "#9467bd",
            nosink=True,
        ),
        HeadType(
            "entropy",
            "natural",
            lambda p, probe, rows: s.entropy_seq(p),
            1.0,
            9,
            "normalised attention entropy (1 = uniform over the prefix; a score only: an untrained head is the"
            " broadest, so breadth is no label)",
            "#bcbd22",
            label=False,
        ),
        HeadType(
            "successor",
            WEIGHTS,
            _needs_tokenizer(ov.successor_scores),
            ov.THRESHOLDS["successor"],
            1,
            "OV output ranks the next ordinal (Monday -> Tuesday) top-1 (Gould et al. 2023)",
            "#bcbd22",
        ),
        HeadType(
            "bracket_matching",
            "code",
            lambda p, probe, rows: code_heads.bracket_matching(p, probe.opener[rows]),
            code_heads.THRESHOLDS["bracket_matching"],
            1,
            "token before a closer -> its opener and the tokens beside it, on stdlib code",
            "#9467bd",
            requires=_not_positional,
        ),
        HeadType(
            "closer_to_opener",
            "code",
            lambda p, probe, rows: code_heads.closer_to_opener(p, probe.opener[rows], probe.is_opener[rows]),
            code_heads.THRESHOLDS["closer_to_opener"],
            1,
            "a closing bracket -> its own opener, beyond its attention on other openers, on stdlib code",
            "#17a589",
            requires=_not_positional,
        ),
        HeadType(
            "identifier",
            "code",
            lambda p, probe, rows: code_heads.identifier(p, probe.ident[rows]),
            code_heads.THRESHOLDS["identifier"],
            1,
            "a re-used name -> its earlier occurrences on stdlib code",
            "#e377c2",
        ),
        HeadType(
            "attention_to_predicted",
            "predicted",
            _predicted_score,
            ov.THRESHOLDS["attention_to_predicted"],
            9,
            "attention on earlier copies of the token the model predicts next (a score only)",
            label=False,
        ),
        HeadType(
            "negative_copying",
            WEIGHTS,
            lambda m: ov.census_copying(m)["negative_copying"],
            ov.THRESHOLDS["negative_copying"],
            9,
            "share of tokens the OV circuit ranks at the bottom of its own output (a score only)",
            label=False,
        ),
        HeadType(
            "positional",
            WEIGHTS,
            _needs_tokenizer(lambda m: _column(m, positional.positional_table(m), "positional")),
            positional.THRESHOLD,
            3,
            "same distance preference on constant tokens as on text",
            "#aec7e8",
        ),
        HeadType(
            "positional_offset",
            WEIGHTS,
            _needs_tokenizer(lambda m: _column(m, positional.positional_table(m), "positional_offset")),
            1.0,
            9,
            "the distance a positional head prefers (-1: none; a score only)",
            label=False,
        ),
    ]


def register_builtins(*, replace: bool = False) -> None:
    """Put every built-in type on the registry (``replace=True`` restores one a user overwrote)."""
    known = head_types()
    for t in builtin_types():
        if replace or t.name not in known:
            register(t, replace=replace)

"""Seed 004: "induction heads form abruptly during the same window where in-context learning develops".

Trains the toy 2-layer attention-only model (``headlens.analysis.toy``) on CPU, records the repeated-half
loss and every head's prefix-matching score through training, and checks that the loss cliff and
the first head crossing a prefix-matching score of 0.5 fall in the same window. Writes
``history.csv``, ``phase_change.png``, ``phase_change.json`` and the census of the trained model
(``census.csv``) under ``analyses/results/induction_phase_change/``.

    python analyses/induction_phase_change.py                    # ~minutes on 1 CPU core
    python analyses/induction_phase_change.py --save-checkpoint  # also refresh the packaged model
    python analyses/induction_phase_change.py --reuse            # no training: re-analyse the packaged model + history

Deterministic: same seed -> same history (training runs on one thread).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch

from headlens.analysis import toy
from headlens.io import save_figure, write_csv, write_text

OUT = Path(__file__).resolve().parent / "results" / "induction_phase_change"


def plot(history: pd.DataFrame, found: dict, path: Path) -> None:
    """Repeated-half loss and max prefix-matching score (plus the best layer-0 previous-token score) vs step."""
    ind = history[toy.head_columns(history, kind="induction")].max(axis=1)
    prev0 = history[toy.head_columns(history, kind="previous_token", layer=0)].max(axis=1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(history["step"], history["loss_repeated_half"], color="tab:red", label="loss, repeated half")
    ax.plot(history["step"], history["loss_first_half"], color="tab:red", alpha=0.35, ls="--", label="loss, first half")
    ax.set_xlabel("training step")
    ax.set_ylabel("next-token loss (nats)")
    right = ax.twinx()
    right.plot(history["step"], ind, color="tab:blue", label="max prefix-matching score (any head)")
    right.plot(history["step"], prev0, color="tab:green", alpha=0.7, label="max previous-token score (layer 0)")
    right.axhline(found["threshold"], color="tab:blue", ls=":", lw=1)
    right.set_ylim(0, 1)
    right.set_ylabel("attention score")
    if found["window_start"] is not None:
        ax.axvspan(found["window_start"], found["window_end"], color="grey", alpha=0.2, label="loss-drop window")
    if found["induction_step"] is not None:
        right.axvline(found["induction_step"], color="tab:blue", ls="--", lw=1)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center left", fontsize=8)
    ax.set_title("Toy 2-layer attention-only model: the induction phase change")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=toy.TRAIN_DEFAULTS["steps"])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--save-checkpoint", action="store_true", help="write the trained model and history into src/headlens/data/"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="skip training; analyse the packaged checkpoint and its recorded history"
    )
    args = parser.parse_args()

    train_args = {**toy.TRAIN_DEFAULTS, "steps": args.steps, "seed": args.seed}
    start = time.perf_counter()
    if args.reuse:
        model, history = toy.load_induction_model(), toy.load_induction_history()
        train_args = json.loads(toy.checkpoint_path().with_suffix(".json").read_text())["train_args"]
    else:
        model, history = toy.train_induction_model(**train_args, progress=True)
    seconds = time.perf_counter() - start
    found = toy.phase_change(history)

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(history, args.out / "history.csv")
    plot(history, found, args.out / "phase_change.png")

    from headlens.census import THRESHOLDS, run_census

    CENSUS_INDUCTION = THRESHOLDS["induction"]

    table = run_census(model, toy.toy_probes(model, seed=args.seed), progress=False).table
    write_csv(table, args.out / "census.csv")
    final = history.iloc[-1]
    ind_cols = toy.head_columns(history, kind="induction")
    prev0 = toy.head_columns(history, kind="previous_token", layer=0)
    report = {
        "train_args": train_args,
        "train_seconds": _previous_seconds(args.out) if args.reuse else round(seconds, 1),
        "torch": torch.__version__,
        "phase_change": found,
        "phase_change_at_census_threshold": toy.phase_change(history, threshold=CENSUS_INDUCTION),
        "final": {
            "loss_first_half": float(final["loss_first_half"]),
            "loss_repeated_half": float(final["loss_repeated_half"]),
            "best_induction_head": max(ind_cols, key=lambda c: final[c]),
            "best_induction_score": float(final[ind_cols].max()),
            "best_previous_token_head_layer0": max(prev0, key=lambda c: final[c]).removeprefix("prev_"),
            "best_previous_token_score_layer0": float(final[prev0].max()),
        },
        "census_labels": {f"L{r.layer}H{r.head}": r.label for r in table.itertuples()},
    }
    if train_args == toy.TRAIN_DEFAULTS and not args.reuse:
        packaged = toy.load_induction_history() if toy.checkpoint_path().exists() and not args.save_checkpoint else None
        if packaged is not None:
            same = packaged.shape == history.shape and bool((packaged - history).abs().max().max() < 1e-4)
            report["matches_packaged_history"] = same
    write_text(args.out / "phase_change.json", json.dumps(report, indent=2) + "\n")
    if args.save_checkpoint:
        toy.save_induction_model(model, toy.checkpoint_path(), train_args=train_args, history=history)
    print(json.dumps(report["phase_change"], indent=2))
    print(json.dumps(report["final"], indent=2))
    print(census_summary(table))


def _previous_seconds(out: Path) -> float | None:
    """Keep the training time measured by the run that produced the packaged model when re-analysing it."""
    old = out / "phase_change.json"
    return json.loads(old.read_text()).get("train_seconds") if old.is_file() else None


def census_summary(table: pd.DataFrame) -> str:
    cols = ["layer", "head", "previous_token", "induction", "duplicate_token", "first_token", "label"]
    return table[cols].to_string(index=False)


if __name__ == "__main__":
    main()

"""A real LoRA fine-tune of Qwen2.5-Coder-0.5B on CPU, then base vs tuned head by head.

Task, chosen so its effect on attention is predictable: **skip-one copy**. Sequences of 24 random
ordinary word tokens (from a fixed pool of 256); at every position i >= 2 the model must output the
token two positions back, x[i-2]. Loss is cross-entropy over the 256 pool tokens only (their rows of
the unembedding), which keeps a CPU step cheap. LoRA (r=8) on q/k/v/o of layers 12-23 only.

Prediction, stated before training:
1. layers 0-11 are untouched: attention JSD exactly 0 and weight change exactly 0 there;
2. the heads that change most are late heads whose attention moves to the key two back
   (attention at relative distance 2 on random tokens rises), possibly via distance 1 (a head
   reading the previous position, whose residual already holds its own previous token);
3. so their census previous-token / local scores move, and some labels may change.

Run: ``python analyses/lora_finetune.py`` (under ``flock /tmp/headlens-qwen.lock`` on a shared machine);
``--compare-only`` keeps the committed adapter and training.json and redoes the comparison (after a census change);
``--findings-only`` rebuilds findings.md from the saved tables without a model.
Writes to analyses/results/lora_finetune/: adapter/ (safetensors), training.json, compare.csv,
distance_profile.csv, compare.png, distance.png, findings.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import headlens
from headlens.analysis.compare import compare_models, top_changed
from headlens.census.rope import distance_profile
from headlens.io import save_figure, write_csv, write_text
from headlens.models import DEFAULT_MODEL, cache_dir, check_adapter, load_tuned
from headlens.render.plots import plot_comparison, plot_distance_curves

OUT = Path(__file__).resolve().parent / "results" / "lora_finetune"
SEED = 0
POOL = 256
SEQ_LEN = 24
BATCH = 8
STEPS = 16
LR = 3e-3
LAYERS = list(range(12, 24))
LAG = 2
RANK = 8


def task_batch(
    pool: torch.Tensor, generator: torch.Generator, n_seqs: int = BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pool tokens and the target pool index of every position >= LAG (the token LAG back)."""
    idx = torch.randint(0, len(pool), (n_seqs, SEQ_LEN), generator=generator)
    return pool[idx], idx[:, :-LAG]


def task_loss(
    model, unembed_rows: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Cross-entropy (over the pool) of predicting x[i-LAG] at positions i >= LAG, and the accuracy."""
    hidden = model.get_base_model().model(input_ids=tokens).last_hidden_state[:, LAG:]
    logits = hidden @ unembed_rows.T
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    acc = (logits.argmax(-1) == targets).float().mean().item()
    return loss, acc


def train(adapter_dir: Path, directory: Path | None = None) -> dict:
    """Train the LoRA on the Hugging Face model in ``directory`` (default: the cached Qwen) and save it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headlens.data.probes import word_tokens

    if directory is None:
        directory = cache_dir() / DEFAULT_MODEL
        if not (directory / "config.json").is_file():
            headlens.load_model()  # builds the dequantized cache
    torch.manual_seed(SEED)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    gen = torch.Generator().manual_seed(SEED)
    words = torch.tensor(word_tokens(tokenizer))
    pool = words[torch.randperm(len(words), generator=gen)[:POOL]].sort().values
    config = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        layers_to_transform=LAYERS,
    )
    model = get_peft_model(hf, config)
    unembed = hf.lm_head.weight[pool].detach()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    eval_tokens, eval_targets = task_batch(pool, torch.Generator().manual_seed(SEED + 1), n_seqs=16)

    def evaluate():
        with torch.no_grad():
            loss, acc = task_loss(model, unembed, eval_tokens, eval_targets)
        return loss.item(), acc

    before = evaluate()
    log, start = [], time.time()
    for step in range(STEPS):
        tokens, targets = task_batch(pool, gen)
        loss, acc = task_loss(model, unembed, tokens, targets)
        loss.backward()
        optim.step()
        optim.zero_grad()
        log.append(
            {
                "step": step,
                "loss": round(loss.item(), 4),
                "acc": round(acc, 4),
                "seconds": round(time.time() - start, 1),
            }
        )
        print(log[-1], flush=True)
    seconds = time.time() - start
    after = evaluate()
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    return {
        "task": f"skip-one copy: output the token {LAG} positions back; random sequences of {SEQ_LEN} tokens from a pool of {POOL} word tokens",
        "lora": {
            "r": RANK,
            "alpha": 2 * RANK,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "layers": LAYERS,
        },
        "steps": STEPS,
        "batch": BATCH,
        "lr": LR,
        "seed": SEED,
        "train_seconds": round(seconds, 1),
        "eval_before": {"loss": round(before[0], 4), "acc": round(before[1], 4)},
        "eval_after": {"loss": round(after[0], 4), "acc": round(after[1], 4)},
        "chance_loss": round(float(np.log(POOL)), 4),
        "log": log,
    }


def spearman_interval(x: pd.Series, y: pd.Series, n_boot: int = 2000, seed: int = SEED) -> tuple[float, float, float]:
    """Spearman correlation of ``x`` and ``y`` with a 95 % percentile interval from resampling their rows."""
    rng = np.random.default_rng(seed)
    x, y = x.to_numpy(), y.to_numpy()
    boots = [
        pd.Series(x[i]).corr(pd.Series(y[i]), method="spearman")
        for i in (rng.integers(0, len(x), len(x)) for _ in range(n_boot))
    ]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return pd.Series(x).corr(pd.Series(y), method="spearman"), lo, hi


def findings(df: pd.DataFrame, dist: pd.DataFrame, training: dict) -> str:
    frozen = df[df["layer"] < LAYERS[0]]
    tuned = df[df["layer"] >= LAYERS[0]]
    top = top_changed(df, 8)
    d = dist.pivot_table(index=["layer", "head"], columns=["model", "distance"], values="attention")
    gain = {k: d[("tuned", k)] - d[("base", k)] for k in (0, 1, 2, 3)}
    lines = [
        "# LoRA fine-tune of Qwen2.5-Coder-0.5B: which heads changed?",
        "",
        f"**Task.** {training['task']}. LoRA r={RANK} on q/k/v/o of layers {LAYERS[0]}-{LAYERS[-1]}, "
        f"{training['steps']} AdamW steps (batch {BATCH}, lr {LR}) on CPU in {training['train_seconds']} s. "
        f"Held-out task loss {training['eval_before']['loss']} -> {training['eval_after']['loss']} "
        f"(chance {training['chance_loss']}), accuracy {training['eval_before']['acc']:.3f} -> {training['eval_after']['acc']:.3f}.",
        "",
        "**Prediction (made before training).** Layers 0-11 unchanged; the heads that change most are late heads "
        "that move attention to the key 2 back (or 1 back), raising their attention at distance 2 on random tokens; "
        "their previous-token/local scores move and some labels may change.",
        "",
        "## Measured",
        "",
        f"- Frozen layers 0-{LAYERS[0] - 1}: max JSD {frozen['jsd'].max():.3g} bits, max relative weight change "
        f"{frozen[['dW_Q', 'dW_K', 'dW_V', 'dW_O']].to_numpy().max():.3g} (prediction 1: "
        f"{'holds' if frozen['jsd'].max() == 0 and frozen[['dW_Q', 'dW_K', 'dW_V', 'dW_O']].to_numpy().max() == 0 else 'fails'}).",
        f"- Tuned layers: mean JSD {df[df['layer'] >= LAYERS[0]]['jsd'].mean():.4f} bits over "
        f"{(df['layer'] >= LAYERS[0]).sum()} heads; relative weight change W_Q {df[df['layer'] >= LAYERS[0]]['dW_Q'].mean():.4f}, "
        f"W_K {df[df['layer'] >= LAYERS[0]]['dW_K'].mean():.4f}, W_V {df[df['layer'] >= LAYERS[0]]['dW_V'].mean():.4f}, "
        f"W_O {df[df['layer'] >= LAYERS[0]]['dW_O'].mean():.4f} (means).",
        "- Spearman correlation over tuned-layer heads between attention change (JSD) and query/key weight change "
        "(dW_Q + dW_K): {:.2f} [{:.2f}-{:.2f}] (95 % bootstrap interval over the heads; one training seed).".format(
            *spearman_interval(tuned["jsd"], tuned[["dW_Q", "dW_K"]].sum(axis=1))
        ),
        "",
        "## The 8 heads whose attention changed most (JSD on the census probes)",
        "",
    ]
    has_census = "label_base" in df.columns
    header = "| head | JSD (bits) | dW_Q | dW_K | dW_V | dW_O | attn@d1 base->tuned | attn@d2 base->tuned |"
    header += " d previous_token | d local | label base -> tuned |" if has_census else ""
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for _, r in top.iterrows():
        key = (r["layer"], r["head"])
        row = (
            f"| L{r['layer']}H{r['head']} | {r['jsd']:.3f} | {r['dW_Q']:.3f} | {r['dW_K']:.3f} | {r['dW_V']:.3f} | {r['dW_O']:.3f} | "
            f"{d.loc[key, ('base', 1)]:.3f} -> {d.loc[key, ('tuned', 1)]:.3f} | {d.loc[key, ('base', 2)]:.3f} -> {d.loc[key, ('tuned', 2)]:.3f} |"
        )
        if has_census:
            row += f" {r['d_previous_token']:+.3f} | {r['d_local']:+.3f} | {r['label_base']} -> {r['label_tuned']} |"
        lines.append(row)
    top8 = [(r["layer"], r["head"]) for _, r in top.iterrows()]
    g2 = gain[2]
    best2 = g2.idxmax()
    answer = (
        f"**Answer.** The heads whose attention changed most are in layers {min(k[0] for k in top8)}-{max(k[0] for k in top8)} "
        f"({', '.join(f'L{l}H{h}' for l, h in top8)}; JSD {top['jsd'].min():.2f}-{top['jsd'].max():.2f} bits of a possible 1). "
        f"All {sum(g2[k] > 0 for k in top8) if sum(g2[k] > 0 for k in top8) == len(top8) else str(sum(g2[k] > 0 for k in top8)) + ' of ' + str(len(top8))} "
        f"moved attention to the key 2 back (attention at distance 2 on random tokens "
        f"{min(d.loc[k, ('base', 2)] for k in top8):.2f}-{max(d.loc[k, ('base', 2)] for k in top8):.2f} -> "
        f"{min(d.loc[k, ('tuned', 2)] for k in top8):.2f}-{max(d.loc[k, ('tuned', 2)] for k in top8):.2f})"
        + (
            ", as predicted."
            if sum(g2[k] > 0 for k in top8) > len(top8) / 2
            else ", which is not what was predicted for most of them."
        )
    )
    if has_census:
        tl = df[df["layer"] >= LAYERS[0]]
        answer += (
            f" Their labels do change: {int(top['label_changed'].sum())} of {len(top)} "
            f"({', '.join(sorted(set(top['label_base'])))} -> {', '.join(sorted(set(top['label_tuned'])))}). "
            f"Across the tuned layers {int(tl['label_changed'].sum())} of {len(tl)} heads changed label, and "
            f"{int((tl['label_base'] == 'induction').sum())} induction heads became "
            f"{int((tl['label_tuned'] == 'induction').sum())}"
            + (
                ": the narrow task overwrote induction behaviour (not predicted). "
                if (tl["label_tuned"] == "induction").sum() < (tl["label_base"] == "induction").sum()
                else ". "
            )
            + (
                f"Layers 0-{LAYERS[0] - 1} are bit-identical (JSD and weight change exactly 0)."
                if frozen[["jsd", "dW_Q", "dW_K", "dW_V", "dW_O"]].to_numpy().max() == 0
                else ""
            )
        )
    lines[6:6] = [answer, ""]
    lines += [
        "",
        "## Distance profile on random tokens (headlens.census.rope, 8 x 64 tokens)",
        "",
        f"- Head with the largest gain of attention at distance 2: L{best2[0]}H{best2[1]} "
        f"({d.loc[best2, ('base', 2)]:.3f} -> {d.loc[best2, ('tuned', 2)]:.3f}).",
        f"- Of the 8 most-changed heads, {sum(g2[k] > 0 for k in top8)} gained attention at distance 2 and "
        f"{sum(gain[1][k] > 0 for k in top8)} at distance 1; mean gain at distance 0/1/2/3 over them: "
        + ", ".join(f"{np.mean([gain[j][k] for k in top8]):+.3f}" for j in (0, 1, 2, 3))
        + ".",
        f"- Over all tuned-layer heads, mean gain at distance 2: {g2[g2.index.get_level_values(0) >= LAYERS[0]].mean():+.4f}; "
        f"heads gaining more than 0.05 at distance 2: {int((g2 > 0.05).sum())}.",
    ]
    per_layer = df.groupby("layer")["jsd"].mean()
    lines += [
        "",
        "Mean JSD per layer (bits): "
        + ", ".join(f"L{l} {v:.2f}" for l, v in per_layer.items() if l >= LAYERS[0])
        + ".",
    ]
    if has_census:
        changed = df[df["label_changed"]]
        tuned_layers = df[df["layer"] >= LAYERS[0]]
        labels = sorted(set(tuned_layers["label_base"]) | set(tuned_layers["label_tuned"]))
        moves = pd.crosstab(tuned_layers["label_base"], tuned_layers["label_tuned"]).reindex(
            index=labels, columns=labels, fill_value=0
        )
        n_ind = lambda col: int((tuned_layers[col] == "induction").sum())  # noqa: E731
        kept = int(((tuned_layers["label_base"] == "induction") & (tuned_layers["label_tuned"] == "induction")).sum())
        lines += [
            "",
            "## Do labels change?",
            "",
            f"- {len(changed)} of {len(df)} heads changed label ({int(changed['layer'].lt(LAYERS[0]).sum())} of them in the frozen layers); "
            f"{int(tuned_layers['label_changed'].sum())} of the {len(tuned_layers)} heads of the tuned layers.",
            f"- Of the 8 most-changed heads, {int(top['label_changed'].sum())} changed label.",
            f"- Induction heads in layers {LAYERS[0]}-{LAYERS[-1]}: {n_ind('label_base')} before, {n_ind('label_tuned')} after "
            f"({kept} kept the label); largest induction-score drop {tuned_layers['d_induction'].min():+.3f}.",
            f"- 'local' heads (attention within 3 tokens) in layers {LAYERS[0]}-{LAYERS[-1]}: "
            f"{int((tuned_layers['label_base'] == 'local').sum())} before, {int((tuned_layers['label_tuned'] == 'local').sum())} after.",
            "",
            f"Label moves in layers {LAYERS[0]}-{LAYERS[-1]} (rows: base label, columns: tuned label, counts of heads):",
            "",
            "| base \\ tuned | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
            *[f"| {a} | " + " | ".join(str(int(moves.loc[a, b])) for b in labels) + " |" for a in labels],
            "",
            "All label changes: "
            + (
                ", ".join(
                    f"L{r['layer']}H{r['head']} {r['label_base']} -> {r['label_tuned']}" for _, r in changed.iterrows()
                )
                if len(changed)
                else "none"
            )
            + ".",
            "",
            "- Largest census score changes: "
            + ", ".join(
                f"{c[2:]} {df.loc[df[c].abs().idxmax(), c]:+.3f} (L{df.loc[df[c].abs().idxmax(), 'layer']}H{df.loc[df[c].abs().idxmax(), 'head']})"
                for c in df.columns
                if c.startswith("d_") and df[c].notna().any()
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def write_findings() -> str:
    """Rebuild findings.md from the saved tables (no model needed)."""
    df = pd.read_csv(OUT / "compare.csv")
    prof = pd.read_csv(OUT / "distance_profile.csv")
    training = json.loads((OUT / "training.json").read_text())
    text = findings(df, prof, training)
    write_text(OUT / "findings.md", text)
    return text


def main() -> None:
    if "--findings-only" in sys.argv[1:]:
        print(write_findings())
        return
    OUT.mkdir(parents=True, exist_ok=True)
    adapter_dir = OUT / "adapter"
    if "--compare-only" not in sys.argv[1:]:
        training = train(adapter_dir)
        write_text(OUT / "training.json", json.dumps(training, indent=2))
    base = headlens.load_model()
    print("adapter:", check_adapter(base, adapter_dir), flush=True)
    tuned = load_tuned(base, adapter_dir, base_source=DEFAULT_MODEL)
    df = compare_models(base, tuned, seed=SEED, n_seqs=None, batch_size=2)  # the full census probe set
    write_csv(df.round(6), OUT / "compare.csv")
    prof = pd.concat(
        [
            distance_profile(m, "random", n_seqs=8, seq_len=64, seed=SEED).assign(model=name)
            for name, m in (("base", base), ("tuned", tuned))
        ]
    )
    prof = prof[prof["distance"] <= 16]
    write_csv(prof.round(6), OUT / "distance_profile.csv")
    fig = plot_comparison(df)
    save_figure(fig, OUT / "compare.png", dpi=110)
    heads = [(int(r["layer"]), int(r["head"])) for _, r in top_changed(df, 8).iterrows()]
    fig = plot_distance_curves(prof.rename(columns={"model": "probe"}), heads, max_distance=16)
    fig.suptitle("attention vs distance on random tokens, base vs tuned (8 most-changed heads)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, OUT / "distance.png", dpi=110)
    print(write_findings())


if __name__ == "__main__":
    main()

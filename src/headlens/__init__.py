"""headlens: find out what the attention heads of Qwen models do.

The package is built in floors; a lower floor never imports a higher one (checked by import-linter in CI):

    errors, progress -> io, heads -> data -> models -> engine -> interventions -> census -> analysis -> render -> cli

The public names below load on first use (PEP 562), so ``import headlens`` and the ``headlens`` command's
``--help`` do not pay for torch, TransformerLens and transformers until something needs them.
"""

from __future__ import annotations

import importlib
import warnings

from headlens.errors import HeadlensError

# TransformerLens imports tqdm.auto, which warns in a notebook without ipywidgets; headlens' own bars
# (headlens.progress) are plain text there, so the warning says nothing useful.
warnings.filterwarnings("ignore", message="IProgress not found")

_EXPORTS = {
    # models
    "load_model": "models",
    "model_info": "models",
    "tiny_model": "models",
    # heads and data
    "Head": "heads",
    "parse_heads": "heads",
    "random_heads": "heads",
    "Probe": "data.probes",
    "ProbeSet": "data.probes",
    "default_probes": "data.probes",
    # engine
    "Metric": "engine.intervene",
    "Site": "engine.intervene",
    "Executor": "engine.executor",
    "LocalExecutor": "engine.executor",
    "RayExecutor": "engine.executor",
    # interventions
    "ablated_metric": "interventions.ablation",
    "ablation_hooks": "interventions.ablation",
    "ablation_sweep": "interventions.ablation",
    "SweepResult": "interventions.ablation",
    "compare_to_random": "interventions.ablation",
    "RandomComparison": "interventions.ablation",
    "head_importance": "interventions.ablation",
    "logit_diff_metric": "interventions.ablation",
    "loss_metric": "interventions.ablation",
    "repeat_loss_metric": "interventions.ablation",
    "prune_curve": "interventions.prune",
    "PromptPair": "interventions.patching",
    "induction_pair": "interventions.patching",
    "text_pair": "interventions.patching",
    "activation_patching": "interventions.patching",
    "PatchingResult": "interventions.patching",
    "attribution_patching": "interventions.attribution",
    "compare_patching": "interventions.attribution",
    # census
    "run_census": "census",
    "CensusResult": "census",
    "heads_with_label": "census",
    "HeadType": "census.registry",
    "register": "census.registry",
    "distance_profile": "census.rope",
    "distance_profiles": "census.rope",
    "rope_summary": "census.rope",
    "head_similarity": "census.attention_stats",
    "scale_entropy_table": "census.attention_stats",
    # analysis
    "compare_models": "analysis.compare",
    "head_card": "analysis.cards",
    "head_cards": "analysis.cards",
    "label_evidence": "analysis.evidence",
    "task_roles": "analysis.roles",
    # render
    "attention_view": "render.viz",
    "gallery": "render.viz",
    "head_heatmaps": "render.viz",
    "score_heatmaps": "render.viz",
    "write_report": "render.report",
}

__all__ = ["HeadlensError", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'headlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"headlens.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

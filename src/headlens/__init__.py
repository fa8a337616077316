"""headlens: find out what the attention heads of Qwen models do.

The public names below load on first use (PEP 562), so ``import headlens`` and the ``headlens`` command's
``--help`` do not pay for torch, TransformerLens and transformers until something needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

from headlens.errors import HeadlensError

# TransformerLens imports tqdm.auto, which warns in a notebook without ipywidgets; headlens' own bars
# (headlens.progress) are plain text there, so the warning says nothing useful.
warnings.filterwarnings("ignore", message="IProgress not found")

_EXPORTS = {
    "load_model": "models",
    "model_info": "models",
    "tiny_model": "models",
    "census": "census",
    "Head": "heads",
    "parse_heads": "heads",
    "heads_with_label": "heads",
    "random_heads": "heads",
    "ablated_metric": "ablation",
    "ablation_hooks": "ablation",
    "ablation_sweep": "ablation",
    "compare_to_random": "ablation",
    "head_importance": "ablation",
    "logit_diff_metric": "ablation",
    "loss_metric": "ablation",
    "repeat_loss_metric": "ablation",
    "prune_curve": "prune",
    "activation_patching": "patching",
    "attribution_patching": "attribution",
    "compare_patching": "patching",
    "induction_pair": "patching",
    "text_pair": "patching",
    "compare_models": "compare",
    "distance_profile": "rope",
    "distance_profiles": "rope",
    "rope_summary": "rope",
    "head_similarity": "attention_stats",
    "scale_entropy_table": "attention_stats",
    "attention_view": "viz",
    "gallery": "viz",
    "head_heatmaps": "viz",
    "score_heatmaps": "viz",
    "write_report": "report",
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


class _Package(types.ModuleType):
    """Keeps ``headlens.census`` the function when the submodule of the same name gets imported."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and value.__name__ == f"headlens.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""headlens: find out what the attention heads of Qwen models do."""

from headlens.errors import HeadlensError
from headlens.models import load_model, model_info, tiny_model
from headlens.census import census
from headlens.ablation import (ablated_metric, ablation_hooks, ablation_sweep, compare_to_random, head_importance,
                               logit_diff_metric, loss_metric, repeat_loss_metric)
from headlens.prune import prune_curve
from headlens.patching import activation_patching, attribution_patching, compare_patching, induction_pair, text_pair
from headlens.compare import compare_models
from headlens.rope import distance_profile, distance_profiles, rope_summary
from headlens.attention_stats import head_similarity, scale_entropy_table
from headlens.viz import attention_view, gallery, head_heatmaps, score_heatmaps
from headlens.report import write_report

__all__ = [
    "HeadlensError", "load_model", "model_info", "tiny_model",
    "census",
    "ablated_metric", "ablation_hooks", "ablation_sweep", "compare_to_random", "head_importance",
    "logit_diff_metric", "loss_metric", "repeat_loss_metric", "prune_curve",
    "activation_patching", "attribution_patching", "compare_patching", "induction_pair", "text_pair",
    "compare_models", "distance_profile", "distance_profiles", "rope_summary",
    "head_similarity", "scale_entropy_table",
    "attention_view", "gallery", "head_heatmaps", "score_heatmaps", "write_report",
]

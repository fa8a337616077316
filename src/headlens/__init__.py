"""headlens: find out what the attention heads of Qwen models do."""

from headlens.errors import HeadlensError
from headlens.models import load_model, model_info, tiny_model

__all__ = ["HeadlensError", "load_model", "model_info", "tiny_model"]

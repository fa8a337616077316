import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def qwen():
    """The real offline Qwen2.5-Coder-0.5B-Instruct, loaded once per test session."""
    from headlens import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def tiny_qwen():
    from headlens import tiny_model

    return tiny_model("qwen2", seed=0)

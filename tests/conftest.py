import os
import sys

import jaxtyping
import pytest
import torch

# Runtime shape/dtype checks of every jaxtyped signature in headlens (before any headlens module is imported);
# tests/shapecheck.py checks the jaxtyping annotations only (bad choices are headlens' HeadlensErrors to raise).
sys.path.insert(0, os.path.dirname(__file__))
# The engine's modules for now; census/scores et al. reject bad shapes with their own HeadlensErrors, which a
# jaxtyping TypeCheckError would pre-empt (their bad-input tests expect those messages).
CHECKED = [
    "headlens.heads",
    "headlens.engine.intervene",
    "headlens.interventions.ablation",
    "headlens.interventions.patching",
    "headlens.interventions.prune",
]
jaxtyping.install_import_hook(CHECKED, "shapecheck.shapes_only")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def qwen():
    """The real offline Qwen2.5-Coder-0.5B-Instruct, loaded once per test session."""
    from headlens import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def qwen_census(qwen):
    """The default census table of the real Qwen at seed 0 (about 90 s), computed once per test session."""
    from headlens import run_census

    return run_census(qwen, seed=0, progress=False).table


@pytest.fixture(scope="session")
def tiny_qwen():
    from headlens import tiny_model

    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards are latency-bound: one torch thread avoids contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _progress_switch_restored():
    """A command run in-process with --no-progress turns bars off process-wide; give the next test the switch as it was."""
    from headlens import progress

    before = progress.enabled()
    yield
    if progress.enabled() != before:
        progress.set_enabled(before)

"""Every study and benchmark script still imports: what it takes from headlens exists under that name. The Qwen runs
are minutes to hours and run by hand, so without this a renamed function shows only when someone reruns one."""

from __future__ import annotations

import pytest
from scripts import ROOT, load_script

SCRIPTS = sorted(p.relative_to(ROOT) for folder in ("analyses", "benchmarks") for p in (ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=str)
def test_script_imports(path):
    load_script(path)  # top level only: every script runs its work under __main__

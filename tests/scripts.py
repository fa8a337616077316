"""Load an analyses/ or benchmarks/ script as a module: they are scripts, not part of the package, and run their work
under ``__main__``, so loading one runs only its top level (constants, imports, functions)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str | Path) -> ModuleType:
    """``path`` (e.g. ``"analyses/census_trust.py"``, relative to the repository) as a fresh module; its folder is put
    on ``sys.path`` (last, so it shadows nothing) because the analyses import their ``_harness``."""
    path = ROOT / path
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

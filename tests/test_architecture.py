"""The floors are checked, not hoped for: import-linter's contracts (pyproject.toml) hold for the package, and
break as soon as a lower floor imports a higher one or the registry imports the package."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root / "src")}
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        capture_output=True, text=True, env=env, cwd=root, timeout=120,
    )  # fmt: skip


def copy_of_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_keeps_its_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("data/probes.py", "import headlens.render.viz", "a lower floor never imports a higher one"),
        ("engine/capture.py", "from headlens.census import run_census", "a lower floor never imports a higher one"),
        ("census/registry.py", "from headlens.heads import Head", "registry imports nothing of headlens"),
    ],
)
def test_an_upward_import_breaks_the_build(tmp_path, module, line, broken):
    root = copy_of_package(tmp_path)
    target = root / "src" / "headlens" / module
    target.write_text(target.read_text() + f"\n{line}  # an upward import, added by the test\n")
    result = lint(root)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and broken in result.stdout

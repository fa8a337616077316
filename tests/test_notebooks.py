"""Execute every notebook top to bottom (offline, tiny models) and check a value each one computes.

Measured on a shared 2-core CPU: quickstart 10-14 s, induction_heads 8-14 s, ablation_pruning 17-36 s,
mostly kernel start-up and imports; each test guards against 50 s. Needs a Jupyter kernel named
``python3`` that runs this interpreter: ``pip install ipykernel`` installs its spec into the environment
(``python -m ipykernel install --sys-prefix`` if it is missing) and jupyter_client swaps the spec's
``python`` for the running interpreter.
"""

import json
import math
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str) -> tuple[dict, float, object]:
    """Run ``notebooks/<name>.ipynb`` in a fresh kernel; return the ``RESULT {...}`` it prints, the runtime and the notebook."""
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(
        book, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    elapsed = time.perf_counter() - start
    lines = [
        line
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("name") == "stdout"
        for line in out["text"].splitlines()
        if line.startswith("RESULT ")
    ]
    assert len(lines) == 1, f"{name} must print exactly one RESULT line"
    return json.loads(lines[0].removeprefix("RESULT ")), elapsed, book


def html_outputs(book) -> list[str]:
    return [
        out["data"]["text/html"]
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "text/html" in out.get("data", {})
    ]


def test_quickstart_runs_census_and_renders_offline():
    result, elapsed, book = execute("quickstart")
    assert result["n_rows"] == result["n_heads"] == 8
    assert {"layer", "head", "kv_head", "induction", "entropy", "label"} <= set(result["columns"])
    assert result["view_is_offline"]
    pages = [h for h in html_outputs(book) if "CircuitsVis.render" in h]
    assert pages and all("unpkg.com" not in h and "cdn.jsdelivr" not in h for h in pages)
    assert elapsed < 50


def test_induction_notebook_finds_the_induction_circuit():
    result, elapsed, _ = execute("induction_heads")
    assert result["loss_repeated_half"] < 0.6 * result["loss_first_half"]
    assert result["top_induction_label"] == "induction" and result["top_induction_score"] > 0.3
    assert result["previous_token_partner"][0] < result["top_induction_head"][0]
    assert result["previous_token_score"] > 0.3
    assert elapsed < 50


def test_ablation_notebook_ranks_the_induction_circuit_first():
    result, elapsed, _ = execute("ablation_pruning")
    assert sorted(result["top_two"]) == sorted([result["induction_head"], result["previous_head"]])
    assert result["top_worsening"] > 0.5 and result["p_random_ge"] == 0
    assert math.isfinite(result["rank_corr"]) and result["rank_corr"] > 0
    assert 0 <= result["max_removed"] < result["n_heads"] == 8
    assert sorted(result["ablation_last_two"]) == sorted([result["induction_head"], result["previous_head"]])
    assert elapsed < 50

"""Execute every notebook top to bottom (offline, the shipped toy model) and check what it computed.

The notebooks carry no test plumbing: after a notebook has run, the test appends one inspection cell to the
in-memory copy (never to the file), reads the notebook's own variables from its output, and checks the
notebook's displayed outputs. Needs a Jupyter kernel named ``python3`` that runs this interpreter
(``pip install ipykernel``; jupyter_client swaps the spec's ``python`` for the running interpreter).
Measured on the shared 2-core CPU: 18-30 s per notebook, mostly kernel start-up and imports.
"""

import json
import math
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SRC = str(Path(__file__).resolve().parents[1] / "src")
MAX_SECONDS = 90


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch):
    """Kernels import this checkout's headlens and use one thread (the test machine's cores are shared)."""
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def execute(name: str, inspect: str) -> tuple[dict, float, object]:
    """Run ``notebooks/<name>.ipynb``; return the JSON of the expression ``inspect`` evaluated in its kernel
    afterwards, the runtime, and the executed notebook (without the inspection cell)."""
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    n_cells = len(book.cells)
    book.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint(_json.dumps({inspect}, default=str))"))
    start = time.perf_counter()
    nbclient.NotebookClient(
        book, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    elapsed = time.perf_counter() - start
    probe = book.cells.pop()
    assert len(book.cells) == n_cells
    values = json.loads("".join(o["text"] for o in probe.outputs if o.get("name") == "stdout"))
    return values, elapsed, book


def outputs(book, kind: str) -> list[str]:
    return [
        out["data"][kind] if "data" in out else out.get("text", "")
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if kind in out.get("data", {}) or (kind == "stderr" and out.get("name") == "stderr")
    ]


def check_clean(book, elapsed):
    """No warnings or tracebacks in any cell, the CircuitsVis bundle at most once, no CDN, in time."""
    stderr = "\n".join(outputs(book, "stderr"))
    assert "Warning" not in stderr and "Traceback" not in stderr, stderr
    pages = outputs(book, "text/html")
    assert sum(page.count("var CircuitsVis=") for page in pages) <= 1
    assert all("unpkg.com" not in page and "cdn.jsdelivr" not in page for page in pages)
    assert all("RESULT" not in "".join(cell.source) for cell in book.cells)
    assert elapsed < MAX_SECONDS


def test_quickstart_loads_census_renders_picks_a_head_and_shows_evidence():
    values, elapsed, book = execute(
        "quickstart",
        "dict(rows=len(table), heads=model.cfg.n_layers * model.cfg.n_heads, labels=sorted(set(table.label)), "
        "n_views=len(views), picked=list(picked), label=best.label, worsening=vs_random.target_worsening, "
        "random_mean=vs_random.random_mean, p=vs_random.p_random_ge, top_sweep=sweep.sort_values('worsening').iloc[-1][['layer', 'head']].tolist(), "
        "p_any=compare_to_random(model, metric, [picked], n_random=6, method='mean', progress=False).p_random_ge)",
    )
    assert values["rows"] == values["heads"] == 8
    assert {"induction", "previous_token"} <= set(values["labels"])
    assert values["n_views"] >= 2  # the headline gallery is not empty: this model has real heads
    assert values["label"] == "induction" and values["picked"][0] == 1
    assert values["worsening"] > values["random_mean"] and values["p"] == 0  # none of its 3 layer-mates as bad
    # Exercise 3's answer: against any layer, 1 of 6 is worse, the previous-token head the sweep ranks first
    assert values["p_any"] == pytest.approx(1 / 6) and values["top_sweep"] == [0, 2]
    check_clean(book, elapsed)
    pages = [p for p in outputs(book, "text/html") if "CircuitsVis.render" in p]
    assert len(pages) == 2 and sum("var CircuitsVis=" in p for p in pages) == 1  # gallery + picked head, one bundle
    assert "L1H2" in pages[0] or "L1H0" in pages[0]


def test_induction_notebook_finds_the_induction_circuit():
    values, elapsed, book = execute(
        "induction_heads",
        "dict(first=stats['loss_first_half'], repeated=stats['loss_repeated_half'], top=[int(top.layer), int(top['head'])], "
        "label=top.label, score=float(top.induction), prev=[int(prev.layer), int(prev['head'])], prev_score=float(prev.previous_token))",
    )
    assert values["repeated"] < 0.6 * values["first"]
    assert values["label"] == "induction" and values["score"] > 0.3
    assert values["prev"][0] < values["top"][0] and values["prev_score"] > 0.3
    check_clean(book, elapsed)


def test_ablation_notebook_ranks_the_induction_circuit_first():
    values, elapsed, book = execute(
        "ablation_pruning",
        "dict(top_two=[list(x) for x in top_two], induction=list(induction_head), previous=list(previous_head), "
        "top_worsening=float(top.worsening), p=float(vs_random.p_random_ge), rank_corr=float(rank_corr), "
        "max_removed=int(curves['ablation'].max_removed), n_heads=int(curves['ablation'].n_heads), "
        "last_two=[[int(r.layer), int(r.head)] for r in curves['ablation'].last_heads(2).itertuples()])",
    )
    assert sorted(values["top_two"]) == sorted([values["induction"], values["previous"]])
    assert values["top_worsening"] > 0.5 and values["p"] == 0
    assert math.isfinite(values["rank_corr"]) and values["rank_corr"] > 0
    assert 0 <= values["max_removed"] < values["n_heads"] == 8
    assert sorted(values["last_two"]) == sorted([values["induction"], values["previous"]])
    check_clean(book, elapsed)


def test_patching_notebook_recovers_the_clean_run_through_the_circuit():
    values, elapsed, book = execute(
        "patching",
        "dict(clean=result.clean, corrupted=result.corrupted, "
        "top=table.sort_values('effect').iloc[-1][['layer', 'head', 'label']].tolist(), "
        "corr=float(rank_correlation(table['effect'], table['effect_attribution'])), n=len(table), by_pos=len(by_pos), "
        "largest=table.loc[table['effect'].abs().idxmax(), ['layer', 'head']].tolist(), "
        "atp_top4=table.loc[table['effect_attribution'].abs().nlargest(4).index, ['layer', 'head']].values.tolist(), "
        "checked=checked[['layer', 'head']].values.tolist(), "
        "checked_exact=bool((checked.set_index(['layer', 'head'])['effect'] - table.set_index(['layer', 'head'])['effect']).dropna().abs().max() < 1e-5))",
    )
    assert values["clean"] > values["corrupted"] + 1  # the corruption breaks in-context copying
    assert values["top"][2] in ("induction", "previous_token")  # the head that restores most is a circuit head
    assert values["corr"] > 0.5 and values["n"] == 8 and values["by_pos"] == 8 * 32
    # the IG screen picks the head of largest |effect| that AtP* ranks outside its top 4; the check is exact
    assert values["largest"] not in values["atp_top4"] and values["largest"] in values["checked"]
    assert values["checked_exact"]
    check_clean(book, elapsed)


def test_base_vs_lora_notebook_changes_only_the_adapted_layer():
    values, elapsed, book = execute(
        "base_vs_lora",
        "dict(gap=gap, loss=loss.item(), jsd0=float(df.query('layer == 0').jsd.max()), jsd1=float(df.query('layer == 1').jsd.max()), "
        "dq0=float(df.query('layer == 0').dW_Q.max()), dq1=float(df.query('layer == 1').dW_Q.min()), dv=float(df.dW_V.max()), "
        "changed=int(df.label_changed.sum()))",
    )
    assert values["gap"] < 1e-3  # the merged weights reproduce the hooked adapter
    assert values["loss"] < 4.0  # the adapter learned something (chance: 4.16)
    assert values["jsd0"] == 0 and values["dq0"] == 0 and values["dv"] == 0  # untouched layer and matrices
    assert values["jsd1"] > 0.05 and values["dq1"] > 0 and values["changed"] >= 1
    check_clean(book, elapsed)


@pytest.mark.slow
def test_head_cards_qwen_notebook_shows_a_card_a_verdict_and_a_task_role():
    values, elapsed, book = execute(
        "head_cards_qwen",
        "dict(n=len(table), card=cards.head_card(model, table, layer, head), label=example.label, column=example.column, "
        "score=float(example.score), lo=float(example.lo), hi=float(example.hi), raw=float(example.raw), "
        "threshold=float(example.threshold), verdict=evidence.verdict('induction'), n_roles=len(roles), "
        "mover=cards.head_card(model, table, int(mover.layer), int(mover['head']), roles=roles), "
        "mover_patching=float(mover.patching), max_patching=float(roles.patching.abs().max()))",
    )
    assert values["n"] == values["n_roles"] == 24 * 14
    # a head labelled by its sink-corrected score: the card names that score, inside its interval, over the threshold
    assert values["column"].endswith("_nosink") and values["raw"] < values["score"]
    assert values["lo"] <= values["score"] <= values["hi"] and values["score"] >= values["threshold"]
    assert (
        f"{values['label']} head, confidence" in values["card"]
        and f"sink-corrected {values['label']}" in values["card"]
    )
    assert f"score {values['score']:.3f} [{values['lo']:.3f}, {values['hi']:.3f}]" in values["card"]
    assert values["verdict"] in ("supported", "no evidence")
    # the head that restores most of the user's answer, with its role in the card
    assert abs(values["mover_patching"]) == values["max_patching"] > 0.05
    assert (
        "On the task (text: logit diff" in values["mover"] and "clean-corrupted gap, rank 1 of 336" in values["mover"]
    )
    stderr = "\n".join(outputs(book, "stderr"))
    assert "Warning" not in stderr and "Traceback" not in stderr, stderr
    assert elapsed < 240


def test_circuits_notebook_finds_the_previous_token_to_induction_key_edge():
    values, elapsed, book = execute(
        "circuits",
        "dict(prev=prev, ind=ind, comp=[comp_top.sender, comp_top.composition, float(comp_top.z)], "
        "pp=pp.table.set_index('input')['delta'].to_dict(), top=top_edges, methods=sorted(summary.method), "
        "n_circuit=int(result.info['circuit_edges']), edges=len(result.edges))",
    )
    assert (values["prev"], values["ind"]) == ("L0H2", "L1H2")
    assert values["comp"][:2] == ["L0H2", "k"] and values["comp"][2] > 3
    assert values["pp"]["k"] < -1 and abs(values["pp"]["k"]) > 10 * max(abs(values["pp"]["q"]), abs(values["pp"]["v"]))
    assert all(tuple(v) == ("L0H2", "k") for v in values["top"].values()) and len(values["top"]) == 3
    assert values["methods"] == ["eap", "eap-ig", "exact"] and values["edges"] == 81 and 0 < values["n_circuit"] <= 81
    check_clean(book, elapsed)
    pages = [p for p in outputs(book, "text/html") if "CircuitsVis.render" in p]
    assert len(pages) == 1 and "<svg" in pages[0] and "L0H2 → L1H2 [k]" in pages[0]

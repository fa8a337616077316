"""Issue 28: every advertised option runs. Every command that loads a model, in each ``--dtype`` (float32, bfloat16,
float16) with ``--device cpu``, on the tiny models, runs to completion through the real command
(``headlens.cli.main`` in this process) and writes its outputs; the commands that take ``--workers`` run once more
on 2 Ray workers. Small sizes where a command has them, so the whole matrix stays in the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from headlens import cli

DTYPES = ("float32", "bfloat16", "float16")
SMALL = {
    "metric": ("--n-seqs", "1", "--seq-len", "16"),
    "pair": ("--n-tokens", "3", "--n-seqs", "1"),
}
# command -> (arguments after the common ones, files it must write into --out)
MATRIX = {
    "info": (("-m", "tiny-llama", "--json"), ()),
    "census": (("-m", "tiny-qwen2", "--batch-size", "64"), ("census.csv", "census.parquet", "report.html")),
    "report": (("-m", "tiny-qwen2", "--with", "ablation,patching,rope"), ("report.html", "figures")),
    "patch": (("-m", "tiny-llama", *SMALL["pair"]), ("attribution.csv", "patch_z.csv")),
    "ablate": (("-m", "tiny-qwen2", *SMALL["metric"]), ("ablation.csv", "ablation.png")),
    "prune": (("-m", "tiny-llama", "--steps", "2", *SMALL["metric"]), ("prune_curve.csv", "prune_order.csv")),
    "compare": (("--base", "tiny-qwen2", "--tuned", "ADAPTER"), ("compare.csv", "compare.png")),
    "stats": (("-m", "tiny-llama", *SMALL["metric"]), ("entropy.csv", "similarity.csv")),
    "atlas": (("--models", "tiny-llama", "--seeds", "1", "--batch-size", "64"), ("atlas.html", "counts.csv")),
    "head": (
        ("L1H0", "-m", "tiny-qwen2", "--no-causal"),
        (),
    ),  # prints; it writes census.csv only when no saved census is found
    "circuit": (
        ("--task", "induction", "-m", "tiny-llama", "--n-seqs", "1", "--check", "2"),
        ("edges.csv", "circuit.html"),
    ),
}
WORKERS = ("census", "ablate", "patch", "atlas", "circuit")


def test_the_matrix_covers_every_command_that_loads_a_model():
    commands = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    assert set(MATRIX) == commands  # every command loads a model; a new one must join the matrix


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from test_hostile import lora_adapter

    return lora_adapter(tmp_path_factory.mktemp("lora") / "ad", scale=0.5)


def run(args, capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the command."""
    capsys.readouterr()
    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_outputs(command: str, out: Path) -> None:
    for name in MATRIX[command][1]:
        path = out / name
        assert path.exists() and (path.is_dir() or path.stat().st_size > 0), f"{command}: no {path}"
    for table in out.glob("*.csv"):
        frame = pd.read_csv(table)
        assert len(frame) or table.name not in MATRIX[command][1], table  # causal.csv: no label to test on a tiny model
        nan = frame.select_dtypes("number").isna()
        if "n_heads" in frame:  # atlas positions.csv: a label no head carries has no depth
            nan.loc[frame["n_heads"] == 0] = False
        # a head labelled `other` has no label score: NaN there by design (compare.csv: in either model)
        for labels, prefix in ((["label"], "label_score"), (["label_base", "label_tuned"], "d_label_score")):
            if set(labels) <= set(frame):
                other = (frame[labels] == "other").any(axis=1)
                nan.loc[other, [c for c in nan if c.startswith(prefix)]] = False
        # undefined on a tiny random model in every dtype (float32 too): not what this matrix looks for
        nan = nan.drop(columns=[c for c in nan if c.removeprefix("d_").startswith("attention_to_predicted")])
        assert not nan.all().any(), f"{table}: a column of NaN"


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_command_runs_in_every_dtype(dtype, tmp_path, capsys, adapter, one_thread):
    """All commands in one dtype; `report` runs in the census' folder, so it reuses that census (its own path)."""
    for command, (args, _) in MATRIX.items():
        out = tmp_path / ("census" if command == "report" else command)
        argv = [command, *[adapter if a == "ADAPTER" else a for a in args], "--dtype", dtype, "--device", "cpu"]
        argv += ["--no-progress"] + (["-o", out] if command != "info" else [])
        code, stdout, text = run(argv, capsys)
        assert code == 0, f"headlens {' '.join(map(str, argv))}\n{text[-3000:]}"
        if command == "info":
            assert json.loads(stdout)["n_layers"] == 2
        else:
            check_outputs(command, out)
        if command == "report":
            assert "reusing" in text, text[-2000:]
    if dtype != "float32":  # the weights digest of the methods section, the line of issue 28's traceback
        page = (tmp_path / "census" / "report.html").read_text(encoding="utf-8")
        assert f"{dtype} on cpu" in page


def test_commands_that_take_workers_run_on_two(tmp_path):
    """`--workers 2`, the commands one after another in a fresh process (Ray actors import headlens as users do, without
    this test session's jaxtyping import hook)."""
    pytest.importorskip("ray")
    src = Path(__file__).resolve().parents[1] / "src"
    script = (
        "import sys; from headlens import cli\n"
        "for argv in [a.split('\\x1f') for a in sys.argv[1:]]:\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as e:\n"
        "        if e.code: raise\n"
    )
    argvs = []
    for command in WORKERS:
        args = MATRIX[command][0] if command != "atlas" else ("--models", "tiny-llama", "--seeds", "2")
        dtype = "bfloat16" if command == "census" else "float32"
        argvs.append(
            [command, *args, "--dtype", dtype, "--workers", "2", "-o", str(tmp_path / command), "--no-progress"]
        )
    result = subprocess.run(
        [sys.executable, "-c", script, *["\x1f".join(a) for a in argvs]],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for command in WORKERS:
        check_outputs(command, tmp_path / command)

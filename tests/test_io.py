"""Atomic writers and provenance sidecars (headlens.io)."""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from headlens import io
from headlens.errors import HeadlensError


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.csv"
    io.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_writers_produce_whole_files(tmp_path):
    df = pd.DataFrame({"layer": [0, 1], "head": [1, 0], "score": [0.5, 0.25]})
    io.write_csv(df, tmp_path / "t.csv")
    io.write_parquet(df, tmp_path / "t.parquet")
    io.write_json(tmp_path / "t.json", {"a": 1})
    fig = plt.figure()
    io.save_figure(fig, tmp_path / "t.png", dpi=20)
    plt.close(fig)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), df)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), df)
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
    assert oct((tmp_path / "t.csv").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "report.html"
    dead = tmp_path / ".report.html.tmp-999999999-abc.html"
    dead.write_text("<html>half")
    alive = tmp_path / f".report.html.tmp-{os.getppid()}-abc.html"
    alive.write_text("<html>in progress")
    io.write_text(target, "<html></html>")
    assert not dead.exists() and alive.exists()


def test_provenance_matches_only_the_same_model_and_settings(tmp_path):
    from headlens import tiny_model

    a, b = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    path = tmp_path / "census.csv"
    io.write_csv(pd.DataFrame({"x": [1]}), path, provenance=io.provenance(a, seed=0))
    assert io.sidecar(path).name == "census.csv.provenance.json"  # census.parquet has its own
    assert io.matches(path, io.provenance(a, seed=0))
    assert "weights" in io.mismatch(path, io.provenance(b, seed=0))
    assert "settings" in io.mismatch(path, io.provenance(a, seed=1))
    path.write_text("x\n1\n2\n")  # edited by hand after it was written
    assert "changed" in io.mismatch(path, io.provenance(a, seed=0))
    io.write_csv(pd.DataFrame({"x": [1]}), path, provenance=io.provenance(a, seed=0))
    path.write_text(path.read_text().replace("1", "2"))  # the same size: the content digest tells
    assert "changed" in io.mismatch(path, io.provenance(a, seed=0))
    io.sidecar(path).unlink()
    assert "no provenance" in io.mismatch(path, io.provenance(a, seed=0))


def test_check_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(HeadlensError, match="is a file"):
        io.check_output_dir(tmp_path / "file")
    with pytest.raises(HeadlensError, match="is a file"):
        io.check_output_dir(tmp_path / "file" / "sub")
    assert io.check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"


def test_once_per_weights_recomputes_after_an_in_place_edit_and_for_another_model():
    """Weights-only census scores are computed once per model state: asked twice, once; after an in-place edit of
    a weight (what ablation studies do) or for another model, again."""
    import torch

    calls = []

    @io.once_per_weights
    def total(model):
        calls.append(1)
        return sum(float(p.detach().sum()) for p in model.parameters())

    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    first = total(a)
    assert total(a) == first and len(calls) == 1
    with torch.no_grad():
        a.weight.add_(1.0)
    assert total(a) == pytest.approx(first + 6.0) and len(calls) == 2
    total(b)
    assert len(calls) == 3


def test_an_edited_config_is_another_model_for_reuse(tmp_path):
    """The same weights under another config (a rope base edited in config.json) compute other numbers: the
    provenance's config digest tells them apart, so a census of one is not reused for the other; hook switches and
    the device are not part of it."""
    from headlens import tiny_model
    from headlens.io import mismatch, provenance, write_csv

    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    path = write_csv(pd.DataFrame({"x": [1]}), tmp_path / "census.csv", provenance=provenance(a))
    b.cfg.use_attn_result = True
    assert mismatch(path, provenance(b)) is None
    b.cfg.rotary_base = 5000.0
    why = mismatch(path, provenance(b))
    assert why is not None and "config" in why and provenance(b)["weights"] == provenance(a)["weights"]


def test_output_set_removes_only_what_its_writer_wrote_before(tmp_path):
    """A writer's second run removes the files its first run listed and it did not write again (with a table's
    provenance sidecar); the user's files, another writer's and anything outside the folder stay; a failed run
    changes nothing."""
    df = pd.DataFrame({"a": [1]})
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with io.output_set(out, "atlas") as written:
        written += [io.write_csv(df, out / "census_a.csv", provenance={"x": 1}), io.write_csv(df, out / "census_b.csv")]
    with io.output_set(out, "report") as written:
        written.append(io.write_text(out / "report.html", "<p>"))
    manifest = json.loads((out / "atlas_files.json").read_text())
    assert manifest == {"writer": "atlas", "files": ["census_a.csv", "census_b.csv"]}
    manifest["files"] += ["../outside.txt", str(outside), "report.html"]  # a tampered list reaches nothing else
    (out / "atlas_files.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError), io.output_set(out, "atlas") as written:
        written.append(io.write_csv(df, out / "census_b.csv"))
        raise RuntimeError("the run failed")
    assert (out / "census_a.csv").is_file()
    with io.output_set(out, "atlas") as written:
        written.append(io.write_csv(df, out / "census_b.csv"))
    assert not (out / "census_a.csv").exists() and not io.sidecar(out / "census_a.csv").exists()
    assert {p.name for p in out.iterdir()} == {
        "census_b.csv",
        "notes.txt",
        "report.html",
        "atlas_files.json",
        "report_files.json",
    }
    assert outside.read_text() == "mine"

"""Executors without Ray (local path, per-shard checkpoints, resume), device/dtype checks, and bf16 vs fp32 census tolerance."""

import sys

import pandas as pd
import pytest
import torch

import headlens
from headlens.census.run import SCORES
from headlens.data.probes import default_probes
from headlens.engine import executor as X
from headlens.models import resolve_device, resolve_dtype

BF16_TOLERANCE = 0.02
"""Documented in README "Scaling": bf16 census scores stay within this of fp32 (measured max on Qwen: see analyses/results/precision)."""


@pytest.fixture(scope="module")
def tiny(one_thread):
    return headlens.tiny_model("qwen2")


def test_device_and_dtype_are_checked_before_loading():
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(headlens.HeadlensError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(headlens.HeadlensError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(headlens.HeadlensError, match="unknown device"):
        resolve_device("cpu:1")
    if not torch.cuda.is_available():
        with pytest.raises(headlens.HeadlensError, match="CUDA is not available"):
            headlens.load_model("tiny-qwen2", device="cuda")
    else:
        with pytest.raises(headlens.HeadlensError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_device("CPU") == "cpu"


def test_bf16_census_is_within_tolerance_of_fp32(tiny):
    bf16 = headlens.load_model("tiny-qwen2", dtype="bfloat16")
    assert bf16.cfg.dtype == torch.bfloat16 and next(bf16.parameters()).dtype == torch.bfloat16
    assert bf16.headlens_spec.build().cfg.dtype == torch.bfloat16  # the recipe Ray workers use keeps the dtype
    a = headlens.run_census(tiny, progress=False).table
    b = headlens.run_census(bf16, progress=False).table
    for score in SCORES:
        assert b[score].dtype == "float64"
        assert (a[score] - b[score]).abs().max() <= BF16_TOLERANCE, score
    assert not a[list(SCORES)].equals(b[list(SCORES)])  # bf16 really ran in bf16


def test_local_executor_equals_the_default_path(tiny):
    a = headlens.run_census(tiny, batch_size=3, progress=False).table
    ex = X.LocalExecutor()
    b = headlens.run_census(tiny, batch_size=3, progress=False, executor=ex).table
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    sizes = [p.n_seqs for p in default_probes(tiny)]  # every registered probe kind (head types add their own)
    assert ex.computed == sum(-(-n // 3) for n in sizes)  # each probe in batches of 3 sequences


class _Interrupted(X.LocalExecutor):
    """Stops (like Ctrl-C) after ``after`` shards."""

    def __init__(self, checkpoint, after):
        super().__init__(checkpoint)
        self.after = after

    def _run(self, fn, model, shards, todo):
        for n, item in enumerate(super()._run(fn, model, shards, todo)):
            if n == self.after:
                raise KeyboardInterrupt
            yield item


def test_interrupted_run_resumes_from_finished_shards(tiny, tmp_path):
    full = headlens.run_census(tiny, batch_size=1, progress=False).table
    with pytest.raises(KeyboardInterrupt):
        headlens.run_census(tiny, batch_size=1, progress=False, executor=_Interrupted(tmp_path, after=5))
    (job,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(list(job.glob("shard-*.safetensors"))) == 5 and not list(job.glob("*.partial"))
    resumed = X.LocalExecutor(tmp_path)
    table = headlens.run_census(tiny, batch_size=1, progress=False, executor=resumed).table
    n_seqs = sum(p.n_seqs for p in default_probes(tiny))
    assert resumed.computed == n_seqs - 5
    pd.testing.assert_frame_equal(full, table, check_exact=True)
    other = X.LocalExecutor(tmp_path)  # another job (seed) never reuses these shards
    headlens.run_census(tiny, batch_size=1, seed=1, progress=False, executor=other)
    assert other.computed == n_seqs and len([d for d in tmp_path.iterdir() if d.is_dir()]) == 2


def test_shards_are_reused_by_content_not_by_name(tiny, tmp_path):
    """A shard file edited on disk is recomputed; a model whose weights changed (same recipe) is another job."""
    import copy

    full = headlens.run_census(tiny, batch_size=1, progress=False, executor=X.LocalExecutor(tmp_path)).table
    (job,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    shard = sorted(job.glob("shard-00003.*"))[0]
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # one byte of a stored score, the file's size unchanged
    shard.write_bytes(bytes(data))
    again = X.LocalExecutor(tmp_path)
    pd.testing.assert_frame_equal(full, headlens.run_census(tiny, batch_size=1, progress=False, executor=again).table)
    assert again.computed == 1
    edited = copy.deepcopy(tiny)
    with torch.no_grad():
        edited.blocks[0].attn.W_Q[0, 0, 0] += 1.0  # same recipe (headlens_spec), other weights
    assert edited.headlens_spec == tiny.headlens_spec
    changed = X.LocalExecutor(tmp_path)
    headlens.run_census(edited, batch_size=1, progress=False, executor=changed)
    assert changed.computed == sum(p.n_seqs for p in default_probes(tiny))


def test_a_changed_metric_or_head_type_is_another_job(tiny, tmp_path):
    """Shards of an interrupted run are not reused once the user's metric reads another logit (same bytecode, other
    constant) or a registered head type's score changed under the same name (bound in the shard function, not the shards).
    A census with one type more than the built-ins gets a checkpoint folder (its name listed every type: > 255 bytes)."""
    from headlens.census.registry import HeadType, register, unregister
    from headlens.interventions.ablation import ablation_sweep, custom_metric

    assert X.fingerprint(lambda x: x[..., 5]) != X.fingerprint(lambda x: x[..., 7])
    assert X.fingerprint(lambda x: x.mean()) != X.fingerprint(lambda x: x.max())
    tokens = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    first = custom_metric(tokens, lambda logits, t: logits[:, -1, 5].mean())
    with pytest.raises(KeyboardInterrupt):
        ablation_sweep(tiny, first, progress=False, executor=_Interrupted(tmp_path / "sweep", after=1))
    second = custom_metric(tokens, lambda logits, t: logits[:, -1, 7].mean())
    resumed = X.LocalExecutor(tmp_path / "sweep")
    table = ablation_sweep(tiny, second, progress=False, executor=resumed).table
    assert resumed.computed == tiny.cfg.n_layers
    pd.testing.assert_frame_equal(table, ablation_sweep(tiny, second, progress=False).table, check_exact=True)

    try:
        register(HeadType("late", "natural", lambda p, probe, rows: p[..., -1, 0], 0.9, 9, "x", label=False))
        with pytest.raises(KeyboardInterrupt):
            headlens.run_census(tiny, batch_size=4, progress=False, executor=_Interrupted(tmp_path / "c", after=2))
        register(
            HeadType("late", "natural", lambda p, probe, rows: p[..., -1, 1], 0.9, 9, "x", label=False), replace=True
        )
        resumed = X.LocalExecutor(tmp_path / "c")
        table = headlens.run_census(tiny, batch_size=4, progress=False, executor=resumed).table
        assert resumed.computed == sum(-(-p.n_seqs // 4) for p in default_probes(tiny))
        pd.testing.assert_frame_equal(table, headlens.run_census(tiny, batch_size=4, progress=False).table)
    finally:
        unregister("late")


def test_sharded_sweep_and_patching_equal_the_plain_functions(tiny):
    from headlens.interventions.ablation import ablation_sweep, repeat_loss_metric
    from headlens.interventions.patching import activation_patching, induction_pair

    metric = repeat_loss_metric(tiny, n_seqs=3, half_len=8)
    for method in ("zero", "mean"):
        plain = ablation_sweep(tiny, metric, method=method, progress=False)
        sharded = ablation_sweep(tiny, metric, method=method, progress=False, executor=X.LocalExecutor())
        pd.testing.assert_frame_equal(plain.table, sharded.table, check_exact=True)
        assert (plain.metric, plain.method, plain.unit, plain.clean) == (
            sharded.metric,
            sharded.method,
            sharded.unit,
            sharded.clean,
        )
    pair = induction_pair(tiny, n_tokens=5, n_seqs=2)
    plain = activation_patching(tiny, pair, activation="v", progress=False)
    sharded = activation_patching(tiny, pair, activation="v", progress=False, executor=X.LocalExecutor())
    pd.testing.assert_frame_equal(plain.table, sharded.table, check_exact=True)
    assert (plain.clean, plain.corrupted) == (sharded.clean, sharded.corrupted)
    heads = ["L0H1", "L1H2"]  # chosen heads reach the shards, also as a one-pass iterator
    plain = activation_patching(tiny, pair, heads=heads, progress=False)
    sharded = activation_patching(tiny, pair, heads=iter(heads), progress=False, executor=X.LocalExecutor())
    pd.testing.assert_frame_equal(plain.table, sharded.table, check_exact=True)


def test_hand_built_models_have_no_recipe_for_workers(tiny):
    from transformer_lens import HookedTransformer

    with pytest.raises(headlens.HeadlensError, match="no loading recipe"):
        X.spec_of(HookedTransformer(tiny.cfg))
    from headlens.analysis.toy import load_induction_model

    assert X.spec_of(load_induction_model()).loader == "headlens.analysis.toy:load_induction_model"


def test_clear_errors_when_ray_is_missing_or_unreachable(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(headlens.HeadlensError, match=r"Ray is not installed: pip install 'headlens\[ray\]'"):
        X.RayExecutor(2)
    monkeypatch.undo()
    with pytest.raises(headlens.HeadlensError, match="unreachable"):
        X._check_reachable("127.0.0.1:1", timeout=1)
    with pytest.raises(headlens.HeadlensError, match="bad Ray address"):
        X._check_reachable("nowhere")


class _NoShards(X.LocalExecutor):
    """Fails the test if any shard is handed out: bad input must be refused before the executor runs."""

    def map(self, *args, **kwargs):
        raise AssertionError("a shard ran before the arguments were checked")


def test_executor_paths_check_arguments_before_any_shard(tiny):
    """The executor paths refuse what the in-process paths refuse, before a shard (on Ray: before workers load)."""
    from headlens.interventions.ablation import ablation_sweep, repeat_loss_metric
    from headlens.interventions.patching import activation_patching, induction_pair

    metric = repeat_loss_metric(tiny, n_seqs=2, half_len=4)
    pair = induction_pair(tiny, n_tokens=4, n_seqs=2)
    bad = pair.clean.clone()
    bad[0, 1] = -1
    cases = [
        (lambda ex: activation_patching(tiny, pair, layers=[0], heads=["L1H0"], executor=ex), "layers or heads"),
        (lambda ex: activation_patching(tiny, metric, executor=ex), "needs a PromptPair"),
        (lambda ex: activation_patching(tiny, pair, activation="zz", executor=ex), "unknown activation"),
        (lambda ex: activation_patching(tiny, pair, runs_per_pass=0, executor=ex), "runs_per_pass"),
        (lambda ex: activation_patching(tiny, type(pair)(bad, pair.corrupted, pair.positions, pair.metric), executor=ex),
         "token id -1"),
        (lambda ex: ablation_sweep(tiny, metric, batch_size=0, executor=ex), "batch_size"),
        (lambda ex: ablation_sweep(tiny, metric, method="nope", executor=ex), "unknown ablation method"),
        (lambda ex: ablation_sweep(tiny, metric, method="resample", reference=metric.tokens[:1], executor=ex),
         "at least 2 sequences"),
        (lambda ex: ablation_sweep(tiny, metric, seed=-1, executor=ex), "seed"),
        (lambda ex: ablation_sweep(tiny, metric, strategy="x", executor=ex), "strategy"),
        (lambda ex: ablation_sweep(tiny, metric, unit="x", executor=ex), "unit"),
        (lambda ex: ablation_sweep(tiny, metric.fn, executor=ex), "needs tokens"),
    ]  # fmt: skip
    for call, words in cases:
        for ex in (None, _NoShards()):  # the same error in process and on an executor
            with pytest.raises(headlens.HeadlensError, match=words):
                call(ex)


def _fake_ray(cpus: float, address: str = "127.0.0.1:6379"):
    context = type("C", (), {"gcs_address": address})()
    return type(
        "R",
        (),
        {
            "is_initialized": staticmethod(lambda: True),
            "cluster_resources": staticmethod(lambda: {"CPU": cpus}),
            "get_runtime_context": staticmethod(lambda: context),
        },
    )


def test_ray_workers_fit_a_cluster_this_process_did_not_size(monkeypatch, capsys):
    """A Ray the user initialised with fewer CPUs than workers would never place the extra actors (the run hung):
    workers are capped at its CPUs, with a note; an address other than the connected cluster is refused."""
    monkeypatch.setattr(X.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(X, "_import_ray", lambda: _fake_ray(1.0))
    assert X.RayExecutor(2).workers == 1
    assert "capped at 1: the Ray cluster has 1 CPUs" in capsys.readouterr().err
    with pytest.raises(headlens.HeadlensError, match="fewer than the 2 each worker takes"):
        X.RayExecutor(2, threads=2)
    with pytest.raises(headlens.HeadlensError, match="already initialised .* 10.0.0.9:6379 would be ignored"):
        X.RayExecutor(1, address="10.0.0.9:6379")
    assert X.RayExecutor(1, address="127.0.0.1:6379").workers == 1
    monkeypatch.setattr(X, "_import_ray", lambda: _fake_ray(4.0))
    assert X.RayExecutor(2, address="auto").workers == 2


def test_precision_page_quotes_the_committed_bf16_study():
    """docs/performance.md's bf16-vs-fp32 figures are analyses/results/precision/precision.json's (every score column of
    today's census, positional_offset excluded: an offset, not a score); the tiny bf16 census above is its regeneration
    at small scale, analyses/precision.py the full one."""
    import json
    from pathlib import Path

    from docs_numbers import doc_text

    from headlens.census.run import score_columns

    root = Path(__file__).parents[1]
    result = json.loads((root / "analyses/results/precision/precision.json").read_text())["per_dtype"]["bfloat16"]
    scores = result["scores"]
    assert set(scores) == {c for c in score_columns() if not c.endswith("_offset")} - {"attention_to_predicted"}
    means = [s["mean_abs"] for s in scores.values()]
    p99, worst = max((s["p99_abs"], name) for name, s in scores.items())
    changes = result["label_changes"]
    text = doc_text("performance")
    assert (
        f"mean |Δ| per score {min(means):.4f}–{max(means):.4f}, 99th percentile ≤ {p99:.3f} ({worst}), "
        f"max {result['max_abs_any_score']:.2f}" in text
    )
    assert (
        f"previous-token {scores['previous_token']['max_abs']:.3f}, induction {scores['induction']['max_abs']:.3f}"
        in text
    )
    assert f"labels agree for {100 * result['label_agreement']:.1f} % of the 336 heads ({len(changes)} change: " in text
    for c in changes:
        assert f"{c['head']} {c['fp32']} → {c['bfloat16']}" in text, c

"""Census, ablation sweeps and exact patching on real Ray actors (a local Ray with 2 CPUs) equal the single-process results."""

import os
import signal
import sys
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

import headlens  # noqa: E402
from headlens.engine import executor as X  # noqa: E402
from headlens.interventions.ablation import ablation_sweep, repeat_loss_metric  # noqa: E402
from headlens.interventions.patching import activation_patching, induction_pair  # noqa: E402


@pytest.fixture(scope="module")
def ray_executor():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ex = X.RayExecutor(2)
    yield ex
    ex.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(one_thread):
    return headlens.tiny_model("qwen2", n_layers=3)


def test_census_on_ray_equals_single_process(ray_executor, tiny):
    local = headlens.run_census(tiny, batch_size=1, progress=False).table
    remote = headlens.run_census(tiny, batch_size=1, progress=False, executor=ray_executor).table
    pd.testing.assert_frame_equal(local, remote, check_exact=True)
    from headlens.data.probes import default_probes

    assert ray_executor.computed == sum(p.n_seqs for p in default_probes(tiny))  # one shard per sequence
    assert len({t.pid for t in ray_executor.timings}) == 2 and os.getpid() not in {t.pid for t in ray_executor.timings}


def _second_half_loss(logits, tokens):
    """Defined here (pickled by value): conftest's jaxtyping import hook makes headlens' own metric closures unpicklable."""
    half = tokens.shape[1] // 2
    return torch.nn.functional.cross_entropy(logits[:, half:-1].flatten(0, 1), tokens[:, half + 1 :].flatten())


def _logprob_of_token_0(logits, tokens):
    return logits.log_softmax(-1)[..., 0].mean()


def _picklable(tiny):
    from dataclasses import replace

    from headlens.engine.intervene import Metric
    from headlens.interventions.ablation import custom_metric

    metric = custom_metric(repeat_loss_metric(tiny, n_seqs=3, half_len=8).tokens, _second_half_loss)
    pair = induction_pair(tiny, n_tokens=5, n_seqs=2)
    pair = replace(pair, metric=Metric("lp0", pair.metric.tokens, _logprob_of_token_0, True, pair.metric.positions))
    return metric, pair


def test_ablation_sweep_and_exact_patching_on_ray_equal_single_process(ray_executor, tiny):
    metric, pair = _picklable(tiny)
    for method in ("zero", "resample"):
        local = ablation_sweep(tiny, metric, method=method, batch_size=8, progress=False)
        remote = ablation_sweep(tiny, metric, method=method, batch_size=8, progress=False, executor=ray_executor)
        pd.testing.assert_frame_equal(local.table, remote.table, check_exact=True)
        assert (remote.metric, remote.method, remote.unit, remote.clean) == (
            local.metric,
            local.method,
            local.unit,
            local.clean,
        )
    local = activation_patching(tiny, pair, activation="z", runs_per_pass=5, progress=False)
    remote = activation_patching(tiny, pair, activation="z", runs_per_pass=5, progress=False, executor=ray_executor)
    pd.testing.assert_frame_equal(local.table, remote.table, check_exact=True)
    assert (remote.clean, remote.corrupted, remote.method) == (local.clean, local.corrupted, local.method)


def _die_once(fn, marker, model, shard):
    """Kill this worker process (SIGKILL, mid-shard) the first time any worker gets here."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return fn(model, shard)
    os.kill(os.getpid(), signal.SIGKILL)


class _KillingExecutor(X.RayExecutor):
    """The real Ray executor whose shard function kills its worker once (os.kill of the actor's own pid)."""

    def __init__(self, inner: X.RayExecutor, marker: Path):
        self.__dict__.update(inner.__dict__)
        self.marker = str(marker)

    def map(self, fn, model, shards, **kwargs):
        return super().map(partial(_die_once, fn, self.marker), model, shards, **kwargs)


def test_killed_worker_mid_run_gives_the_same_table(ray_executor, tiny, tmp_path):
    local = headlens.run_census(tiny, batch_size=1, progress=False).table
    before = set(ray_executor.worker_pids(tiny))
    killing = _KillingExecutor(ray_executor, tmp_path / "killed")
    remote = headlens.run_census(tiny, batch_size=1, progress=False, executor=killing).table
    assert (tmp_path / "killed").exists()  # a worker did die mid-shard
    after = set(ray_executor.worker_pids(tiny))
    assert len(before - after) == 1  # ... and Ray restarted it (new process) and re-ran its shard
    pd.testing.assert_frame_equal(local, remote, check_exact=True)


def test_shard_errors_come_back_as_headlens_errors(ray_executor, tiny):
    with pytest.raises(headlens.HeadlensError, match="unknown ablation method 'bogus'"):  # raised inside a worker
        ablation_sweep(tiny, _picklable(tiny)[0], method="bogus", executor=ray_executor, progress=False)


def test_atlas_on_ray_equals_single_process(ray_executor):
    from headlens.analysis.atlas import atlas

    local = atlas("tiny-llama,toy", seeds=2, progress=False)
    remote = atlas("tiny-llama,toy", seeds=2, progress=False, executor=ray_executor)
    for name in ("counts", "depth_shares", "positions"):
        pd.testing.assert_frame_equal(getattr(local, name), getattr(remote, name), check_exact=True)
    for model, table in local.census.items():
        pd.testing.assert_frame_equal(table, remote.census[model], check_exact=True)


def _refuse(logits, tokens):
    raise headlens.HeadlensError("refused by the metric\nsecond line of the message")


def test_shard_errors_on_two_workers_are_one_error_without_ray_tracebacks(ray_executor, tiny, monkeypatch):
    """Both workers' shards fail: the caller gets the first as one HeadlensError with its whole message, and Ray reports
    no 'Unhandled error' traceback for the other (it printed one for every failed shard whose error nobody read)."""
    import gc
    import time

    from ray._private import worker

    from headlens.interventions.ablation import custom_metric

    unread = []
    monkeypatch.setattr(worker, "_unhandled_error_handler", unread.append)
    metric = custom_metric(_picklable(tiny)[0].tokens, _refuse)
    with pytest.raises(headlens.HeadlensError) as err:
        ablation_sweep(tiny, metric, progress=False, executor=ray_executor)
    message = str(err.value)
    del err
    gc.collect()
    time.sleep(2)  # Ray reports unread errors when their references are dropped
    assert not unread
    assert message == "refused by the metric\nsecond line of the message"
    metric = _picklable(tiny)[0]  # the workers still answer right
    local = ablation_sweep(tiny, metric, progress=False).table
    pd.testing.assert_frame_equal(local, ablation_sweep(tiny, metric, progress=False, executor=ray_executor).table)


def _refuse_odd(model, shard):
    """Shard 1 refuses late and shard 3 early: which refusal Ray met first depended on timing."""
    import time

    if shard == 1:
        time.sleep(3)
    if shard % 2:
        raise headlens.HeadlensError(f"shard {shard} refused")
    return shard


def test_several_refused_shards_give_the_lowest_shards_error_as_in_order(ray_executor):
    """With two refusing shards the error was whichever worker answered first (here shard 3, while shard 1 sleeps);
    now it is the lowest shard's, the one a single process meets first, whatever the workers' timing."""
    with pytest.raises(headlens.HeadlensError, match="^shard 1 refused$"):
        X.LocalExecutor().map(_refuse_odd, None, range(5), progress=False)
    with pytest.raises(headlens.HeadlensError, match="^shard 1 refused$"):
        ray_executor.map(_refuse_odd, None, range(5), progress=False)
    assert ray_executor.map(_refuse_odd, None, [0, 2, 4], progress=False) == [0, 2, 4]  # the workers still answer

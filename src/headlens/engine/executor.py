"""Where the expensive loops run: in this process, or fanned out to Ray actors that each hold one model.

A job is ``fn(model, shard) -> result`` over an ordered list of shards (census probe batches, the
layers of an ablation sweep or of exact patching, one model of an atlas). :meth:`Executor.map`
returns the results in shard order, so whatever ran where and when, the caller merges them the same
way and the output equals the single-process one (the single-process path runs the very same shard
function through :class:`LocalExecutor`).

- :class:`LocalExecutor`: shards one after another in this process, on the model passed in.
- :class:`RayExecutor` (``pip install 'headlens[ray]'``): ``workers`` Ray actors, each loading its
  OWN copy of the model from the local cache by its recipe (:class:`ModelSpec`, recorded by
  :func:`headlens.load_model`, :func:`headlens.tiny_model` and :func:`headlens.analysis.toy.load_induction_model`) —
  weights never travel through the object store. Shards are handed to whichever actor is free.
  A worker that dies mid-shard is restarted by Ray (``max_restarts``) and its shard re-run
  (``max_task_retries``, then again on a fresh actor here).
- ``checkpoint=DIR`` (both): each finished shard's result is written atomically under
  ``DIR/<job fingerprint>/``, its file named by its own sha256; a re-run of the same job (same function and its
  code, model recipe, the model's exact weights digest, shards and headlens code) loads the shards whose content
  still matches their digest and computes only the rest. A different job (an adapter replaced at the same path
  included) gets a different folder: nothing stale is reused.
- ``workers`` is capped at what a job can use: the cores of a local Ray (one torch thread each), the CPUs of a Ray
  cluster this process did not size (one initialised beforehand, or ``address=``) and the shards of the job; a note
  says so when it caps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import types
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from headlens.errors import HeadlensError, check_count, check_model
from headlens.heads import check_layers
from headlens.io import code_version, weights_sha256, write_bytes
from headlens.models import ModelSpec, spec_of
from headlens.progress import note, tqdm

ShardFn = Callable[[Any, Any], Any]


# ---------------------------------------------------------------- executors


@dataclass
class ShardTiming:
    """Wall time of one shard and the process that ran it (for scaling projections and fault tests)."""

    index: int
    seconds: float
    pid: int


class Executor:
    """Ordered ``map`` of a shard function over shards, with optional per-shard checkpoints (see module docstring)."""

    def __init__(self, checkpoint: str | os.PathLike | None = None):
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.timings: list[ShardTiming] = []
        self.computed = 0

    def map(
        self,
        fn: ShardFn,
        model,
        shards: Sequence,
        *,
        key: str | None = None,
        desc: str = "shards",
        progress: bool = True,
    ) -> list:
        """``[fn(model, s) for s in shards]``, computed here or elsewhere, returned in shard order.

        ``key`` names the job in checkpoint fingerprints (default: the function's qualified name).
        """
        shards = list(shards)
        store = _ShardStore(self.checkpoint, key or _qualname(fn), model, shards, fn) if self.checkpoint else None
        results: list = [None] * len(shards)
        todo = []
        for i in range(len(shards)):
            if store is not None and store.has(i):
                results[i] = store.load(i)
            else:
                todo.append(i)
        self.timings, self.computed = [], 0
        with tqdm(
            total=len(shards), initial=len(shards) - len(todo), desc=desc, disable=not progress, leave=False
        ) as bar:
            for i, result, timing in self._run(fn, model, shards, todo):
                results[i] = result
                self.timings.append(timing)
                self.computed += 1
                if store is not None:
                    store.save(i, result)
                bar.update()
        return results

    def _run(self, fn: ShardFn, model, shards: list, todo: list[int]):
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (no-op here)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalExecutor(Executor):
    """Run shards one after another in this process, on the model passed to :meth:`map`."""

    def _run(self, fn, model, shards, todo):
        for i in todo:
            start = time.perf_counter()
            result = fn(model, shards[i])
            yield i, result, ShardTiming(i, time.perf_counter() - start, os.getpid())


def resolve(executor: Executor | None) -> Executor:
    """``None`` -> a :class:`LocalExecutor`; an executor is returned as is."""
    if executor is None:
        return LocalExecutor()
    if not isinstance(executor, Executor) and not callable(getattr(executor, "map", None)):
        raise HeadlensError(
            f"executor must be a headlens.engine.executor.Executor (LocalExecutor, RayExecutor), got {type(executor).__name__}"
        )
    return executor


def executor_from_options(
    workers: int | None = None,
    ray_address: str | None = None,
    *,
    threads: int = 1,
    checkpoint: str | os.PathLike | None = None,
) -> Executor:
    """The executor the CLI options ask for: Ray when ``workers`` or ``ray_address`` is given, else local."""
    workers = None if workers is None else check_count("workers", workers)
    threads = check_count("threads", threads, why="threads per worker")
    if workers is None and not ray_address:
        return LocalExecutor(checkpoint=checkpoint)
    return RayExecutor(workers or 2, address=ray_address, threads=threads, checkpoint=checkpoint)


@dataclass(frozen=True)
class _Refused:
    """A shard's HeadlensError, returned by a Ray worker as a value and raised again here with the same message."""

    message: str


class _Worker:
    """A Ray actor: one model copy, loaded here from the local cache by its recipe, reused for every shard."""

    def __init__(self, spec: ModelSpec | None, threads: int, digest: str | None = None):
        torch.set_num_threads(max(1, int(threads)))
        device = None
        if spec is not None and spec.device.startswith("cuda"):
            import ray

            device = (
                "cuda" if ray.get_gpu_ids() else spec.device
            )  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU
        self.error = None
        try:
            self.model = None if spec is None else spec.build(device=device)
        except HeadlensError as err:  # said when a shard is asked for, as the caller's error
            self.model, self.error = None, str(err)
        if self.model is not None and digest is not None and weights_sha256(self.model) != digest:
            self.error = (
                "a Ray worker loaded different weights than this process (the model or adapter files changed on disk "
                "since the run started): rerun"
            )

    def run(self, fn: ShardFn, shard):
        """``(result, seconds, pid)``; a HeadlensError comes back as a :class:`_Refused` value, not as a Ray error:
        Ray prints the traceback of every failed task whose error is never read (the other workers' shards, when
        the caller stops at the first), and splits a message of several lines."""
        start = time.perf_counter()
        try:
            if self.error is not None:
                raise HeadlensError(self.error)
            result = fn(self.model, shard)
        except HeadlensError as err:
            return _Refused(str(err)), time.perf_counter() - start, os.getpid()
        return result, time.perf_counter() - start, os.getpid()

    def pid(self) -> int:
        return os.getpid()


class RayExecutor(Executor):
    """Fan shards out to ``workers`` Ray actors (each holding one model copy); see the module docstring.

    ``address``: an existing cluster ('HOST:PORT', 'ray://HOST:PORT' or 'auto'); without it a local Ray
    with ``workers * threads`` CPUs starts (or the one this process already started is reused; ``workers`` is capped
    at the CPUs of a cluster this call did not start).
    ``threads``: torch threads (= Ray CPUs) per worker. ``gpus_per_worker``: defaults to 1 for a model on
    cuda when the cluster has a GPU per worker, else an equal share of its GPUs.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        address: str | None = None,
        threads: int = 1,
        gpus_per_worker: float | None = None,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        checkpoint: str | os.PathLike | None = None,
    ):
        super().__init__(checkpoint)
        self.workers = check_count("workers", workers)
        self.threads = check_count("threads", threads, why="threads per worker")
        self.address = address
        cores = os.cpu_count() or 1
        if not address and self.workers * self.threads > cores:
            capped = max(1, cores // self.threads)
            note(
                f"--workers {self.workers} capped at {capped}: this machine has {cores} cores "
                f"({self.threads} torch thread(s) per worker)"
            )
            self.workers = capped
        self.gpus_per_worker, self.max_restarts, self.max_task_retries = gpus_per_worker, max_restarts, max_task_retries
        self.ray = _import_ray()
        self._started = False
        if self.ray.is_initialized() and address and address != "auto":
            _check_same_cluster(self.ray, address)
        if not self.ray.is_initialized():
            if address and address != "auto":
                _check_reachable(address)
            kwargs = (
                {"address": address}
                if address
                else {"num_cpus": self.workers * self.threads, "object_store_memory": 256 * 2**20}
            )
            try:
                self.ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise HeadlensError(
                    f"could not start or reach Ray at {address or 'a new local cluster'}: {_first_line(err)}"
                ) from None
            self._started = True
        if address or not self._started:  # a cluster sized by someone else: more actors than its CPUs would wait
            self._fit_cluster()
        self._pools: dict[ModelSpec | None, list] = {}
        self._capped_note = False

    def _fit_cluster(self) -> None:
        """Cap ``workers`` at the actors the cluster's CPUs can hold (``threads`` each): an actor Ray cannot place
        never starts, and its shard would be waited for forever."""
        cpus = float(self.ray.cluster_resources().get("CPU", 0))
        fit = int(cpus // self.threads)
        if fit < 1:
            raise HeadlensError(
                f"the Ray cluster has {cpus:g} CPUs, fewer than the {self.threads} each worker takes: "
                "pass fewer threads, or start Ray with more CPUs (ray.init(num_cpus=N))"
            )
        if self.workers > fit:
            note(
                f"--workers {self.workers} capped at {fit}: the Ray cluster has {cpus:g} CPUs "
                f"({self.threads} torch thread(s) per worker)"
            )
            self.workers = fit

    def _gpus(self, spec: ModelSpec | None) -> float:
        if spec is None or not spec.device.startswith("cuda"):
            return 0.0
        if self.gpus_per_worker is not None:
            return float(self.gpus_per_worker)
        total = float(self.ray.cluster_resources().get("GPU", 0))
        if total <= 0:
            raise HeadlensError(
                "the model is on cuda but the Ray cluster has no GPUs: start Ray on GPU machines or use --device cpu"
            )
        return 1.0 if total >= self.workers else total / self.workers

    def _new_actor(self, model):
        spec = None if model is None else spec_of(model)
        cls = self.ray.remote(_Worker).options(
            num_cpus=self.threads,
            num_gpus=self._gpus(spec),
            max_restarts=self.max_restarts,
            max_task_retries=self.max_task_retries,
        )
        return cls.remote(spec, self.threads, None if model is None else weights_sha256(model))

    def pool(self, model, n_shards: int | None = None) -> list:
        """The actors holding ``model`` (one copy each), started on first use and grown up to ``workers`` (or fewer
        when a job has fewer shards: an actor without a shard would only hold memory); the recipe is their key."""
        spec = None if model is None else spec_of(model)
        if spec not in self._pools:
            self._kill_pools()  # actors hold their CPUs/GPUs: one pool at a time, or a new one could never be placed
            self._pools[spec] = []
        want = self.workers if n_shards is None else max(1, min(self.workers, int(n_shards)))
        actors = self._pools[spec]
        if want < self.workers and not self._capped_note:
            note(f"--workers {self.workers} capped at {want}: the job has {n_shards} shard(s) to run")
            self._capped_note = True
        actors += [self._new_actor(model) for _ in range(want - len(actors))]
        return actors

    def worker_pids(self, model) -> list[int]:
        """Process ids of the actors holding ``model`` (waits until they have loaded it)."""
        return self.ray.get([a.pid.remote() for a in self.pool(model)])

    def _run(self, fn, model, shards, todo):
        ray = self.ray
        actors = list(self.pool(model, len(todo)))
        fn_ref = ray.put(fn)
        queue, idle = deque(todo), deque(actors)
        pending: dict = {}
        failures: dict[int, int] = {}
        refused: dict[int, str] = {}  # the lowest shard's refusal is raised: the one an in-order run meets first
        while queue or pending:
            while queue and idle:
                actor, i = idle.popleft(), queue.popleft()
                pending[actor.run.remote(fn_ref, shards[i])] = (i, actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, actor = pending.pop(ref)
                try:
                    result, seconds, pid = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    failures[i] = failures.get(i, 0) + 1
                    if failures[i] > self.max_task_retries:
                        raise HeadlensError(
                            f"shard {i} failed {failures[i]} times because its Ray worker died: {_first_line(err)}"
                        ) from None
                    fresh = self._new_actor(model)
                    pool = self._pools[None if model is None else spec_of(model)]
                    pool[pool.index(actor)] = fresh
                    actors[actors.index(actor)] = fresh
                    queue.appendleft(i)
                    idle.append(fresh)
                    continue
                idle.append(actor)
                if isinstance(result, _Refused):
                    refused[i] = result.message
                    queue = deque(j for j in queue if j < min(refused))  # later shards need not run
                elif not refused or i < min(refused):
                    yield i, result, ShardTiming(i, seconds, pid)
        if refused:
            raise HeadlensError(refused[min(refused)])

    def _kill_pools(self) -> None:
        for actors in self._pools.values():
            for actor in actors:
                self.ray.kill(actor)
        self._pools = {}

    def close(self) -> None:
        """Kill this executor's actors (and the local Ray it started)."""
        self._kill_pools()
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
            self._started = False


def _import_ray():
    try:
        import ray
    except ImportError:
        raise HeadlensError(
            "Ray is not installed: pip install 'headlens[ray]' (or pip install ray), or run without --workers"
        ) from None
    return ray


def _check_same_cluster(ray, address: str) -> None:
    """Refuse ``address`` when this process is already connected to another Ray cluster (Ray would keep that one)."""
    try:
        current = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a client connection has no GCS address to compare: keep it
        return
    if current and not address.startswith("ray://") and address != current:
        raise HeadlensError(
            f"Ray is already initialised in this process (cluster {current}), so {address} would be ignored: "
            "drop address= to use that cluster, or call ray.shutdown() first"
        )


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (instead of Ray's long retry loop) when HOST:PORT does not answer."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise HeadlensError(f"bad Ray address {address!r}: use HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise HeadlensError(
            f"the Ray cluster at {address} is unreachable ({err.strerror or err}); start it with "
            "`ray start --head` there, or drop --ray-address to use a local Ray"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


# ---------------------------------------------------------------- per-shard checkpoints


def fingerprint(obj) -> str:
    """A stable sha256 of nested shards: tensors by dtype/shape/bytes, dataclasses by fields, functions by their code
    (bytecode, constants and the names it reads: ``x[..., 5]`` and ``x[..., 7]``, ``x.mean()`` and ``x.max()`` differ),
    closure and defaults."""
    digest = hashlib.sha256()
    _feed(digest, obj, set())
    return digest.hexdigest()


def _feed(h, obj, seen: set) -> None:
    feed = partial(_feed, h, seen=seen)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(type(obj).__qualname__.encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            feed(getattr(obj, f.name))
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            feed(k)
            feed(obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        h.update(f"{type(obj).__name__}[".encode())
        for item in items:
            feed(item)
        h.update(b"]")
    elif isinstance(obj, types.CodeType):  # nested functions are code objects among the constants
        h.update(obj.co_code)
        feed((obj.co_consts, obj.co_names))
    elif callable(obj) and hasattr(obj, "__code__"):
        h.update(_qualname(obj).encode())
        if id(obj) in seen:  # a function whose closure holds itself (a recursive local function)
            return
        seen.add(id(obj))
        feed(obj.__code__)
        feed([c.cell_contents for c in (obj.__closure__ or ())])
        feed((obj.__defaults__ or (), obj.__kwdefaults__ or {}))
    elif hasattr(obj, "func") and hasattr(obj, "args"):  # functools.partial
        feed((obj.func, obj.args, obj.keywords))
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


class _ShardStore:
    """One folder per job, one atomically written file per shard named by its own sha256.

    The job's fingerprint covers the key, the shard function (its code and what it binds: a census's head types), the
    model recipe, the model's exact weights digest (so a file replaced at the same path is a different job), the shards
    and the headlens code version."""

    def __init__(self, root: Path, key: str, model, shards: list, fn=None):
        spec = getattr(model, "headlens_spec", None) if model is not None else None
        if model is not None and spec is None:
            raise HeadlensError(
                "checkpointed runs need a model with a loading recipe (headlens.load_model / tiny_model)"
            )
        weights = None if model is None else weights_sha256(model)
        job = fingerprint((key, fn, spec, weights, shards, code_version()))
        # named by the job's function (its head types and arguments are in the fingerprint): a census key lists
        # every registered type, longer than a file name may be
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in key.split(":")[0].rsplit(".", 1)[-1])
        self.dir = Path(root) / f"{name[:48]}-{job[:16]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "job.json"
        if not manifest.is_file():
            record = {"key": key, "fingerprint": job, "n_shards": len(shards), "model": repr(spec), "weights": weights}
            write_bytes(manifest, json.dumps(record).encode())

    def _file(self, i: int) -> Path | None:
        """The shard's file whose content matches the digest in its name; others (damaged, edited) are removed."""
        found = None
        for path in sorted(self.dir.glob(f"shard-{i:05d}.*")):
            digest = path.name.split(".")[1]
            if found is None and digest == hashlib.sha256(path.read_bytes()).hexdigest()[:16]:
                found = path
            else:
                path.unlink(missing_ok=True)
        return found

    def has(self, i: int) -> bool:
        return self._file(i) is not None

    def load(self, i: int):
        path = self._file(i)
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            return load(path.read_bytes())
        if path.suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path)
        return json.loads(path.read_text())

    def save(self, i: int, result) -> None:
        import pandas as pd

        if isinstance(result, dict) and result and all(isinstance(v, torch.Tensor) for v in result.values()):
            from safetensors.torch import save

            data, suffix = save({k: v.detach().cpu().contiguous() for k, v in result.items()}), "safetensors"
        elif isinstance(result, pd.DataFrame):
            import io

            buf = io.BytesIO()
            result.to_parquet(buf, index=False)
            data, suffix = buf.getvalue(), "parquet"
        else:
            try:
                data, suffix = json.dumps(result).encode(), "json"
            except TypeError:
                raise HeadlensError(f"cannot checkpoint a shard result of type {type(result).__name__}") from None
        write_bytes(self.dir / f"shard-{i:05d}.{hashlib.sha256(data).hexdigest()[:16]}.{suffix}", data)


# ---------------------------------------------------------------- per-layer jobs


def map_layers(
    fn: ShardFn, model, first, layers, *, executor: Executor | None, key: str, progress: bool, kwargs: dict
) -> list:
    """``fn(model, (first, layer, kwargs))`` for each layer of ``layers`` (None = all) on ``executor``, in layer order.

    The per-layer form of :meth:`Executor.map` that sweeps and patching use to spread their layers over workers.
    """
    check_model(model)
    layers = check_layers(model, layers)
    shards = [(first, layer, kwargs) for layer in layers]
    return resolve(executor).map(fn, model, shards, key=key, desc=key.rsplit(".", 1)[-1], progress=progress)

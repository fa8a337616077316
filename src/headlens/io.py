"""Atomic file writes, content digests and provenance sidecars: every file headlens writes is whole or absent, and
reused only when its content and what produced it are what this run would produce.

A writer puts the bytes in a temporary file in the target's directory (``.NAME.tmp-PID-XXXX``), flushes it and
``os.replace``s it over the target, so a crash, a full disk or a kill leaves the old file or the new one, never
half of one. A failed write removes its temporary file and says, in one line, which file could not be written and
why (a full disk, a read-only file system: :func:`storage_message`); a later write to the same target removes
temporaries left by processes that no longer run.

Digests: :func:`weights_sha256` (a model's exact weights, any dtype), :func:`file_sha256` / :func:`path_sha256`
(files, adapter directories), :func:`code_version` (this code). Provenance: ``write_csv(df, path, provenance=...)``
also writes ``NAME.provenance.json`` next to ``path`` (model identity and weights digest, settings, code version,
the file's own sha256). :func:`mismatch` says why a saved file is not the one a run would compute (edited since it
was written, another model, other settings, other code), so a command reuses an output only when it is.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headlens.errors import HeadlensError, check_model

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[^.]*")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a leftover of a dead process is safe to delete)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Delete ``.NAME.tmp-PID-*`` files in ``directory`` whose writer process is gone; return what was deleted."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TMP.match(entry.name)
        if not match or (name is not None and match["name"] != name) or pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def check_output_dir(path: Path, what: str = "output") -> Path:
    """Fail early when ``path`` cannot be an output directory (a file, or not writable); it is created later, by the
    first write into it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HeadlensError(f"--out {path} is a file: pass a directory for the {what}")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise HeadlensError(f"cannot create {path}: {parent} is a file")
    try:  # a real probe: permission bits do not tell root about read-only or special file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise HeadlensError(
            f"cannot write to {path}: {parent} is not writable ({err.strerror}); pass another --out"
        ) from None
    return path


def check_outputs(directory: str | os.PathLike, files=(), dirs=()) -> None:
    """Fail before any computation when a file a command will write into ``directory`` is a directory (or a folder
    it will write into is a file): one line naming the path, instead of an error after the work, about a temporary.
    Tables (.csv, .parquet) are checked with their provenance sidecars."""
    directory = Path(directory)
    for name in files:
        path = directory / name
        for target in (path, sidecar(path)) if path.suffix in (".csv", ".parquet") else (path,):
            if target.is_dir():
                raise HeadlensError(
                    f"{target} is a directory, where this command writes a file: remove it or pass another --out"
                )
    for name in dirs:
        path = directory / name
        if path.exists() and not path.is_dir():
            raise HeadlensError(
                f"{path} is a file, where this command writes a folder: remove it or pass another --out"
            )


def target_of(path: str | os.PathLike) -> Path:
    """The file a temporary ``.NAME.tmp-PID-XXXX`` stands for (the path itself for any other name)."""
    path = Path(path)
    match = _TMP.match(path.name)
    return path.with_name(match["name"]) if match else path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed.

    The temporary keeps ``path``'s suffix so writers that infer a format from the name (matplotlib, pandas) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=path.suffix)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except Exception as err:
        message = storage_message(err, path)
        if message is None:
            raise
        raise HeadlensError(message) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


STORAGE_HINTS = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EFBIG: "the file system refuses a file this large",
    errno.EACCES: "choose a writable location",
    errno.EPERM: "choose a writable location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.EIO: "the disk reported an I/O error",
}


def storage_errno(err: BaseException) -> int | None:
    """The errno of a storage failure: an ``OSError``'s, or the one a library wraps in its own error type (safetensors
    raises ``SafetensorError("... No space left on device (os error 28)")`` for a full disk); None otherwise."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err)
    match = re.search(r"\bOs \{ code: (\d+)|\(os error (\d+)\)|\[Errno (\d+)\]", text)
    return int(next(g for g in match.groups() if g)) if match else None


def storage_message(err: BaseException, path: str | os.PathLike) -> str | None:
    """One line for a failed write of ``path`` (what, which file, what to do), or None when ``err`` is not a storage
    failure (then it is a bug and keeps its traceback)."""
    code = storage_errno(err)
    if code is None:
        return None
    reason = os.strerror(code)
    return f"cannot write {path}: {reason} ({STORAGE_HINTS.get(code, 'check the path')}); nothing half-written was left behind"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default)."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 2) -> Path:
    """Write ``value`` as JSON (no NaN: it is not JSON) to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent, allow_nan=False, default=str) + "\n")


def write_csv(df, path: str | os.PathLike, *, provenance: dict | None = None, index: bool = False, **kwargs) -> Path:
    """``df.to_csv`` atomically; with ``provenance``, also write its sidecar (see :func:`write_provenance`)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=index, **kwargs)
    if provenance is not None:
        write_provenance(path, provenance)
    return Path(path)


def write_parquet(
    df, path: str | os.PathLike, *, provenance: dict | None = None, index: bool = False, **kwargs
) -> Path:
    """``df.to_parquet`` atomically; with ``provenance``, also write its sidecar."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=index, **kwargs)
    if provenance is not None:
        write_provenance(path, provenance)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig`` atomically (format from ``path``'s suffix)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


@contextlib.contextmanager
def output_set(directory: str | os.PathLike, writer: str) -> Iterator[list[Path]]:
    """The files one writer (``"atlas"``, ``"report"``) puts in ``directory``: append each path written to the list
    it yields. When the writer finishes, ``<writer>_files.json`` lists them, and the files its previous run there
    listed but this run did not write are removed: they described another run (another model's census, a figure no
    longer drawn) and would pass for this one's. Files the writer never listed (the user's, another writer's) stay;
    a failed run changes nothing."""
    directory = Path(directory)
    manifest = directory / f"{writer}_files.json"
    written: list[Path] = []
    yield written
    names = sorted({Path(p).resolve().relative_to(directory.resolve()).as_posix() for p in written})
    manifests = set(directory.glob("*_files.json"))  # never removed, nor what another writer lists
    keep = set(names) | {m.name for m in manifests} | {n for m in manifests - {manifest} for n in _listed(m)}
    for name in _listed(manifest) - keep:
        stale = directory / name
        if not Path(name).is_absolute() and ".." not in Path(name).parts and stale.is_file():
            with contextlib.suppress(OSError):
                stale.unlink()
                for table in (sidecar(stale),) if stale.suffix in (".csv", ".parquet") else ():
                    table.unlink(missing_ok=True)
    write_json(manifest, {"writer": writer, "files": names})


def _listed(manifest: Path) -> set[str]:
    """The files an :func:`output_set` manifest lists (none when it is missing or not one)."""
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {str(f) for f in files} if isinstance(files, list) else set()


# ---------------------------------------------------------------- content digests


def tensor_buffer(tensor):
    """The raw bytes of a tensor of any dtype as a uint8 numpy view (no copy for a contiguous CPU tensor).

    bfloat16 and float16 included: numpy has no bfloat16, so the bytes are read through a uint8 view."""
    import torch

    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.contiguous().view(torch.uint8).numpy()


def tensor_bytes(tensor) -> bytes:
    """The raw bytes of a tensor of any dtype (a copy; :func:`tensor_buffer` is the view)."""
    return tensor_buffer(tensor).tobytes()


def _tensor_key(tensor) -> tuple | None:
    """What identifies a tensor's current content for the digest memo: its storage, version, dtype and shape
    (None where torch keeps no version: inference tensors)."""
    try:
        return (tensor.data_ptr(), tensor._version, str(tensor.dtype), tuple(tensor.shape))
    except RuntimeError:
        return None


def tensor_sha256(tensor) -> str:
    """sha256 of a tensor's raw bytes, remembered on the tensor until it is edited in place (torch's version
    counter) or its storage is replaced, so a model's digest is computed once however often it is asked for."""
    key = _tensor_key(tensor)
    memo = getattr(tensor, "_headlens_sha256", None)
    if key is not None and memo is not None and memo[0] == key:
        return memo[1]
    digest = hashlib.sha256(tensor_buffer(tensor)).hexdigest()
    remember_sha256(tensor, digest)
    return digest


def remember_sha256(tensor, digest: str) -> None:
    """Remember ``digest`` as ``tensor``'s sha256 (:func:`tensor_sha256`), for bytes already verified another way."""
    key = _tensor_key(tensor)
    if key is not None:
        with contextlib.suppress(AttributeError, RuntimeError):
            tensor._headlens_sha256 = (key, digest)


def tensor_digests(tensors: dict) -> dict[str, str]:
    """``{name: tensor_sha256}`` of many tensors, hashed on threads (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(tensors.items())
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda item: tensor_sha256(item[1]), items))
    return {name: digest for (name, _), digest in zip(items, digests)}


def combine_digests(tensors: dict, digests: dict[str, str]) -> str:
    """One sha256 over every tensor's name, dtype, shape and content digest, in order."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(
            f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|{digests[name]}\n".encode()
        )
    return digest.hexdigest()


def weights_sha256(model) -> str:
    """sha256 of a model's processed state dict (a ``torch.nn.Module``) or of a ``{name: tensor}`` dict: every
    tensor's name, dtype, shape and raw bytes, whatever the dtype. The one weights digest of headlens: provenance,
    checkpointed shards and the weight cache all use it. Exact (every byte is read, ~1 s per GB on 2 cores) and
    remembered per tensor until an in-place edit, so asking twice costs nothing."""
    tensors = model.state_dict(keep_vars=True) if hasattr(model, "state_dict") else dict(model)
    return combine_digests(tensors, tensor_digests(tensors))


def once_per_weights(fn):
    """``fn(model)`` computed once per model state: the last result is kept under the model and its weights digest
    (free after a cached load, and changed by an in-place edit), for weights-only scores a census reads twice."""
    memo: dict = {}

    @functools.wraps(fn)
    def wrapper(model):
        if not hasattr(model, "state_dict"):  # a name or a path where a model belongs: the model error, not a digest's
            check_model(model)
        key = (id(model), weights_sha256(model))
        if key not in memo:
            memo.clear()
            memo[key] = fn(model)
        return memo[key]

    return wrapper


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted; hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.relative_to(path).as_posix()}|{file_sha256(file)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- provenance


def headlens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("headlens")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The headlens version and a digest of the package's own files (code and packaged data), so an output made by
    other code is never taken for this code's: ``0.1.0+3f2a9c01d4e5``."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{file.relative_to(root).as_posix()}|".encode())
        digest.update(file.read_bytes())
    return f"{headlens_version()}+{digest.hexdigest()[:12]}"


def model_provenance(model) -> dict:
    """What identifies a loaded model: its name, where it came from (set by ``load_model``: source, adapter and the
    adapter files' digest), its dtype, the exact digest of its weights (:func:`weights_sha256`) and of its config
    (:func:`config_sha256`)."""
    check_model(model)
    source = getattr(model, "headlens_source", None) or {}
    return {
        "model": model.cfg.model_name,
        "source": source.get("source"),
        "adapter": source.get("adapter"),
        "adapter_sha256": source.get("adapter_sha256"),
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "weights": weights_sha256(model),
        "config": config_sha256(model),
        "n_layers": model.cfg.n_layers,
        "n_heads": model.cfg.n_heads,
    }


RUNTIME_CONFIG = (
    "device", "n_devices", "n_params", "use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in",
    "use_hook_tokens", "ungroup_grouped_query_attention",
)  # fmt: skip
"""Config fields that say where a model runs or which hooks it exposes, not what it computes (left out of
:func:`config_sha256`)."""


def config_sha256(model) -> str:
    """The sha256 of the model's config minus :data:`RUNTIME_CONFIG`: the same weights under another rope base,
    activation or context (a ``config.json`` edited by hand) compute other numbers, so their outputs are not reused."""
    check_model(model)
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k not in RUNTIME_CONFIG}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def provenance(model, **settings) -> dict:
    """Provenance of an output: the model's identity, the settings that produced it, and the code that did."""
    return {
        **model_provenance(model),
        "settings": _plain(settings),
        "headlens_version": headlens_version(),
        "code": code_version(),
    }


IDENTITY = ("model", "source", "adapter", "adapter_sha256", "dtype", "weights", "config")
"""The provenance keys that say which model an output belongs to."""
REUSE = (*IDENTITY, "settings", "code")
"""The keys that must match for an output to be reused instead of recomputed: the model, the settings, the code."""


def _plain(value):
    """JSON-stable form of settings (tuples -> lists, paths -> str) so saved and fresh provenance compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def sidecar(path: str | os.PathLike) -> Path:
    """Where the provenance of ``path`` lives: ``NAME.provenance.json`` beside it, the full name kept, so census.csv
    and census.parquet have their own (census.csv.provenance.json, census.parquet.provenance.json)."""
    path = Path(path)
    return path.with_name(f"{path.name}.provenance.json")


def write_provenance(path: str | os.PathLike, prov: dict) -> Path:
    """Write ``prov`` plus the output's size and content digest to the sidecar of ``path`` atomically."""
    path = Path(path)
    record = {**_plain(prov), "file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return write_json(sidecar(path), record)


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The provenance saved beside ``path``, or None when there is none or it is unreadable."""
    try:
        record = json.loads(sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def mismatch(path: str | os.PathLike, expected: dict, keys=REUSE) -> str | None:
    """Why the file at ``path`` is not what ``expected`` provenance describes (None when it matches): no sidecar, its
    content changed since it was written (sha256), or one of ``keys`` differs."""
    path = Path(path)
    saved = read_provenance(path)
    if saved is None:
        return f"{path} has no provenance ({sidecar(path).name} is missing or unreadable)"
    try:
        changed = saved.get("bytes") != path.stat().st_size or saved.get("sha256") != file_sha256(path)
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    if changed:
        return f"{path} changed after it was written (its content digest differs from the one in {sidecar(path).name})"
    expected = _plain(expected)
    for key in keys:
        if saved.get(key) != expected.get(key):
            return f"{path} was made with {key} {_short(saved.get(key))}, not {_short(expected.get(key))}"
    return None


def matches(path: str | os.PathLike, expected: dict, **kwargs) -> bool:
    """Whether ``path`` exists with its content intact and provenance equal to ``expected`` on ``keys``."""
    return mismatch(path, expected, **kwargs) is None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

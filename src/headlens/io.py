"""Atomic file writes and provenance sidecars: every file headlens writes is whole or absent.

A writer puts the bytes in a temporary file in the target's directory (``.NAME.tmp-PID-XXXX``), flushes it and
``os.replace``s it over the target, so a crash, a full disk or a kill leaves the old file or the new one, never
half of one. A failed write removes its temporary file; a later write to the same target removes temporaries
left by processes that no longer run.

Provenance: ``write_csv(df, path, provenance=...)`` also writes ``NAME.provenance.json`` next to ``path`` (model,
weights fingerprint, seed, probe settings, headlens version). :func:`matches` says whether a saved file was made
with given settings, so a command reuses an output only when it is the one it would compute.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headlens.errors import HeadlensError

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
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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


# ---------------------------------------------------------------- provenance


def headlens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("headlens")
    except PackageNotFoundError:
        return "unknown"


def tensor_bytes(tensor) -> bytes:
    """The raw bytes of a tensor of any dtype (bfloat16 and float16 included: numpy has no bfloat16, so the bytes are
    read through a uint8 view). The one way every weights digest reads a tensor."""
    import torch

    flat = tensor.detach().reshape(-1).cpu().contiguous()
    return flat.view(torch.uint8).numpy().tobytes()


def weights_sha256(model) -> str:
    """sha256 of a model's processed state dict (names and raw bytes, in order, whatever the dtype)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def weights_fingerprint(model) -> str:
    """A cheap content hash of a model: every parameter's name, shape and a strided sample of its values.

    Two different models (or a model with and without an adapter) differ in it; computing it reads ~1000
    values per tensor, not the whole 2.5 GB.
    """
    import torch

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 997)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(tensor_bytes(flat[::step].to(torch.float32)))
    return digest.hexdigest()[:32]


def model_provenance(model) -> dict:
    """What identifies a loaded model: its name, where it came from (set by ``load_model``) and a weights fingerprint."""
    source = getattr(model, "headlens_source", None) or {}
    return {
        "model": model.cfg.model_name,
        "source": source.get("source"),
        "adapter": source.get("adapter"),
        "weights": weights_fingerprint(model),
        "n_layers": model.cfg.n_layers,
        "n_heads": model.cfg.n_heads,
    }


def provenance(model, **settings) -> dict:
    """Provenance of an output: the model's identity, the settings that produced it, and the headlens version."""
    return {**model_provenance(model), "settings": _plain(settings), "headlens_version": headlens_version()}


def _plain(value):
    """JSON-stable form of settings (tuples -> lists, paths -> str) so saved and fresh provenance compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def sidecar(path: str | os.PathLike) -> Path:
    """Where the provenance of ``path`` lives: ``NAME.provenance.json`` beside it (census.csv -> census.provenance.json)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.provenance.json")


def write_provenance(path: str | os.PathLike, prov: dict) -> Path:
    """Write ``prov`` (plus the output's size) to the sidecar of ``path`` atomically."""
    path = Path(path)
    record = {**_plain(prov), "file": path.name, "bytes": path.stat().st_size}
    return write_json(sidecar(path), record)


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The provenance saved beside ``path``, or None when there is none or it is unreadable."""
    try:
        record = json.loads(sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def mismatch(
    path: str | os.PathLike, expected: dict, keys=("model", "source", "adapter", "weights", "settings")
) -> str | None:
    """Why the file at ``path`` is not what ``expected`` provenance describes (None when it matches)."""
    path = Path(path)
    saved = read_provenance(path)
    if saved is None:
        return f"{path} has no provenance ({sidecar(path).name} is missing or unreadable)"
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    if saved.get("bytes") != size:
        return f"{path} changed after it was written"
    expected = _plain(expected)
    for key in keys:
        if saved.get(key) != expected.get(key):
            return f"{path} was made with {key} {_short(saved.get(key))}, not {_short(expected.get(key))}"
    return None


def matches(path: str | os.PathLike, expected: dict, **kwargs) -> bool:
    """Whether ``path`` exists with provenance equal to ``expected`` (model, source, weights, settings)."""
    return mismatch(path, expected, **kwargs) is None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

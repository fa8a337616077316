"""The ``headlens`` command line: a thin typer layer over the library.

Start-up is instant: this module imports only typer, the error type and :mod:`headlens.progress`
(tqdm); torch, TransformerLens, transformers and pandas load inside the command that needs them, so
``headlens --help`` and ``headlens <command> --help`` answer in well under a second.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from headlens import progress as _progress
from headlens.errors import HeadlensError
from headlens.heads import head_name, unit_name
from headlens.io import check_outputs, mismatch, provenance, save_figure, write_csv, write_parquet

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: no markup eats "[ray]", no box truncates option names
    help="Find out what the attention heads of Qwen models do.",
)

MODEL_NAMES = "qwen2.5-coder-0.5b (default, alias qwen), smollm2, tiny-qwen2, tiny-llama"


class MetricName(str, Enum):
    loss = "loss"
    repeat = "repeat"
    logit_diff = "logit-diff"


class MethodName(str, Enum):
    zero = "zero"
    mean = "mean"
    resample = "resample"


class AttributionName(str, Enum):
    atp = "atp"
    atp_star = "atp*"
    ig = "ig"


class UnitName(str, Enum):
    head = "head"
    kv_group = "kv-group"


class StrategyName(str, Enum):
    fast = "fast"
    naive = "naive"


class TaskName(str, Enum):
    induction = "induction"


class OrderName(str, Enum):
    gradient = "gradient"
    ablation = "ablation"


SECTIONS = ("ablation", "patching", "rope", "compare")
ACTIVATION_NAMES = ("z", "pattern", "q", "k", "v")

# ---------------------------------------------------------------- shared options

MODEL = typer.Option(
    "qwen2.5-coder-0.5b",
    "--model",
    "-m",
    help=f"model: {MODEL_NAMES}; or a local HF directory, a .gguf file or a hub id already in the local cache",
)
ADAPTER = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory merged into the model")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps")
DTYPE = typer.Option(
    "float32", "--dtype", help="float32, bfloat16 or float16 (scores and metrics are reduced in float32)"
)
WORKERS = typer.Option(
    None, "--workers", help="run the shards on N Ray workers, each holding one model copy (pip install 'headlens[ray]')"
)
RAY_ADDRESS = typer.Option(
    None, "--ray-address", help="an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto) instead of a local one"
)
SEED = typer.Option(0, "--seed", help="random seed (same seed, same table)")
PROGRESS = typer.Option(
    True,
    "--progress/--no-progress",
    help="progress bars on stderr (plain lines when stderr is not a terminal); --no-progress also silences transformers' bars",
)
METRIC = typer.Option(
    MetricName.loss, "--metric", help="loss (corpus text), repeat (repeated random tokens) or logit-diff"
)
TOP_K = typer.Option(10, "--top-k", help="how many heads to print")
CENSUS_CSV = typer.Option(
    None, "--census", help="census.csv whose labels to print beside heads (default: run the census on the model)"
)


POSITIVE = (
    "top_k",
    "batch_size",
    "runs_per_pass",
    "n_seqs",
    "seq_len",
    "n_tokens",
    "steps",
    "n_random",
    "workers",
    "seeds",
)
TEXTS = ("prompt", "clean", "corrupted", "answer", "wrong", "correct")
MAX_SEED = 2**32 - 1


def _temperatures(text: str) -> tuple[float, ...]:
    """``--temperatures`` as numbers: a comma list of positive finite values."""
    import math

    try:
        temps = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        temps = ()
    if not temps or not all(math.isfinite(t) and t > 0 for t in temps):
        raise HeadlensError(f"--temperatures must be a comma list of positive numbers, e.g. 0.5,1,2 (got {text!r})")
    return temps


def _validate(params: dict) -> None:
    """Check a command's arguments before anything is loaded: output directory, counts, seed, texts, numbers.

    Called first in every command with ``locals()``; each check applies to the parameters the command has.
    """
    import math

    from headlens.io import check_output_dir

    for name in POSITIVE:
        value = params.get(name)
        if value is not None and value < 1:
            raise HeadlensError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    seed = params.get("seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise HeadlensError(f"--seed must be between 0 and {MAX_SEED} (got {seed})")
    for name in TEXTS:
        value = params.get(name)
        if value is not None and not value.strip():
            raise HeadlensError(f"--{name} is empty: give some text, or leave the option out for the default")
    tolerance = params.get("tolerance")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise HeadlensError(f"--tolerance must be a positive number (got {tolerance})")
    if params.get("temperatures") is not None:
        _temperatures(params["temperatures"])
    census_csv = params.get("census_csv")
    if census_csv is not None and not Path(census_csv).is_file():
        raise HeadlensError(f"--census {census_csv} is not a file: pass the census.csv written by `headlens census`")
    out = params.get("out")
    if out is not None:
        check_output_dir(out)
        check_outputs(out, dirs=(".shards",))


def _refuse(ctx: typer.Context, when: str, *names: str) -> None:
    """Options of ``names`` (parameter names) given on the command line are an error: they apply only ``when``, and
    a command never ignores an option it was given."""
    given = [
        "/".join(p.opts[:1] + p.secondary_opts[:1])
        for p in ctx.command.params
        if p.name in names and getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"
    ]
    if given:
        them = "it" if len(given) == 1 else "them"
        raise HeadlensError(
            f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} {when}: leave {them} out"
        )


def _out(help: str):
    return typer.Option(..., "--out", "-o", help=help)


def _start(progress: bool) -> None:
    """Apply the options every command shares (before anything heavy is imported).

    Deprecation notices of the libraries underneath (transformers, peft, TransformerLens) are for their callers'
    code, not for a user of this command, so they are kept out of its output."""
    import warnings

    for module in ("transformers", "peft", "transformer_lens", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    _progress.set_enabled(progress)


def _load(model: str, adapter: Path | None = None, device: str = "cpu", dtype: str = "float32", heads=(), texts=None):
    """Load the model; ``heads`` and ``texts`` (``{"--option": text}``) are checked against it right away, before
    any computation: a text longer than the context is an error naming the option that fixes it."""
    from headlens.heads import check_head
    from headlens.models import load_model, resolve_device, resolve_dtype

    resolve_device(device), resolve_dtype(dtype)  # fail before any slow loading
    where = "" if (device, dtype) == ("cpu", "float32") else f" on {device} in {dtype}"
    typer.echo(f"loading {model}" + (f" + adapter {adapter}" if adapter else "") + where + " ...", err=True)
    hooked = load_model(model, adapter=adapter, device=device, dtype=dtype)
    for layer, head in heads:
        check_head(hooked, layer, head)
    for option, text in (texts or {}).items():  # too long for the context: say so now, not after the computation
        if text is not None:
            _check_length(hooked, option, text, hooked.cfg.n_ctx, f"{hooked.cfg.model_name} takes")
    _progress.set_enabled(_progress.enabled())  # libraries imported by the load obey the switch too
    return hooked


def _check_length(hooked, option: str, text: str, limit: int, what: str) -> None:
    """``text`` (the value of ``option``) must be at most ``limit`` tokens; the error names the option to shorten."""
    n_tokens = len(hooked.tokenizer(text, add_special_tokens=False)["input_ids"]) if hooked.tokenizer is not None else 0
    if n_tokens > limit:
        raise HeadlensError(f"{option} is {n_tokens} tokens long but {what} at most {limit}: shorten {option}")


def _census_of(hooked, path: Path):
    """The census table at ``path`` (``--census``), refused unless its provenance says it was made for this model
    (same source, adapter, dtype and weights digest) and its content is as written (the rules `report` reuses by)."""
    from headlens.io import IDENTITY
    from headlens.render.report import read_census

    why = mismatch(path, provenance(hooked), keys=IDENTITY)
    if why is not None:
        raise HeadlensError(
            f"--census {path} is not a census of this model: {why}; pass the census.csv that `headlens census` "
            "wrote for this model (same --model, --adapter and --dtype), or leave --census out"
        )
    return read_census(path)


def _executor(workers: int | None, ray_address: str | None, out: Path):
    """Local, or Ray with --workers/--ray-address; finished shards are kept under OUT/.shards until the run succeeds."""
    from headlens.engine.executor import executor_from_options

    return executor_from_options(workers, ray_address, checkpoint=out / ".shards")


def _done(executor, out: Path) -> None:
    import shutil

    executor.close()
    shutil.rmtree(out / ".shards", ignore_errors=True)


def _parse_heads(text: str) -> list[tuple[int, int]]:
    """--heads "L5H3,12.0" -> heads (headlens.heads.parse_heads: duplicates and bad spellings are errors)."""
    from headlens.heads import parse_heads

    heads = parse_heads(text)
    if text.strip() and not heads:
        raise HeadlensError(f"--heads {text!r} names no head: give heads such as L5H3,12.0 (or leave --heads out)")
    return heads


def _labels(hooked, census_csv: Path | None, seed: int, progress: bool) -> dict[tuple[int, int], str]:
    """The census label of every head: from ``census_csv`` when given, else a census run on ``hooked``."""
    if census_csv is not None:
        table = _census_of(hooked, census_csv)
    else:
        from headlens.census import run_census

        table = run_census(hooked, seed=seed, progress=progress).table
    return {(int(r.layer), int(r.head)): str(r.label) for r in table.itertuples(index=False)}


def _print_table(df, formats: dict[str, str] | None = None) -> None:
    """Print ``df`` as an aligned plain-text table (headers carry the units) that pastes cleanly."""
    formats = formats or {}
    shown = df.copy()
    for col in shown.columns:
        fmt = formats.get(col)
        if fmt is not None:
            shown[col] = [("" if v is None or v != v else format(v, fmt)) for v in shown[col]]
    typer.echo(shown.to_string(index=False, justify="right"))


# ---------------------------------------------------------------- commands


@app.callback()
def _root() -> None:
    """Find out what the attention heads of Qwen models do."""


@app.command()
def info(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    progress: bool = PROGRESS,
):
    """Print layers, q/kv heads, d_head, kv groups, rope base and vocab of a model."""
    _validate(locals())
    _start(progress)
    from headlens.models import model_info

    facts = model_info(_load(model, adapter, device, dtype))
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        typer.echo(f"{key:>18}: {value}")


@app.command("census")
def census_cmd(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path = _out("directory for census.csv, census.parquet, report.html and figures/"),
    seed: int = SEED,
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    top_k: int = typer.Option(5, "--top-k", help="top heads to print per label"),
    causal: bool = typer.Option(
        True,
        "--causal/--no-causal",
        help="test each label causally (its heads ablated on the label's task vs layer-matched random sets, and its "
        "top heads alone); --no-causal skips it",
    ),
    progress: bool = PROGRESS,
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
):
    """Score and label every head, test each label causally and write a card per head; writes DIR/census.csv (with a
    card column), DIR/census.parquet, DIR/causal.csv, DIR/causal_heads.csv and the HTML report DIR/report.html.

    Prints, per label, how many heads carry it, its top heads by the score that decided their label, and its causal
    verdict. `headlens head L8H7` then explains one head in seconds from this census.
    """
    _validate(locals())
    check_outputs(out, ("census.csv", "census.parquet", *CAUSAL_FILES, "report.html"), ("figures",))
    _start(progress)
    from headlens.analysis.cards import head_cards
    from headlens.analysis.evidence import label_evidence
    from headlens.census import run_census
    from headlens.render.report import write_report

    hooked = _load(model, adapter, device, dtype)
    executor = _executor(workers, ray_address, out)
    result = run_census(hooked, seed=seed, batch_size=batch_size, progress=progress, executor=executor)
    _done(executor, out)
    evidence = label_evidence(hooked, result.table, seed=seed, progress=progress) if causal else None
    result.table["card"] = head_cards(hooked, result.table, evidence=evidence)
    out.mkdir(parents=True, exist_ok=True)
    table = result.table
    # each table has its own sidecar (census.csv.provenance.json, ...) holding its content digest
    write_parquet(table, out / "census.parquet", provenance=result.provenance)
    write_csv(table, out / "census.csv", provenance=result.provenance)
    if evidence is not None:
        write_csv(evidence.labels, out / "causal.csv", provenance=result.provenance)
        write_csv(evidence.heads, out / "causal_heads.csv", provenance=result.provenance)
    else:
        _drop_stale(out, CAUSAL_FILES, result.provenance)
    _share_census(out, result.provenance)
    report = write_report(out, model=hooked, census=result, evidence=evidence, progress=progress)
    typer.echo(f"{len(table)} heads: {hooked.cfg.n_layers} layers x {hooked.cfg.n_heads} heads; seed {seed}")
    _print_table(label_summary(result, top_k=top_k, evidence=evidence, causal=causal), {"share": ".1%"})
    wrote = ", ".join(str(out / f) for f in ("census.csv", "census.parquet", *(("causal.csv",) if causal else ())))
    typer.echo(f"wrote {wrote} and {report}")


CAUSAL_FILES = ("causal.csv", "causal_heads.csv")


def _census_cache(prov: dict) -> Path:
    """The shared census cache of a model and seed: HEADLENS_CACHE/census/<model>-<weights>/seed<N>/."""
    from headlens.models import cache_dir

    name = "".join(c if c.isalnum() or c in "-._" else "_" for c in str(prov["model"]))
    return cache_dir() / "census" / f"{name}-{prov['weights'][:12]}" / f"seed{prov['settings']['seed']}"


def _drop_stale(directory: Path, names, prov: dict) -> None:
    """Remove the files of ``names`` in ``directory`` (and their sidecars) that were not made for ``prov``, so a
    directory never holds one census's table beside another's evidence."""
    from headlens.io import sidecar

    for name in names:
        path = directory / name
        why = mismatch(path, prov) if path.is_file() else None
        if why is not None:
            path.unlink()
            sidecar(path).unlink(missing_ok=True)
            typer.echo(f"removed {path}: {why}", err=True)


def _share_census(out: Path, prov: dict) -> None:
    """Copy DIR's census (and causal evidence) into the shared cache, so `headlens head` finds it without --out."""
    import shutil

    from headlens.io import atomic_path, sidecar

    cache = _census_cache(prov)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for name in ("census.csv", *CAUSAL_FILES):
            if not (out / name).is_file():
                (cache / name).unlink(missing_ok=True)
                sidecar(cache / name).unlink(missing_ok=True)
                continue
            for src in (out / name, sidecar(out / name)):  # the sidecar last: it vouches for the file
                with atomic_path(cache / src.name) as tmp:
                    shutil.copyfile(src, tmp)
    except (OSError, HeadlensError) as err:  # a read-only cache costs a later `headlens head` a recomputation only
        typer.echo(f"note: could not share the census in {cache} ({getattr(err, 'strerror', None) or err})", err=True)


def _census_settings(seed: int) -> dict:
    """What a CLI census depends on besides the model: the seed, the default probes and thresholds, the head types."""
    from headlens.census.run import census_settings

    return census_settings(seed)


def label_summary(census, *, top_k: int = 5, evidence=None, causal: bool = True):
    """Per label: heads, share and the ``top_k`` top heads by the score that decided their label (``label_score``,
    the ranking every view shares: :func:`headlens.render.viz.top_heads_by_label`), e.g. ``L9H8 0.97``; with
    ``causal``, the label's causal verdict from ``evidence`` (:mod:`headlens.analysis.evidence`)."""
    import pandas as pd

    from headlens.analysis.evidence import verdict_table
    from headlens.census import LABEL_SCORE, LABELS
    from headlens.render.viz import top_heads_by_label

    table = census.table
    intervals = census.label_counts.set_index("label")
    labels = [lb for lb in LABELS if (table["label"] == lb).any()]
    top = top_heads_by_label(table, top_k=top_k, labels=labels)
    verdicts = verdict_table(evidence, labels).set_index("label")["causal verdict"] if causal else {}
    rows = []
    for label in labels:
        part = table[table["label"] == label]
        names = " ".join(f"{head_name(r.layer, r.head)} {r.score:.2f}" for r in top[top["label"] == label].itertuples())
        row = {
            "label": label,
            "heads": len(part),
            "heads 95%": f"{intervals.loc[label, 'lo']}-{intervals.loc[label, 'hi']}",
            "share": len(part) / len(table),
            "score": LABEL_SCORE.get(label, label),
            "top heads (deciding score)": names,
        }
        if causal:
            row["causal"] = verdicts.get(label, "")
        rows.append(row)
    return pd.DataFrame(rows)


def _prompt_pair(hooked, clean, corrupted, answer, wrong, task, seed):
    """The task of --clean/--corrupted(/--answer/--wrong) or --task, or None."""
    if clean is not None:
        from headlens.interventions.patching import text_pair

        return text_pair(hooked, clean, corrupted, answer=answer, wrong=wrong)
    if task is not None:
        from headlens.interventions.patching import induction_pair

        return induction_pair(hooked, seed=seed)
    return None


def _check_pair_options(clean, corrupted, answer, wrong, task) -> None:
    if (clean is None) != (corrupted is None):
        raise HeadlensError("give both --clean and --corrupted (a prompt pair of equal token length), or neither")
    if clean is not None and task is not None:
        raise HeadlensError("give a prompt pair (--clean/--corrupted) or a built-in --task, not both")
    if clean is None and (answer is not None or wrong is not None):
        raise HeadlensError("--answer and --wrong belong to a prompt pair: give --clean and --corrupted too")


def _read_evidence(directory: Path, prov: dict):
    """The causal evidence saved beside a census (causal.csv, causal_heads.csv), or None when absent or stale."""
    import pandas as pd

    from headlens.analysis.evidence import LabelEvidence

    paths = [directory / name for name in CAUSAL_FILES]
    if not all(p.is_file() and mismatch(p, prov) is None for p in paths):
        return None
    labels = pd.read_csv(paths[0])
    settings = (
        {"n_random": int(labels["n_random"].max())} if "n_random" in labels and labels["n_random"].notna().any() else {}
    )
    return LabelEvidence(labels, pd.read_csv(paths[1]), settings)


def _find_census(hooked, out: Path | None, seed: int, batch_size: int, progress: bool):
    """(census result, its directory): DIR/census.csv or the shared cache when their provenance matches, else a fresh
    census written to the shared cache (``out`` is only read: it may hold the census of another model or seed)."""
    from headlens.census import CensusResult, run_census
    from headlens.render.report import read_census

    prov = provenance(hooked, **_census_settings(seed))
    places = [p for p in (out, _census_cache(prov)) if p is not None]
    for place in places:
        csv = place / "census.csv"
        why = mismatch(csv, prov) if csv.is_file() else "it does not exist"
        if why is None:
            typer.echo(f"reusing {csv}", err=True)
            return CensusResult.from_table(read_census(csv), seed=seed, provenance=prov), place
        if place == out:
            typer.echo(f"not using {csv}: {why}", err=True)
    typer.echo("no census of this model and seed yet: computing it (once; later calls reuse it)", err=True)
    result = run_census(hooked, seed=seed, batch_size=batch_size, progress=progress)
    place = places[-1]
    try:
        write_csv(result.table, place / "census.csv", provenance=result.provenance)
        typer.echo(f"wrote {place / 'census.csv'}", err=True)
    except (OSError, HeadlensError) as err:  # a read-only cache costs the next call a recomputation, not this one
        typer.echo(f"note: could not keep the census in {place} ({getattr(err, 'strerror', None) or err})", err=True)
    return result, place


@app.command("head")
def head_cmd(
    name: str = typer.Argument(..., metavar="HEAD", help="the head, e.g. L8H7 (or 8.7)"),
    model: str = MODEL,
    adapter: Path = ADAPTER,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path = typer.Option(
        None, "--out", "-o", help="census directory to read DIR/census.csv from (default: the shared census cache)"
    ),
    clean: str = typer.Option(None, "--clean", help="clean prompt of a task of your own"),
    corrupted: str = typer.Option(None, "--corrupted", help="corrupted prompt, same token length as --clean"),
    answer: str = typer.Option(None, "--answer", help="correct next token (default: the clean run's top token)"),
    wrong: str = typer.Option(None, "--wrong", help="wrong next token (default: the corrupted run's top token)"),
    task: TaskName = typer.Option(None, "--task", help="a built-in task instead of a prompt pair: induction"),
    circuit: Path = typer.Option(
        None, "--circuit", help="output directory of `headlens circuit` (same model): the head's place in that circuit"
    ),
    causal: bool = typer.Option(
        True, "--causal/--no-causal", help="test the head's label causally when no saved evidence has it"
    ),
    seed: int = SEED,
    batch_size: int = typer.Option(8, "--batch-size", help="census (only when none is cached): sequences per forward"),
    progress: bool = PROGRESS,
):
    """Explain one head: its card (label and the score that decided it, runner-up, what it reads and writes, causal
    verdict, role in a task) and the evidence table of every score against its threshold.

    Reads the census of `headlens census` (DIR/census.csv with --out, else the shared cache under HEADLENS_CACHE) and
    computes only what is missing. With --clean/--corrupted (or --task induction) it also measures the head's role in
    that task: patching effect, direct logit attribution and attention to the answer.
    """
    _validate(locals())
    _check_pair_options(clean, corrupted, answer, wrong, task)
    heads = _parse_heads(name)
    if len(heads) != 1:
        raise HeadlensError(f"give one head, e.g. L8H7 (got {len(heads)}: {name!r})")
    _start(progress)
    from headlens.analysis.cards import head_card, score_table
    from headlens.analysis.evidence import label_evidence, verdict_table
    from headlens.analysis.roles import task_roles

    (layer, head_), *_ = heads
    edges_csv = None if circuit is None else circuit / "edges.csv"
    if edges_csv is not None and not edges_csv.is_file():
        raise HeadlensError(f"{edges_csv} does not exist: give --circuit the --out directory of `headlens circuit`")
    hooked = _load(model, adapter, device, dtype, heads=heads, texts={"--clean": clean, "--corrupted": corrupted})
    edges = None
    if edges_csv is not None:
        why = mismatch(edges_csv, provenance(hooked), keys=("model", "source", "adapter", "weights"))
        if why is not None:
            raise HeadlensError(f"{why}: run `headlens circuit` on this model, or give its --out directory")
        import pandas as pd

        edges = pd.read_csv(edges_csv)
    pair = _prompt_pair(hooked, clean, corrupted, answer, wrong, task, seed)
    result, place = _find_census(hooked, out, seed, batch_size, progress)
    table = result.table
    label = str(table.loc[(table["layer"] == layer) & (table["head"] == head_), "label"].iloc[0])
    evidence = _read_evidence(place, result.provenance) if causal else None
    if causal and evidence is None and label != "other":
        typer.echo(f"testing the {label} label causally ...", err=True)
        evidence = label_evidence(hooked, table, labels=[label], seed=seed, progress=progress)
    roles = None
    if pair is not None:
        typer.echo("measuring the head's role in the task ...", err=True)
        roles = task_roles(hooked, pair, answer=answer, wrong=wrong, heads=heads, progress=progress)
    import textwrap

    card = head_card(hooked, table, layer, head_, evidence=evidence, roles=roles, circuit=edges)
    typer.echo(textwrap.fill(card, width=110))
    typer.echo("\nevidence (every registered score; read = the value the label rule compares with the threshold):")
    shown = score_table(table, layer, head_)
    shown["decides"] = ["<- label" if d else "" for d in shown["decides"]]
    shown["candidate"] = ["yes" if c else "" for c in shown["candidate"]]
    fmt = {c: ".3f" for c in ("raw", "raw_lo", "raw_hi", "nosink", "nosink_lo", "nosink_hi", "ratio")}
    _print_table(shown, fmt)
    if label != "other":
        typer.echo("")
        _print_table(verdict_table(evidence, [label]) if causal else verdict_table(None, [label]))
    if roles is not None:
        r = roles[(roles["layer"] == layer) & (roles["head"] == head_)]
        typer.echo(f"\nrole in the task ({r['task'].iloc[0]}):")
        _print_table(
            r[["patching", "dla", "attn_answer"]].rename(
                columns={"patching": "patching effect", "dla": "direct logit attr.", "attn_answer": "attn to answer"}
            ),
            {"patching effect": "+.3f", "direct logit attr.": "+.3f", "attn to answer": ".3f"},
        )


@app.command()
def report(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path = _out("report directory (reuses DIR/census.csv when present)"),
    prompt: str = typer.Option(
        None, "--prompt", help="prompt for the attention patterns (default: a built-in repeated prompt)"
    ),
    heads: str = typer.Option("", "--heads", help="extra heads to view, e.g. 'L5H3,12.0'"),
    with_: str = typer.Option(
        "", "--with", help=f"extra sections, comma list of {', '.join(SECTIONS)} (compare needs --tuned)"
    ),
    tuned: str = typer.Option(
        None, "--tuned", help="with compare: PEFT LoRA adapter directory or fine-tuned model to compare with --model"
    ),
    clean: str = typer.Option(None, "--clean", help="task roles: clean prompt of a task of your own"),
    corrupted: str = typer.Option(None, "--corrupted", help="task roles: corrupted prompt, same token length"),
    answer: str = typer.Option(None, "--answer", help="task roles: correct next token (default: clean top token)"),
    wrong: str = typer.Option(None, "--wrong", help="task roles: wrong next token (default: corrupted top token)"),
    task: TaskName = typer.Option(None, "--task", help="task roles on a built-in task instead: induction"),
    top_k: int = typer.Option(3, "--top-k", help="heads per label in the gallery"),
    seed: int = SEED,
    batch_size: int = typer.Option(8, "--batch-size", help="census: sequences per forward pass"),
    progress: bool = PROGRESS,
):
    """Write a self-contained offline HTML report (DIR/report.html) and PNG figures; runs the census if needed.

    Reuses DIR/census.csv and the causal evidence beside it (DIR/causal.csv) when they fit the model and seed.
    --clean/--corrupted (with --answer/--wrong) or --task induction add a task-roles section: every head's patching
    effect, direct logit attribution and attention to the answer on that task, also in each head's card.
    --with ablation adds a zero-ablation sweep of every head on the repeated-token loss, --with patching activation
    patching of every head's z on the built-in induction pair, --with rope attention vs relative distance, and
    --with compare the head-by-head comparison with --tuned.
    """
    _validate(locals())
    check_outputs(out, ("census.csv", "census.parquet", *CAUSAL_FILES, "report.html"), ("figures",))
    _check_pair_options(clean, corrupted, answer, wrong, task)
    _start(progress)
    chosen = _parse_heads(heads)
    sections = [s.strip() for s in with_.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise HeadlensError(f"unknown --with section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    if "compare" in sections and not tuned:
        raise HeadlensError("--with compare needs --tuned (a LoRA adapter directory or a fine-tuned model)")
    if tuned is not None and "compare" not in sections:
        raise HeadlensError("--tuned only applies with --with compare: add that section, or leave --tuned out")
    from headlens.engine.capture import VIEW_TOKENS
    from headlens.render.report import read_census, write_report
    from headlens.render.viz import DEFAULT_PROMPT

    texts = {"--prompt": prompt, "--clean": clean, "--corrupted": corrupted}
    hooked = _load(model, adapter, device, dtype, heads=chosen, texts=texts)
    if prompt is not None:
        _check_length(hooked, "--prompt", prompt, VIEW_TOKENS, "the report's attention views show")
    pair = _prompt_pair(hooked, clean, corrupted, answer, wrong, task, seed)
    csv = out / "census.csv"
    prov = provenance(hooked, **_census_settings(seed))
    why = mismatch(csv, prov) if csv.exists() else None
    from headlens.census import CensusResult, run_census

    if csv.exists() and why is None:
        typer.echo(f"reusing {csv} (same model, seed and probes)", err=True)
        result = CensusResult.from_table(read_census(csv), seed=seed, provenance=prov)
    else:
        if why is not None:
            typer.echo(f"recomputing the census: {why}", err=True)
        result = run_census(hooked, seed=seed, batch_size=batch_size, progress=progress)
        out.mkdir(parents=True, exist_ok=True)
        write_parquet(result.table, out / "census.parquet", provenance=result.provenance)
        write_csv(result.table, csv, provenance=result.provenance)
    _drop_stale(out, ("census.parquet", *CAUSAL_FILES), prov)
    evidence = _read_evidence(out, prov)
    extra = {}
    if pair is not None:
        from headlens.analysis.roles import task_roles

        extra["roles"] = task_roles(hooked, pair, answer=answer, wrong=wrong, progress=progress)
    if pair is not None or "card" not in result.table.columns:
        from headlens.analysis.cards import head_cards

        result.table["card"] = head_cards(hooked, result.table, evidence=evidence, roles=extra.get("roles"))
    if "ablation" in sections:
        from headlens.interventions.ablation import ablation_sweep, build_metric

        extra["ablation"] = ablation_sweep(
            hooked, build_metric(hooked, "repeat", seed=seed), method="zero", seed=seed, progress=progress
        ).table
    if "patching" in sections:
        from headlens.interventions.patching import activation_patching, induction_pair

        extra["patching"] = activation_patching(
            hooked, induction_pair(hooked, seed=seed), activation="z", progress=progress
        ).table
    if "rope" in sections:
        from headlens.census.rope import rope_profile

        extra["rope"] = list(rope_profile(hooked, seed=seed, progress=progress))
    if "compare" in sections:
        from headlens.analysis.compare import compare_models
        from headlens.models import load_tuned

        typer.echo(f"loading tuned {tuned} ...", err=True)
        extra["compare"] = compare_models(
            hooked,
            load_tuned(hooked, tuned, base_source=model, device=device, dtype=dtype),
            seed=seed,
            progress=progress,
        )
    path = write_report(
        out,
        model=hooked,
        census=result,
        prompt=prompt or DEFAULT_PROMPT,
        heads=chosen or None,
        top_k=top_k,
        evidence=evidence,
        progress=progress,
        **extra,
    )
    typer.echo(f"wrote {path}")


@app.command()
def patch(
    ctx: typer.Context,
    model: str = MODEL,
    adapter: Path = ADAPTER,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path = _out("directory for the CSV files"),
    clean: str = typer.Option(None, "--clean", help="clean prompt (default: the built-in induction pair)"),
    corrupted: str = typer.Option(None, "--corrupted", help="corrupted prompt, same token length as --clean"),
    answer: str = typer.Option(None, "--answer", help="correct next token (default: the clean run's top token)"),
    wrong: str = typer.Option(None, "--wrong", help="wrong next token for a logit-difference metric"),
    activations: str = typer.Option("z", "--activations", help=f"comma list of {', '.join(ACTIVATION_NAMES)}"),
    by_position: bool = typer.Option(False, "--by-position", help="patch one (head, position) at a time"),
    ungroup_kv: bool = typer.Option(False, "--ungroup-kv", help="patch k/v per q head instead of per kv head (GQA)"),
    attribution: bool = typer.Option(True, "--attribution/--no-attribution", help="also run attribution patching"),
    attribution_method: AttributionName = typer.Option(
        AttributionName.atp_star,
        "--attribution-method",
        help="atp, atp* (softmax recomputed) or ig (integrated gradients at 0, 1/4, 1/2, 3/4: a screen, see docs/attribution.md)",
    ),
    n_tokens: int = typer.Option(10, "--n-tokens", help="induction pair: length of the repeated half"),
    n_seqs: int = typer.Option(4, "--n-seqs", help="induction pair: number of sequences"),
    seed: int = SEED,
    runs_per_pass: int = typer.Option(32, "--runs-per-pass", help="patched runs stacked in one forward pass"),
    census_csv: Path = CENSUS_CSV,
    top_k: int = TOP_K,
    progress: bool = PROGRESS,
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
):
    """Activation (and attribution) patching of every head from a clean into a corrupted prompt; writes CSVs.

    effect = (patched - corrupted) / (clean - corrupted) of the metric: 1 = the head alone restores the clean behaviour.
    """
    _validate(locals())
    _check_pair_options(clean, corrupted, answer, wrong, None)
    if clean is not None:
        _refuse(ctx, "to the built-in induction pair (no --clean)", "n_tokens", "n_seqs")
    _start(progress)
    names = [a.strip() for a in activations.split(",") if a.strip()]
    unknown = [a for a in names if a not in ACTIVATION_NAMES]
    if unknown or not names:
        raise HeadlensError(
            f"unknown activation(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(ACTIVATION_NAMES)}"
        )
    twice = sorted({a for a in names if names.count(a) > 1})
    if twice:
        raise HeadlensError(f"--activations names {', '.join(twice)} more than once: give each activation once")
    check_outputs(out, ["attribution.csv"] + [f"patch_{name}.csv" for name in names])
    import pandas as pd

    from headlens.interventions.attribution import attribution_patching, quality_summary, rank_correlation
    from headlens.interventions.patching import activation_patching, induction_pair, text_pair

    hooked = _load(model, adapter, device, dtype, texts={"--clean": clean, "--corrupted": corrupted})
    if clean is None:  # the pair before the census: a pair that cannot be built fails in seconds
        pair = induction_pair(hooked, n_tokens=n_tokens, n_seqs=n_seqs, seed=seed)
    else:
        pair = text_pair(hooked, clean, corrupted, answer=answer, wrong=wrong)
    labels = _labels(hooked, census_csv, seed, progress)
    out.mkdir(parents=True, exist_ok=True)
    attr = None
    if attribution:
        typer.echo(f"attribution patching ({attribution_method.value}) ...", err=True)
        attr = attribution_patching(
            hooked,
            pair,
            activations=names,
            by_position=by_position,
            ungroup_kv=ungroup_kv,
            method=attribution_method.value,
        )
        attr = attr.table
        write_csv(attr, out / "attribution.csv")
    tokens = hooked.to_str_tokens(pair.clean[0])
    typer.echo(
        f"pair: {pair.name}, tokens {tuple(pair.clean.shape)} (sequences x positions), metric: {pair.info.get('metric', 'user metric')}"
    )
    executor = _executor(workers, ray_address, out)
    for name in names:
        result = activation_patching(
            hooked,
            pair,
            activation=name,
            by_position=by_position,
            ungroup_kv=ungroup_kv,
            runs_per_pass=runs_per_pass,
            progress=progress,
            executor=executor if workers or ray_address else None,
        )
        exact = result.table
        write_csv(exact, out / f"patch_{name}.csv")
        if name == names[0]:
            typer.echo(f"metric: clean {result.clean:.4f}, corrupted {result.corrupted:.4f}")
        shown = exact.copy()
        if attr is not None:
            shown["attribution"] = attr.loc[attr["activation"] == name, "effect"].to_numpy()
        ranked = shown.reindex(shown["effect"].abs().sort_values(ascending=False).index).head(top_k)
        rows = []
        for r in ranked.itertuples():
            row = {
                "head": unit_name(r.layer, r.head, r.kv_head),
                "kv": r.kv_head,
                "label": "" if pd.isna(r.head) else labels.get((r.layer, int(r.head)), ""),
            }
            if by_position:
                row["pos"] = r.pos
                row["token (seq 0)"] = repr(tokens[r.pos])
            row["exact effect"] = r.effect
            if attr is not None:
                row["attribution"] = r.attribution
            rows.append(row)
        typer.echo(f"\ntop {len(rows)} by |exact effect| of patching {name} (1 = full recovery of the clean metric)")
        _print_table(pd.DataFrame(rows), {"exact effect": "+.3f", "attribution": "+.3f"})
        if attr is not None and len(exact) > 2:
            quality = quality_summary(shown["effect"], shown["attribution"], top_k=2 * min(10, len(exact) // 2))
            k = quality["recall_k"]
            typer.echo(
                f"{attribution_method.value} vs exact over all {len(exact)} units: spearman "
                f"{rank_correlation(shown['effect'], shown['attribution']):.3f}, pearson {quality['pearson']:.3f}, "
                f"share of the exact top {k} in its top {2 * k} {quality['recall']:.2f}"
            )
    _done(executor, out)
    typer.echo(f"\nwrote CSVs to {out}")


def _metric_options(ctx: typer.Context, metric: MetricName) -> None:
    """The metric options of ablate and prune that the chosen --metric does not read are errors."""
    if metric is MetricName.logit_diff:
        _refuse(ctx, "to --metric loss and repeat (logit-diff reads --prompt)", "n_seqs", "seq_len")
    else:
        _refuse(ctx, "to --metric logit-diff", "prompt", "correct", "wrong")


def _ablation_metric(hooked, metric: MetricName, n_seqs: int, seq_len: int, seed: int, prompt, correct, wrong):
    from headlens.interventions.ablation import build_metric

    return build_metric(
        hooked, metric.value, n_seqs=n_seqs, seq_len=seq_len, seed=seed, prompt=prompt, correct=correct, wrong=wrong
    )


def _metric_unit(name: str) -> str:
    return "logit diff" if name.startswith("logit") else "nats"


@app.command()
def ablate(
    ctx: typer.Context,
    model: str = MODEL,
    adapter: Path = ADAPTER,
    device: str = DEVICE,
    dtype: str = DTYPE,
    metric: MetricName = METRIC,
    out: Path = _out("directory for ablation.csv and ablation.png"),
    method: MethodName = typer.Option(
        MethodName.zero, "--method", help="zero, mean or resample (reference = the metric's tokens)"
    ),
    unit: UnitName = typer.Option(UnitName.head, "--unit", help="head, or kv-group (all q heads reading one kv head)"),
    heads: str = typer.Option(
        "", "--heads", help="instead of a sweep: ablate these heads together, e.g. 'L5H3,12.0', vs random heads"
    ),
    n_random: int = typer.Option(20, "--n-random", help="with --heads: random head sets to compare against"),
    n_seqs: int = typer.Option(4, "--n-seqs", help="sequences in the metric batch"),
    seq_len: int = typer.Option(
        64, "--seq-len", help="tokens per sequence (repeat: a first token, then two copies of seq-len // 2 tokens)"
    ),
    prompt: str = typer.Option(None, "--prompt", help="logit-diff: the prompt"),
    correct: str = typer.Option(None, "--correct", help="logit-diff: the correct next token"),
    wrong: str = typer.Option(None, "--wrong", help="logit-diff: the wrong next token"),
    strategy: StrategyName = typer.Option(
        StrategyName.fast, "--strategy", help="fast (cached residuals, batched) or naive (one forward per head)"
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="max sequences per stacked forward pass"),
    seed: int = SEED,
    census_csv: Path = CENSUS_CSV,
    top_k: int = TOP_K,
    progress: bool = PROGRESS,
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
):
    """Ablate each head (or kv group) alone and measure a metric; writes DIR/ablation.csv and a heatmap PNG.

    effect = ablated - clean metric; worsening = effect / |clean| towards worse (+1 % = 1 % more loss).
    """
    _validate(locals())
    _metric_options(ctx, metric)
    check_outputs(out, ("ablation.csv", "ablation.png", "ablation_vs_random.csv"))
    _start(progress)
    chosen = _parse_heads(heads)
    if chosen:
        _refuse(
            ctx, "to a sweep (without --heads)", "unit", "strategy", "census_csv", "top_k", "workers", "ray_address"
        )
    else:
        _refuse(ctx, "with --heads", "n_random")
    import pandas as pd

    from headlens.heads import format_heads, head_name, kv_group_heads, unit_name
    from headlens.interventions.ablation import ablation_sweep, compare_to_random
    from headlens.render.plots import plot_sweep

    hooked = _load(model, adapter, device, dtype, heads=chosen, texts={"--prompt": prompt})
    m = _ablation_metric(hooked, metric, n_seqs, seq_len, seed, prompt, correct, wrong)
    units = _metric_unit(m.name)
    if chosen:
        a = compare_to_random(
            hooked, m, chosen, n_random=n_random, method=method.value, seed=seed, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        write_csv(a.table, out / "ablation_vs_random.csv")
        typer.echo(f"{m.name} ({units}): clean {a.clean:.4f}; {method.value} ablation of {len(chosen)} heads together")
        _print_table(
            pd.DataFrame(
                [
                    {"heads": "target", "effect": a.target_effect, "worsening": a.target_worsening},
                    {"heads": f"{n_random} random sets (mean)", "effect": float("nan"), "worsening": a.random_mean},
                    {"heads": f"{n_random} random sets (std)", "effect": float("nan"), "worsening": a.random_std},
                ]
            ).rename(columns={"effect": f"effect ({units})"}),
            {f"effect ({units})": "+.4f", "worsening": "+.2%"},
        )
        typer.echo(f"z = {a.z:.2f}; share of random sets at least as bad: {a.p_random_ge:.2f}")
        typer.echo(f"wrote {out / 'ablation_vs_random.csv'}")
        return
    labels = _labels(hooked, census_csv, seed, progress) if unit is UnitName.head else {}
    executor = _executor(workers, ray_address, out)
    sweep = ablation_sweep(
        hooked,
        m,
        method=method.value,
        unit=unit.value.replace("-", "_"),
        strategy=strategy.value,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        executor=executor if workers or ray_address else None,
    )
    _done(executor, out)
    out.mkdir(parents=True, exist_ok=True)
    table = sweep.table
    write_csv(table, out / "ablation.csv")
    plot_sweep(sweep, out / "ablation.png")
    typer.echo(
        f"{m.name} ({units}): clean {sweep.clean:.4f}, tokens {tuple(m.tokens.shape)} (sequences x positions), "
        f"{method.value} ablation of each {unit.value}"
    )
    rows = []
    for r in table.sort_values("worsening", ascending=False).head(top_k).itertuples():
        row = (
            {"head": head_name(r.layer, r.head), "kv": r.kv_head, "label": labels.get((r.layer, r.head), "")}
            if unit is UnitName.head
            else {
                "kv group": unit_name(r.layer, r.head, r.kv_head),
                "q heads": format_heads(kv_group_heads(hooked, r.layer, r.kv_head)),
            }
        )
        row.update({f"ablated ({units})": r.metric, f"effect ({units})": r.effect, "worsening": r.worsening})
        rows.append(row)
    typer.echo(f"top {len(rows)} by worsening:")
    _print_table(pd.DataFrame(rows), {f"ablated ({units})": ".4f", f"effect ({units})": "+.4f", "worsening": "+.2%"})
    typer.echo(f"wrote {out / 'ablation.csv'} and {out / 'ablation.png'}")


@app.command()
def prune(
    ctx: typer.Context,
    model: str = MODEL,
    adapter: Path = ADAPTER,
    device: str = DEVICE,
    dtype: str = DTYPE,
    metric: MetricName = METRIC,
    out: Path = _out("directory for prune_curve.csv, prune_order.csv and prune_curve.png"),
    tolerance: float = typer.Option(
        0.01, "--tolerance", help="largest allowed relative worsening, e.g. 0.01 = 1% more loss"
    ),
    steps: int = typer.Option(24, "--steps", help="grid steps from 0 to all heads"),
    order: OrderName = typer.Option(
        OrderName.gradient, "--order", help="gradient (Michel et al. importance) or ablation (single-head effects)"
    ),
    reestimate: bool = typer.Option(
        True, "--reestimate/--no-reestimate", help="gradient order: re-rank after every step"
    ),
    method: MethodName = typer.Option(
        MethodName.zero, "--method", help="how a removed head is ablated: zero, mean or resample"
    ),
    n_seqs: int = typer.Option(4, "--n-seqs", help="sequences in the metric batch"),
    seq_len: int = typer.Option(
        64, "--seq-len", help="tokens per sequence (repeat: a first token, then two copies of seq-len // 2 tokens)"
    ),
    prompt: str = typer.Option(None, "--prompt", help="logit-diff: the prompt"),
    correct: str = typer.Option(None, "--correct", help="logit-diff: the correct next token"),
    wrong: str = typer.Option(None, "--wrong", help="logit-diff: the wrong next token"),
    seed: int = SEED,
    progress: bool = PROGRESS,
):
    """Prune heads greedily, least important first; writes the curve (CSV + PNG) and the removal order."""
    _validate(locals())
    _metric_options(ctx, metric)
    if order is OrderName.ablation:
        _refuse(ctx, "to --order gradient", "reestimate")
    check_outputs(out, ("prune_curve.csv", "prune_order.csv", "prune_curve.png"))
    _start(progress)
    import pandas as pd

    from headlens.interventions.prune import prune_curve
    from headlens.render.plots import plot_prune_curve

    hooked = _load(model, adapter, device, dtype, texts={"--prompt": prompt})
    m = _ablation_metric(hooked, metric, n_seqs, seq_len, seed, prompt, correct, wrong)
    n_heads = hooked.cfg.n_layers * hooked.cfg.n_heads
    if steps > n_heads:
        typer.echo(f"note: --steps {steps} is more than the model's {n_heads} heads: one grid point per head", err=True)
    result = prune_curve(
        hooked,
        m,
        tolerance=tolerance,
        steps=steps,
        order=order.value,
        reestimate=reestimate,
        method=method.value,
        seed=seed,
        progress=progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result.curve, out / "prune_curve.csv")
    write_csv(result.order, out / "prune_order.csv")
    plot_prune_curve(result, out / "prune_curve.png")
    typer.echo(result.summary())
    units = _metric_unit(m.name)
    grid = result.curve.sort_values("n_removed")
    shown = pd.DataFrame(
        {
            "heads removed": grid.n_removed,
            "fraction": grid.fraction_removed,
            f"{m.name} ({units})": grid.metric,
            "worsening": grid.worsening,
            "within tolerance": ["yes" if w else "no" for w in grid.within_tolerance],
            "point": ["bisection" if r else "grid" for r in grid.refined],
        }
    )
    _print_table(shown, {"fraction": ".1%", f"{m.name} ({units})": ".4f", "worsening": "+.2%"})
    typer.echo(f"wrote {out / 'prune_curve.csv'}, {out / 'prune_order.csv'} and {out / 'prune_curve.png'}")


@app.command("compare")
def compare_cmd(
    base: str = typer.Option(
        "qwen2.5-coder-0.5b",
        "--base",
        help=f"base model: {MODEL_NAMES}; or a local HF directory, .gguf file or cached hub id",
    ),
    tuned: str = typer.Option(
        ..., "--tuned", help="PEFT LoRA adapter directory (merged into --base) or a full fine-tuned model"
    ),
    out: Path = _out("directory for compare.csv and compare.png"),
    census: bool = typer.Option(True, "--census/--no-census", help="also compare census scores and labels"),
    n_seqs: int = typer.Option(
        12, "--n-seqs", help="probe sequences per kind behind the attention change (the census's probes hold 48)"
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    seed: int = SEED,
    top_k: int = typer.Option(10, "--top-k", help="how many most-changed heads to print"),
    progress: bool = PROGRESS,
):
    """Compare a fine-tune with its base head by head: attention change (JSD, bits), weight change, census deltas."""
    _validate(locals())
    check_outputs(out, ("compare.csv", "compare.png"))
    _start(progress)
    from headlens.analysis.compare import compare_models, top_changed
    from headlens.models import load_tuned
    from headlens.render.plots import plot_comparison

    base_model = _load(base, None, device, dtype)
    typer.echo(f"loading tuned {tuned} ...", err=True)
    tuned_model = load_tuned(base_model, tuned, base_source=base, device=device, dtype=dtype)
    df = compare_models(base_model, tuned_model, seed=seed, census=census, n_seqs=n_seqs, progress=progress)
    changed = [c for c in ("dW_Q", "dW_K", "dW_V", "dW_O") if c in df.columns]
    if changed and not df[changed].to_numpy().any():
        typer.echo(f"note: {tuned} has the base's attention weights: every weight change below is zero", err=True)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(df, out / "compare.csv")
    save_figure(plot_comparison(df), out / "compare.png", dpi=110)
    shown = top_changed(df, top_k).copy()
    shown.insert(0, "head name", [head_name(r.layer, r.head) for r in shown.itertuples()])
    cols = [
        c
        for c in ("head name", "kv_head", "jsd", "dW_Q", "dW_K", "dW_V", "dW_O", "label_base", "label_tuned")
        if c in shown.columns
    ]
    typer.echo(
        f"top {len(shown)} heads by attention change (jsd: mean Jensen-Shannon divergence, bits; dW: relative weight change)"
    )
    _print_table(
        shown[cols].rename(columns={"head name": "head", "kv_head": "kv", "jsd": "jsd (bits)"}),
        {"jsd (bits)": ".4f", "dW_Q": ".4f", "dW_K": ".4f", "dW_V": ".4f", "dW_O": ".4f"},
    )
    typer.echo(f"wrote {out / 'compare.csv'} and {out / 'compare.png'}")


@app.command()
def stats(
    model: str = MODEL,
    adapter: Path = ADAPTER,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path = _out("directory for entropy.csv and similarity.csv"),
    temperatures: str = typer.Option(
        "0.5,1,2", "--temperatures", help="comma list; T=1 is the model's own 1/sqrt(d_head) scaling"
    ),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per natural-text window"),
    n_seqs: int = typer.Option(8, "--n-seqs", help="natural-text windows"),
    seed: int = SEED,
    progress: bool = PROGRESS,
):
    """Attention entropy with and without sqrt(d_k) scaling, and head similarity within vs across GQA groups."""
    _validate(locals())
    check_outputs(out, ("entropy.csv", "similarity.csv"))
    _start(progress)
    temps = _temperatures(temperatures)

    from headlens.census.attention_stats import (
        group_contrast_table,
        head_similarity,
        scale_entropy_table,
        scale_settings,
    )
    from headlens.data.probes import natural_text
    from headlens.heads import kv_heads

    scale_settings(1.0, temperatures=temps)
    hooked = _load(model, adapter, device, dtype)
    tokens = natural_text(hooked, seq_len=seq_len, n_seqs=n_seqs, seed=seed).tokens
    entropy = scale_entropy_table(hooked, tokens, temperatures=temps, progress=progress)
    sims = head_similarity(hooked, tokens, metrics=("cosine", "centered"), progress=progress)
    similarity = group_contrast_table(sims, kv_heads(hooked))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(entropy, out / "entropy.csv")
    write_csv(similarity, out / "similarity.csv")
    by_layer = entropy.pivot_table(index="layer", columns="setting", values="entropy")[
        list(dict.fromkeys(entropy.setting))
    ]
    typer.echo(f"mean attention entropy (nats) per layer, {n_seqs} x {seq_len} tokens of natural text:")
    typer.echo(by_layer.round(3).to_string())
    typer.echo(f"wrote {out / 'entropy.csv'} and {out / 'similarity.csv'}")


@app.command("atlas")
def atlas_cmd(
    models: str = typer.Option(
        ...,
        "--models",
        help="comma list of sources: qwen, smollm2, toy, tiny-qwen2, HF dirs, .gguf files, SOURCE+ADAPTER_DIR",
    ),
    out: Path = _out("directory for atlas.html, counts.csv, depth_shares.csv, positions.csv and census_<model>.csv"),
    seeds: int = typer.Option(3, "--seeds", help="probe seeds per model (counts get a min-max interval over them)"),
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
    progress: bool = PROGRESS,
):
    """Census of several models side by side: label shares by relative depth, where induction / previous-token / sink heads sit."""
    _validate(locals())
    _start(progress)
    from headlens.analysis.atlas import atlas, parse_sources
    from headlens.models import resolve_device, resolve_dtype
    from headlens.render.atlas import census_files, write_atlas

    sources = parse_sources(models)
    resolve_device(device), resolve_dtype(dtype)
    tables = ("counts.csv", "depth_shares.csv", "positions.csv", "settings.json", "atlas.html")
    check_outputs(out, (*tables, *census_files(sources).values()))
    executor = _executor(workers, ray_address, out)
    result = atlas(
        sources, seeds=seeds, batch_size=batch_size, device=device, dtype=dtype, executor=executor, progress=progress
    )
    _done(executor, out)
    page = write_atlas(result, out)
    counts = result.counts[result.counts.n_heads > 0]
    _print_table(
        counts.assign(interval=[f"{a}-{b}" for a, b in zip(counts["min"], counts["max"])])[
            ["model", "label", "n_heads", "interval", "share"]
        ],
        {"share": ".1%"},
    )
    typer.echo(f"wrote {page} and the tables beside it")


# ---------------------------------------------------------------- circuit (issue 26)


class CircuitTaskName(str, Enum):
    induction = "induction"
    ioi = "ioi"
    brackets = "brackets"


class AblationName(str, Enum):
    mean = "mean"
    resample = "resample"


CIRCUIT_METHODS = ("eap", "eap-ig")


def _circuit_args(
    task, clean, corrupted, correct, wrong, model: str, ablation, methods: str, check: int, max_edges: int
) -> list[str]:
    """Check the circuit command's arguments before anything is loaded; returns the methods."""
    if (clean is None) != (corrupted is None):
        raise HeadlensError("give both --clean and --corrupted (a user pair), or neither and a --task")
    if task is not None and clean is not None:
        raise HeadlensError("give either --task or a --clean/--corrupted pair, not both")
    if task is None and clean is None:
        raise HeadlensError("give --task induction|ioi|brackets, or a --clean/--corrupted pair with --correct/--wrong")
    if clean is None and (correct is not None or wrong is not None):
        raise HeadlensError(
            "--correct/--wrong go with a --clean/--corrupted pair; the built-in tasks define their answers"
        )
    if clean is not None and ablation is AblationName.mean:
        raise HeadlensError(
            "a user pair has no separate prompts of its task to take means over: pass --ablation resample"
        )
    if model == "toy" and (clean is not None or task is not CircuitTaskName.induction):
        raise HeadlensError("the toy model has no tokenizer: it takes --task induction only")
    if check < 0:
        raise HeadlensError(f"--check must be at least 0 (got {check})")
    if max_edges < 1:
        raise HeadlensError(f"--max-edges must be at least 1 (got {max_edges})")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in CIRCUIT_METHODS]
    if unknown or not names:
        raise HeadlensError(
            f"unknown method(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(CIRCUIT_METHODS)}"
        )
    return names


@app.command("circuit")
def circuit_cmd(
    ctx: typer.Context,
    task: CircuitTaskName = typer.Option(None, "--task", help="built-in task: induction, ioi or brackets"),
    clean: str = typer.Option(None, "--clean", help="a user pair: the clean prompt"),
    corrupted: str = typer.Option(None, "--corrupted", help="a user pair: the corrupted prompt, same token length"),
    correct: str = typer.Option(None, "--correct", help="a user pair: the correct next token (default: clean top)"),
    wrong: str = typer.Option(None, "--wrong", help="a user pair: the wrong next token (logit-difference metric)"),
    model: str = typer.Option(
        "qwen2.5-coder-0.5b",
        "--model",
        "-m",
        help=f"model: {MODEL_NAMES}, toy (the trained toy induction model); or a path",
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path = _out("directory for edges.csv, nodes.csv, faithfulness.csv, circuit.json and circuit.html"),
    ablation: AblationName = typer.Option(
        None, "--ablation", help="what replaces edges outside the circuit: mean (task's mean set; default) or resample"
    ),
    methods: str = typer.Option("eap,eap-ig", "--methods", help="edge attribution methods, comma list of eap, eap-ig"),
    steps: int = typer.Option(5, "--steps", help="EAP-IG: gradient points on the input path"),
    check: int = typer.Option(100, "--check", help="edges of the EAP-IG ranking checked by exact path patching"),
    n_seqs: int = typer.Option(
        None, "--n-seqs", help="prompts of the task (default: the task's: induction 4, ioi 8, brackets 8)"
    ),
    seed: int = SEED,
    census_csv: Path = CENSUS_CSV,
    top_k: int = typer.Option(10, "--top-k", help="how many top edges to print"),
    max_edges: int = typer.Option(40, "--max-edges", help="edges drawn in circuit.html"),
    progress: bool = PROGRESS,
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
):
    """Find the circuit of a task: EAP/EAP-IG over every edge, exact path patching of the top edges, faithfulness curves.

    Edges are sender output -> receiver q/k/v/mlp input or -> logits; score = estimated change of the metric when the
    edge alone is ablated. Faithfulness f(k) = (m(circuit) - m(none)) / (m(full) - m(none)) over k = 0.1 .. 100 % of
    edges, with CPR (area under f) and CMD (area under |1 - f|); see docs/circuits.md.
    """
    _validate(locals())
    _start(progress)
    if ablation is None:
        ablation = AblationName.resample if clean is not None else AblationName.mean
    names = _circuit_args(task, clean, corrupted, correct, wrong, model, ablation, methods, check, max_edges)
    if clean is not None:
        _refuse(ctx, "to a built-in --task (a user pair is one prompt)", "n_seqs")
    if "eap-ig" not in names:
        _refuse(ctx, "to --methods eap-ig", "steps")
    check_outputs(out, ("edges.csv", "nodes.csv", "faithfulness.csv", "circuit.json", "circuit.html"))
    from headlens.circuits.study import find_circuit
    from headlens.circuits.tasks import build_task, pair_task
    from headlens.render.circuit import write_circuit_html

    if model == "toy":
        import torch

        from headlens.analysis.toy import load_induction_model
        from headlens.models import resolve_device, resolve_dtype

        dev, dt = resolve_device(device), resolve_dtype(dtype)
        typer.echo("loading the toy induction model ...", err=True)
        hooked = load_induction_model()
        if (dev, dt) != ("cpu", torch.float32):
            hooked = hooked.to(dev).to(dt)
            hooked.cfg.device = dev
    else:
        hooked = _load(model, None, device, dtype, texts={"--clean": clean, "--corrupted": corrupted})
    if clean is not None:
        circuit_task = pair_task(hooked, clean, corrupted, correct=correct, wrong=wrong)
    else:
        circuit_task = build_task(hooked, task.value, n_seqs=n_seqs, seed=seed)
    if census_csv is not None:
        table = _census_of(hooked, census_csv)
    elif model == "toy":
        from headlens.analysis.toy import toy_probes
        from headlens.census import run_census

        table = run_census(hooked, toy_probes(hooked, seed=seed), progress=progress).table
    else:
        from headlens.census import run_census

        table = run_census(hooked, seed=seed, progress=progress).table
    executor = _executor(workers, ray_address, out) if (workers or ray_address) else None
    result = find_circuit(
        hooked,
        circuit_task,
        methods=names,
        steps=steps,
        check=check,
        ablation=ablation.value,
        census=table,
        executor=executor,
        progress=progress,
    )
    if executor is not None:
        _done(executor, out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(hooked, seed=seed)
    write_csv(result.edges, out / "edges.csv", provenance=prov)
    write_csv(result.nodes, out / "nodes.csv")
    write_csv(result.faithfulness.table, out / "faithfulness.csv")
    from headlens.io import write_json

    write_json(
        out / "circuit.json",
        {**result.info, "summary": result.faithfulness.summary, "provenance": prov},
    )
    write_circuit_html(result, hooked, out / "circuit.html", max_edges=max_edges)
    info = result.info
    typer.echo(
        f"{info['task']}: metric clean {info['clean_metric']:.4f}, all {info['n_edges']} edges ablated ({info['ablation']}) "
        f"{info['ablated_metric']:.4f}; {info['checked']} top edges checked exactly"
    )
    _print_table(result.summary(), {"cpr": ".3f", "cmd": ".3f"})
    shown = result.edges.head(top_k)[
        ["sender", "receiver", "input", "score", "exact", "sender_label", "receiver_label"]
    ]
    typer.echo(
        f"top {len(shown)} edges by |{info['primary']}| (score, exact: change of the metric when the edge alone is ablated):"
    )
    _print_table(shown, {"score": "+.4f", "exact": "+.4f"})
    chosen = info["circuit_method"]
    typer.echo(
        f"circuit: {info['circuit_edges']} edges"
        + (f" ({chosen}, k = {info['circuit_k']:g} %, faithfulness >= 0.8)" if chosen else " (no ranking reached 0.8)")
    )
    typer.echo(f"wrote {out / 'edges.csv'}, nodes.csv, faithfulness.csv, circuit.json and circuit.html")


# ---------------------------------------------------------------- end of circuit (issue 26)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every expected failure (bad input, bad files, OS errors) is one ``error: ...`` line and exit status 1
    (2 when the command line does not parse: unknown option, not an integer, not a choice).

    ``--debug`` anywhere on the command line (or ``HEADLENS_DEBUG=1``) shows the traceback instead; an unexpected
    error (a bug) always shows it.
    """
    import os

    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("HEADLENS_DEBUG", "") not in ("", "0")
    args = _renamed([a for a in args if a != "--debug"])
    try:
        for arg in args:
            arg.encode("utf-8")  # a non-UTF-8 byte in argv arrives as a lone surrogate
        _no_empty_paths(args)
        with _progress.catch_interrupts():  # one Ctrl-C stops it, also where Python drops it (inside a __del__)
            result = app(args or ["--help"], prog_name="headlens", standalone_mode=False)
        if result == 130:  # typer turns Ctrl-C into Exit(130) before it reaches the handler below
            raise KeyboardInterrupt
    except Exception as err:  # noqa: BLE001 - sorted into expected (one line) and unexpected (traceback) below
        message = None if debug else _expected(err, args)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        sys.exit(2 if _is_usage(err) else 1)  # 2: the command line itself is wrong (click's convention)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; no file was left half-written (a rerun resumes from finished shards)", err=True)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


OLD_FLAGS = {
    "--top": (("census", "patch", "ablate", "compare", "circuit"), "--top-k"),
    "--batch": (("patch", "stats"), "--n-seqs"),
    "--batch-size": (("patch",), "--runs-per-pass"),
}
"""Flags renamed to the one vocabulary (n_seqs, batch_size, top_k), still accepted for one release (hidden)."""


PATH_OPTIONS = ("--out", "-o", "--model", "-m", "--models", "--adapter", "--census", "--tuned", "--base", "--circuit")


def _no_empty_paths(args: list[str]) -> None:
    """An empty model or path (``--out ""`` would mean the current directory) is an error."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in PATH_OPTIONS and (value if eq else (args[i + 1] if i + 1 < len(args) else None)) == "":
            raise HeadlensError(f"{flag} is empty: give a path or a name (e.g. --out out/census)")


def _renamed(args: list[str]) -> list[str]:
    """``args`` with the old flags of :data:`OLD_FLAGS` replaced by their new names (a note on stderr for each)."""
    command = next((a for a in args if not a.startswith("-")), "")
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        commands, new = OLD_FLAGS.get(flag, ((), None))
        if command in commands:
            typer.echo(f"note: {flag} is now {new}", err=True)
            arg = new + eq + value
        out.append(arg)
    return out


def _expected(err: BaseException, args: list[str]) -> str | None:
    """The one-line message for an expected failure, or None for a bug (shown with its traceback)."""
    import os

    from headlens.io import STORAGE_HINTS, storage_errno, target_of

    if isinstance(err, HeadlensError):
        return str(err)
    if _is_usage(err):  # a usage error from typer's click: unknown option, not an integer, not a choice
        command = next((a for a in args if not a.startswith("-")), "")
        return f"{err.format_message()} (see: headlens {command + ' ' if command else ''}--help)"
    if isinstance(err, UnicodeEncodeError) and any(_surrogates(a) for a in args):
        bad = next(a for a in args if _surrogates(a))
        return f"argument {bad.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text: pass text and paths in UTF-8"
    if isinstance(err, UnicodeError):
        return f"a file or text is not valid UTF-8 ({err}); pass UTF-8 text"
    code = storage_errno(err)
    if isinstance(err, OSError) or code is not None:  # what the writers did not already turn into one line
        where = getattr(err, "filename", None)
        reason = os.strerror(code) if code is not None else str(err)
        hint = STORAGE_HINTS.get(code, "check the path")
        return f"{reason}: {target_of(where) if where else 'a file of this command'} ({hint})"
    if isinstance(err, MemoryError):
        return "out of memory: use a smaller --batch-size or shorter inputs"
    if type(err).__module__.startswith("pandas") and isinstance(err, ValueError):  # ParserError, EmptyDataError
        return f"could not read a table: {err}"
    return None


def _is_usage(err: BaseException) -> bool:
    return hasattr(err, "format_message") and hasattr(err, "exit_code")


def _surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


if __name__ == "__main__":
    main()

"""Every public size, seed and step count refuses what is not a whole number (``headlens.errors.check_count``).

Before, ``run_census(batch_size=1.5)`` ran with 1 and ``n_boot=2.5`` with 2, ``prune_curve(steps=1.5)`` ran, and
``load_model(n_ctx=4096)`` quietly gave a model of the checkpoint's shorter context: each a number the user did
not ask for. Each case must end in one HeadlensError naming the argument, before any model runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from headlens import HeadlensError, load_model, run_census
from headlens.analysis.atlas import atlas
from headlens.analysis.compare import attention_divergence
from headlens.errors import check_count
from headlens.heads import random_heads
from headlens.interventions.ablation import ablation_sweep, compare_to_random, repeat_loss_metric
from headlens.interventions.patching import activation_patching, induction_pair
from headlens.interventions.prune import prune_curve


@pytest.fixture(scope="module")
def metric(tiny_qwen):
    return repeat_loss_metric(tiny_qwen, n_seqs=2, half_len=8)


CASES = {
    "census batch_size": (lambda m, x: run_census(m, batch_size=1.5, progress=False), "batch_size"),
    "census n_boot": (lambda m, x: run_census(m, n_boot=2.5, progress=False), "n_boot"),
    "census seed": (lambda m, x: run_census(m, seed=1.0, progress=False), "seed"),
    "random sets": (lambda m, x: compare_to_random(m, x, [(1, 0)], n_random=2.5, progress=False), "n_random"),
    "sweep batch_size": (lambda m, x: ablation_sweep(m, x, batch_size=0.5, progress=False), "batch_size"),
    "prune steps": (lambda m, x: prune_curve(m, x, steps=1.5, progress=False), "steps"),
    "patching runs": (
        lambda m, x: activation_patching(m, induction_pair(m, n_seqs=1, n_tokens=4), runs_per_pass=1.5),
        "runs_per_pass",
    ),
    "divergence batch_size": (lambda m, x: attention_divergence(m, m, batch_size=2.5, progress=False), "batch_size"),
    "atlas seeds": (lambda m, x: atlas("tiny-qwen2", seeds=1.5, progress=False), "seeds"),
    "random heads": (lambda m, x: random_heads(m, 1.5), "n"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fractional_sizes_are_refused(case, tiny_qwen, metric, monkeypatch):
    call, name = CASES[case]
    monkeypatch.setattr(type(tiny_qwen), "forward", lambda *a, **k: pytest.fail("ran the model"))
    with pytest.raises(HeadlensError, match=rf"^{name} must be an integer >= \d"):
        call(tiny_qwen, metric)


def test_check_count_takes_numpy_integers_and_refuses_the_rest():
    assert check_count("n", np.int64(3)) == 3 and type(check_count("n", np.int64(3))) is int
    assert check_count("seed", 0, minimum=0) == 0
    for bad in (True, 1.0, "2", None, 0):
        with pytest.raises(HeadlensError, match=r"n must be an integer >= 1 \(got .*\): what it counts"):
            check_count("n", bad, why="what it counts")


def test_one_whole_number_rule_for_counts_and_layers(tiny_qwen):
    """check_count refused a 0-d torch integer that check_layers took, and check_layers took what operator.index
    takes: a one-element tensor and a torch bool (layer True = layer 1). One rule (errors.is_whole) serves both."""
    import torch

    from headlens.heads import check_layers

    assert check_count("n", torch.tensor(3)) == 3 and type(check_count("n", torch.tensor(3))) is int
    assert check_layers(tiny_qwen, [torch.tensor(1), np.int64(0)]) == [0, 1]
    for bad in (torch.tensor([3]), torch.tensor(True), np.bool_(True), torch.tensor(3.0), np.array([2])):
        with pytest.raises(HeadlensError, match="must be an integer"):
            check_count("n", bad)
        with pytest.raises(HeadlensError, match="layers must be whole numbers"):
            check_layers(tiny_qwen, [bad])


def test_n_ctx_defaults_to_the_model_and_is_never_silently_capped():
    assert load_model("tiny-qwen2").cfg.n_ctx == 512  # the tiny checkpoint's own limit (MAX_CTX is 2048)
    assert load_model("tiny-qwen2", n_ctx=64).cfg.n_ctx == 64
    with pytest.raises(HeadlensError, match="n_ctx=1024 is longer than tiny-qwen2's context of 512 tokens"):
        load_model("tiny-qwen2", n_ctx=1024)


# Functions whose integer keyword a fraction may reach without harm, each with the reason.
EXEMPT = {
    ("headlens.census.run", "census_settings", "seed"): "a record of run_census's settings; run_census checks seed",
    ("headlens.census.run", "census_settings", "n_boot"): "a record of run_census's settings; run_census checks n_boot",
    ("headlens.data.corpus", "code_documents", "seed"): "a generator: the check runs at the first document",
    ("headlens.interventions.ablation", "build_metric", "seed"): "only the repeat metric draws, and checks it",
}


def _public_functions():
    import importlib
    import inspect
    import pkgutil

    import headlens

    for info in pkgutil.walk_packages(headlens.__path__, "headlens."):
        if info.name == "headlens.cli":
            continue
        module = importlib.import_module(info.name)
        for name, fn in sorted(vars(module).items()):
            if not name.startswith("_") and inspect.isfunction(fn) and fn.__module__ == info.name:
                yield info.name, name, fn, inspect.signature(fn)


def test_every_public_count_refuses_a_fraction(tiny_qwen, metric, monkeypatch):
    """Walks the package: each public function's integer keyword, given its default + 0.5, must be one
    HeadlensError naming it, before a model runs — so a size added later without a check fails here."""
    pair = induction_pair(tiny_qwen, n_seqs=1, n_tokens=4)
    given = {"model": tiny_qwen, "base": tiny_qwen, "tuned": tiny_qwen, "metric": metric, "pair": pair}
    given |= {"tokens": metric.tokens, "heads": [(1, 0)]}

    def ran(*args, **kwargs):
        raise RuntimeError("ran the model before checking its arguments")

    monkeypatch.setattr(type(tiny_qwen), "forward", ran)
    checked, wrong = set(), []
    for module, name, fn, sig in _public_functions():
        params = sig.parameters.values()
        counts = [p for p in params if type(p.default) is int and (module, name, p.name) not in EXEMPT]
        needed = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not counts or any(p.name not in given for p in needed):
            continue
        args = {p.name: given[p.name] for p in needed}
        for p in counts:
            extra = {"progress": False} if "progress" in sig.parameters else {}
            try:
                fn(**args, **extra, **{p.name: p.default + 0.5})
                wrong.append(f"{module}.{name}({p.name}={p.default + 0.5}) ran")
            except HeadlensError as err:
                if p.name not in str(err) or "integer" not in str(err):
                    wrong.append(f"{module}.{name}({p.name}=...): {err}")
            except Exception as err:  # noqa: BLE001 - the finding: a traceback instead of one clear error
                wrong.append(f"{module}.{name}({p.name}=...): {type(err).__name__}: {err}"[:200])
            checked.add(f"{name}.{p.name}")
    assert not wrong, "\n".join(wrong)
    assert len(checked) >= 100, f"only {len(checked)} integer arguments reached: the walk lost its functions"
    assert {"run_census.n_boot", "prune_curve.steps", "natural_text.n_seqs", "compare_to_random.n_random"} <= checked


# Public functions that take a model argument and may be given something other than a loaded model, with the reason.
NOT_A_MODEL = {
    ("headlens.models", "load_tuned"): "base may be a source name ('qwen') and tuned is an adapter path",
    ("headlens.io", "weights_sha256"): "digests a {name: tensor} dict as well as a model",
    ("headlens.models", "check_adapter"): "reads only base.cfg: merge_adapter checks an HF model through its config",
}


def test_every_public_function_refuses_what_is_not_a_model(tiny_qwen):
    """Each public function of every module that takes a model (``model``, ``base``, ``tuned``) checks it first: a
    name or a path where a loaded model belongs is one HeadlensError naming the argument. Only what headlens exports
    was checked before; of the modules' own functions (``headlens.census.ov.copying_scores``, ``headlens.heads.kv_heads``,
    ...) 92 failed inside (AttributeError, TypeError) or ran, and 29 more answered about another argument."""
    import inspect

    import headlens

    roles = ("model", "base", "tuned")
    exported = [("headlens", name, getattr(headlens, name)) for name in headlens.__all__]
    functions = [(m, n, fn) for m, n, fn, _ in _public_functions()] + exported
    checked, wrong = set(), []
    for module, name, fn in functions:
        if not inspect.isfunction(fn) or (module, name) in NOT_A_MODEL:
            continue
        params = inspect.signature(fn).parameters.values()
        needed = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        for target in [p for p in needed if p in roles]:
            for bad in ("qwen", None):
                args = {p: (tiny_qwen if p in roles else None) for p in needed} | {target: bad}
                try:
                    result = fn(**args)
                    if hasattr(result, "__enter__"):  # a context manager (paths.split_inputs) checks when entered
                        with result:
                            pass
                    wrong.append(f"{module}.{name}({target}={bad!r}) ran")
                except HeadlensError as err:
                    if not str(err).startswith(f"{target} must be a loaded model"):
                        wrong.append(f"{module}.{name}({target}={bad!r}): {err}"[:200])
                except Exception as err:  # noqa: BLE001 - the finding: a traceback instead of one clear error
                    wrong.append(f"{module}.{name}({target}={bad!r}): {type(err).__name__}: {err}"[:200])
            checked.add(f"{module}.{name}.{target}")
    assert not wrong, "\n".join(wrong)
    assert len(checked) >= 150, f"only {len(checked)} model arguments reached: the walk lost its functions"
    assert {
        "headlens.run_census.model",
        "headlens.census.ov.copying_scores.model",
        "headlens.heads.kv_heads.model",
    } <= checked

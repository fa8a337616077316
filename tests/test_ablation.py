from dataclasses import replace

import pytest
import torch
from transformer_lens.utilities import get_act_name

from headlens import HeadlensError, tiny_model
from headlens.data.probes import default_probes
from headlens.engine.intervene import Metric
from headlens.interventions.ablation import (
    METHODS,
    ablated_metric,
    ablation_hooks,
    ablation_sweep,
    clean_metric,
    compare_to_random,
    custom_metric,
    head_importance,
    kv_group_heads,
    logit_diff_metric,
    loss_metric,
    random_heads,
    random_sets,
    repeat_loss_metric,
    run_ablated,
)
from headlens.interventions.prune import prune_curve
from headlens.render.plots import plot_prune_curve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="module")
def tiny64():
    return tiny_model("qwen2", seed=1).to(torch.float64)


@pytest.fixture(scope="module")
def loss(tiny):
    return loss_metric(tiny, n_seqs=3, seq_len=20)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("unit", ["head", "kv_group"])
def test_fast_sweep_equals_naive_loop(tiny, loss, method, unit):
    fast = ablation_sweep(tiny, loss, method=method, unit=unit, batch_size=5, progress=False).table
    naive = ablation_sweep(tiny, loss, method=method, unit=unit, strategy="naive", progress=False).table
    n_units = 2 * (4 if unit == "head" else 2)
    assert len(fast) == len(naive) == n_units
    assert (fast.metric - naive.metric).abs().max() <= 1e-4
    assert fast.effect.abs().max() > 1e-3  # the ablations do something
    by_hand = [
        ablated_metric(
            tiny,
            loss,
            [(r.layer, r.head)] if unit == "head" else kv_group_heads(tiny, r.layer, r.kv_head),
            method=method,
        )
        for r in fast.itertuples()
    ]
    assert max(abs(a - b) for a, b in zip(by_hand, fast.metric)) <= 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_fast_sweep_equals_naive_on_repeat_and_logit_diff(tiny, method):
    repeat = repeat_loss_metric(tiny, n_seqs=2, half_len=8, seed=3)
    diff = logit_diff_metric(tiny, ["the cat sat on", "it is a test of the"], [(" the", " a"), (" of", " and")])
    for metric in (repeat, diff):
        fast = ablation_sweep(tiny, metric, method=method, batch_size=3, progress=False).table
        naive = ablation_sweep(tiny, metric, method=method, strategy="naive", progress=False).table
        assert (fast.metric - naive.metric).abs().max() <= 1e-4


@torch.no_grad()
def test_metrics_match_hand_computation(tiny):
    loss = loss_metric(tiny, n_seqs=2, seq_len=12)
    assert clean_metric(tiny, loss) == pytest.approx(float(tiny(loss.tokens, return_type="loss").detach()), abs=1e-6)
    repeat = repeat_loss_metric(tiny, n_seqs=2, half_len=6, seed=1)
    toks = repeat.tokens
    assert toks.shape == (2, 13) and torch.equal(toks[:, 1:7], toks[:, 7:])
    logp = tiny(toks).log_softmax(-1)
    # predictions of A2..A6 in the second half: from positions 7..11 of the next tokens 8..12
    by_hand = -torch.stack([logp[b, j, toks[b, j + 1]] for b in range(2) for j in range(7, 12)]).mean()
    assert clean_metric(tiny, repeat) == pytest.approx(float(by_hand), abs=1e-5)
    prompts, answers = ["the cat sat on", "it is"], [(" the", " a"), (" of", " and")]
    diff = logit_diff_metric(tiny, prompts, answers)
    expect = []
    for prompt, (good, bad) in zip(prompts, answers):
        last = tiny(tiny.to_tokens(prompt, prepend_bos=False))[0, -1]
        expect.append(last[tiny.to_single_token(good)] - last[tiny.to_single_token(bad)])
    assert clean_metric(tiny, diff) == pytest.approx(float(sum(expect) / 2), abs=1e-5)
    assert diff.higher_is_better and diff.worsening(1.0, 2.0) == pytest.approx(0.5)


def test_zero_ablation_zeroes_only_that_head(tiny, loss):
    seen = {}

    def keep(z, hook):
        seen[hook.name] = z.clone()

    names = [get_act_name("z", l) for l in range(2)]
    tiny.run_with_hooks(loss.tokens, fwd_hooks=[(n, keep) for n in names])
    clean = dict(seen)
    hooks = ablation_hooks(tiny, [(1, 2)]) + [(n, keep) for n in names]
    tiny.run_with_hooks(loss.tokens, fwd_hooks=hooks)
    assert torch.equal(seen[names[0]], clean[names[0]])
    assert torch.all(seen[names[1]][:, :, 2] == 0)
    assert torch.equal(seen[names[1]][:, :, [0, 1, 3]], clean[names[1]][:, :, [0, 1, 3]])


def test_mean_and_resample_values(tiny, loss):
    z = {}
    tiny.run_with_hooks(
        loss.tokens, fwd_hooks=[(get_act_name("z", 0), lambda t, hook: z.__setitem__("clean", t.clone()))]
    )
    ref = z["clean"]
    for method in ("mean", "resample"):
        hooks = ablation_hooks(tiny, [(0, 1)], method=method, reference=loss.tokens, seed=7)
        tiny.run_with_hooks(
            loss.tokens,
            fwd_hooks=hooks + [(get_act_name("z", 0), lambda t, hook: z.__setitem__(method, t.clone()))],  # noqa: B023
        )
    mean = ref[:, :, 1].mean(dim=(0, 1))
    assert torch.allclose(z["mean"][:, :, 1], mean.expand_as(z["mean"][:, :, 1]))
    # resample: every sequence gets another sequence's z for that head (a cyclic permutation, no fixed point)
    got = z["resample"][:, :, 1]
    rows = [next(j for j in range(3) if torch.equal(got[b], ref[j, :, 1])) for b in range(3)]
    assert sorted(rows) == [0, 1, 2] and all(r != b for b, r in enumerate(rows))


def test_ablating_nothing_changes_nothing(tiny, loss):
    clean = clean_metric(tiny, loss)
    # resampling from a reference whose sequences are all identical to the batch's leaves z unchanged
    same = loss.tokens[:1].repeat(3, 1)
    metric = custom_metric(same, loss.fn)
    sweep = ablation_sweep(tiny, metric, method="resample", progress=False).table
    assert sweep.effect.abs().max() == 0
    # the gated forward of the importance pass (all gates 1) is the clean model
    assert head_importance(tiny, loss).clean == pytest.approx(clean, abs=1e-6)
    # the prune curve starts at the clean metric
    result = prune_curve(tiny, loss, steps=2, progress=False)
    assert result.curve.metric.iloc[0] == clean
    # restarting from the cached residual without an ablation reproduces the logits
    cache = {}
    logits = tiny.run_with_hooks(
        loss.tokens, fwd_hooks=[(get_act_name("resid_pre", 1), lambda r, hook: cache.setdefault(1, r.clone()))]
    )
    assert torch.equal(tiny(cache[1], start_at_layer=1), logits)


def test_zero_kv_group_equals_zeroing_shared_v(tiny, loss):
    assert kv_group_heads(tiny, 1, 1) == [(1, 2), (1, 3)]
    by_z = run_ablated(tiny, loss.tokens, kv_group_heads(tiny, 1, 1))

    def zero_v(v, hook):
        v[:, :, 1] = 0
        return v

    by_v = tiny.run_with_hooks(loss.tokens, fwd_hooks=[(get_act_name("v", 1), zero_v)])
    assert torch.allclose(by_z, by_v, atol=1e-5)
    once = run_ablated(tiny, loss.tokens, iter(kv_group_heads(tiny, 1, 1)))  # heads as a one-pass iterator
    assert torch.equal(once, by_z)


def _gated_metric(model, metric, layer, head, xi, method, rows=slice(None)):
    tokens = metric.tokens[rows]
    repl = {}
    if method == "mean":

        def keep(z, hook):
            repl["m"] = z[:, :, head].mean((0, 1))

        model.run_with_hooks(metric.tokens, fwd_hooks=[(get_act_name("z", layer), keep)])

    def gate(z, hook):
        z = z.clone()
        base = repl["m"] if method == "mean" else 0.0
        z[:, :, head] = xi * z[:, :, head] + (1 - xi) * base
        return z

    logits = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("z", layer), gate)])
    return float(metric.at(tokens).full(logits).detach())


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_gradient_importance_matches_finite_differences(tiny64, method):
    metric = loss_metric(tiny64, n_seqs=3, seq_len=16)
    table = head_importance(tiny64, metric, method=method).table.set_index(["layer", "head"])
    eps = 1e-4
    for layer, head in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        fd = (
            _gated_metric(tiny64, metric, layer, head, 1 + eps, method)
            - _gated_metric(tiny64, metric, layer, head, 1 - eps, method)
        ) / (2 * eps)
        assert table.loc[(layer, head), "gradient"] == pytest.approx(fd, rel=1e-5, abs=1e-8)
        per_seq = [
            (
                _gated_metric(tiny64, metric, layer, head, 1 + eps, method, slice(b, b + 1))
                - _gated_metric(tiny64, metric, layer, head, 1 - eps, method, slice(b, b + 1))
            )
            / (2 * eps)
            for b in range(3)
        ]
        assert table.loc[(layer, head), "importance"] == pytest.approx(sum(map(abs, per_seq)) / 3, rel=1e-5, abs=1e-8)


def test_gradient_predicts_small_ablation_effects(tiny64):
    """-gradient is the first-order effect of ablating: check against a half-way gate (ξ = 0.99)."""
    metric = repeat_loss_metric(tiny64, n_seqs=2, half_len=8)
    table = head_importance(tiny64, metric).table.set_index(["layer", "head"])
    base = clean_metric(tiny64, metric)
    moved = _gated_metric(tiny64, metric, 1, 0, 0.99, "zero")
    assert (moved - base) == pytest.approx(-0.01 * table.loc[(1, 0), "gradient"], rel=1e-2)


def test_prune_curve_greedy_order_and_refinement(tiny, loss):
    result = prune_curve(tiny, loss, tolerance=0.004, steps=2, progress=False)
    curve, order = result.curve, result.order
    assert sorted(zip(order.layer, order["head"])) == [(l, h) for l in range(2) for h in range(4)]
    assert list(curve.n_removed[~curve.refined]) == [0, 4, 8]
    # every reported point is measured, and the answer is a measured point within tolerance
    for row in curve.itertuples():
        heads = list(zip(order.layer, order["head"]))[: row.n_removed]
        expect = clean_metric(tiny, loss) if not heads else ablated_metric(tiny, loss, heads)
        assert row.metric == pytest.approx(expect, abs=1e-6)
    best = curve[curve.n_removed == result.max_removed]
    assert bool(best.within_tolerance.iloc[0])
    bigger = curve[curve.n_removed > result.max_removed]
    assert not bigger.empty and not bigger.within_tolerance.any()
    # first step ranks by the full model's gradient importance
    imp = head_importance(tiny, loss).table.sort_values(["importance", "layer", "head"])
    assert list(zip(order.layer, order["head"]))[:4] == list(zip(imp.layer, imp["head"]))[:4]


def test_prune_plot_and_orders(tiny, loss, tmp_path):
    a = prune_curve(tiny, loss, steps=4, order="ablation", progress=False)
    sweep = ablation_sweep(tiny, loss, progress=False).table.sort_values(["worsening", "layer", "head"])
    assert list(zip(a.order.layer, a.order["head"])) == list(zip(sweep.layer, sweep["head"]))
    b = prune_curve(tiny, loss, steps=4, reestimate=False, progress=False)
    imp = head_importance(tiny, loss).table.sort_values(["importance", "layer", "head"])
    assert list(zip(b.order.layer, b.order["head"])) == list(zip(imp.layer, imp["head"]))
    plot_prune_curve(b, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "removable within" in b.summary()


def test_compare_to_random_and_determinism(tiny):
    metric = repeat_loss_metric(tiny, n_seqs=2, half_len=8)
    t1 = compare_to_random(tiny, metric, [(1, 0), (1, 3)], n_random=4, progress=False, seed=1)
    t2 = compare_to_random(tiny, metric, [(1, 0), (1, 3)], n_random=4, progress=False, seed=1)
    assert t1.table.equals(t2.table) and replace(t1, table=None) == replace(t2, table=None)
    t1 = t1.table
    assert list(t1.kind) == ["target"] + ["random"] * 4
    assert all("L1H0" not in h and "L1H3" not in h for h in t1.heads[1:])
    assert t1.metric.iloc[0] == pytest.approx(ablated_metric(tiny, metric, [(1, 0), (1, 3)]))
    assert random_heads(tiny, 2, like=[(1, 0), (1, 3)], exclude=[(1, 0), (1, 3)], seed=0) == [(1, 1), (1, 2)]
    s1 = ablation_sweep(tiny, metric, method="resample", seed=5, progress=False).table
    s2 = ablation_sweep(tiny, metric, method="resample", seed=5, progress=False).table
    assert s1.equals(s2)


def test_random_sets_are_distinct_and_an_error_says_when_too_few_exist(tiny):
    """One head of a 4-head layer has 3 layer-mates: 3 layer-matched sets exist, and a set drawn twice would count as
    new evidence in the mean, the z-score and the share at least as bad."""
    metric = repeat_loss_metric(tiny, n_seqs=2, half_len=8)
    got = compare_to_random(tiny, metric, [(1, 0)], n_random=3, match_layers=True, progress=False)
    assert sorted(got.table.heads[1:]) == ["L1H1", "L1H2", "L1H3"]
    with pytest.raises(HeadlensError, match="only 3 distinct sets of 1 random heads in the same layers"):
        compare_to_random(tiny, metric, [(1, 0)], n_random=4, match_layers=True, progress=False)
    with pytest.raises(HeadlensError, match="n_random must be an integer >= 2"):
        compare_to_random(tiny, metric, [(1, 0)], n_random=1, progress=False)
    sets = random_sets(tiny, [(1, 0)], 20, lambda i: i, max_draws=1000)  # the causal checks: all there are
    assert sorted(map(tuple, sets)) == [((1, 1),), ((1, 2),), ((1, 3),)]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, t: ablation_hooks(m, []), "no heads"),
        (lambda m, t: ablation_hooks(m, [(2, 0)]), "out of range"),
        (lambda m, t: ablation_hooks(m, [(0, 4)]), "out of range"),
        (lambda m, t: ablation_hooks(m, [(0, -1)]), "out of range"),
        (lambda m, t: ablation_hooks(m, [0, 1]), "pairs"),
        (lambda m, t: ablation_hooks(m, [(0, 1)], method="mean"), "reference"),
        (lambda m, t: ablation_hooks(m, [(0, 1)], method="resample", reference=t[:1]), "at least 2"),
        (lambda m, t: ablation_hooks(m, [(0, 1)], method="average", reference=t), "unknown ablation method"),
        (lambda m, t: ablated_metric(m, lambda logits, toks: logits.mean(), [(0, 1)]), "needs tokens"),
        (lambda m, t: ablated_metric(m, lambda logits, toks: logits, [(0, 1)], tokens=t), "scalar"),
        (lambda m, t: ablation_sweep(m, custom_metric(t, lambda lg, tk: lg.mean()), unit="group").table, "unit"),
        (lambda m, t: ablation_sweep(m, custom_metric(t, lambda lg, tk: lg.mean()), layers=[5]).table, "out of range"),
        (lambda m, t: ablation_sweep(m, custom_metric(t, lambda lg, tk: lg.mean()), strategy="slow").table, "strategy"),
        (lambda m, t: kv_group_heads(m, 0, 2), "kv head 2"),
        (lambda m, t: custom_metric(t.float(), lambda lg, tk: lg.mean()), "integer token"),
        (lambda m, t: run_ablated(m, t, [(0, 0)], method="resample", reference=t[:, :5]), "positions"),
        (lambda m, t: loss_metric(m, n_seqs=100, seq_len=512), "fewer than"),
        (lambda m, t: logit_diff_metric(m, "the cat", (" the", " elephantine")), "single-token"),
        (lambda m, t: random_heads(m, 9), "cannot draw"),
        (lambda m, t: prune_curve(m, custom_metric(t, lambda lg, tk: lg.mean()), tolerance=-1), "tolerance"),
        (lambda m, t: prune_curve(m, custom_metric(t, lambda lg, tk: lg.mean()), order="random"), "order"),
    ],
)
def test_bad_input_raises_clear_error(tiny, loss, call, message):
    with pytest.raises(HeadlensError, match=message):
        call(tiny, loss.tokens)


def test_cli_ablate_and_prune_write_files(tmp_path, capsys, monkeypatch):
    import sys

    import pandas as pd
    from typer.testing import CliRunner

    from headlens.cli import app, main

    run = CliRunner().invoke(
        app,
        [
            "ablate",
            "-m",
            "tiny-qwen2",
            "--out",
            str(tmp_path / "a"),
            "--seq-len",
            "20",
            "--n-seqs",
            "3",
            "--no-progress",
            "--top-k",
            "3",
        ],
    )
    assert run.exit_code == 0, run.output
    table = pd.read_csv(tmp_path / "a" / "ablation.csv")
    assert len(table) == 8 and {"layer", "head", "kv_head", "metric", "effect", "worsening"} <= set(table.columns)
    assert (tmp_path / "a" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "top 3 by worsening" in run.output
    run = CliRunner().invoke(
        app,
        [
            "prune",
            "-m",
            "tiny-qwen2",
            "--out",
            str(tmp_path / "p"),
            "--steps",
            "2",
            "--seq-len",
            "20",
            "--n-seqs",
            "3",
            "--no-progress",
        ],
    )
    assert run.exit_code == 0, run.output
    assert len(pd.read_csv(tmp_path / "p" / "prune_order.csv")) == 8
    assert (tmp_path / "p" / "prune_curve.png").is_file() and "removable within 1.0%" in run.output
    monkeypatch.setattr(
        sys, "argv", ["headlens", "ablate", "-m", "tiny-qwen2", "--out", str(tmp_path / "b"), "--method", "average"]
    )
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2  # a click choice: checked before anything loads
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert "'average' is not one of" in err and "'resample'" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_qwen_sweep_parity_and_induction_heads_matter(qwen):
    """Real Qwen: fast == naive on kv groups of two layers; top induction-score heads vs random heads."""
    metric = repeat_loss_metric(qwen, n_seqs=2, half_len=16, seed=0)
    fast = ablation_sweep(qwen, metric, unit="kv_group", method="mean", layers=[0, 23], progress=False).table
    naive = ablation_sweep(
        qwen, metric, unit="kv_group", method="mean", layers=[0, 23], strategy="naive", progress=False
    ).table
    assert (fast.metric - naive.metric).abs().max() <= 1e-4

    half = 16
    scores = torch.zeros(qwen.cfg.n_layers, qwen.cfg.n_heads)

    def induction(pattern, hook):
        q = torch.arange(1 + half, 1 + 2 * half)  # second half of [P, A1..An, A1..An]; A_i attends to the first A_(i+1)
        scores[hook.layer()] = pattern[:, :, q, q - half + 1].mean((0, 2))

    with torch.inference_mode():
        qwen.run_with_hooks(metric.tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), induction)])
    top = [(int(i) // qwen.cfg.n_heads, int(i) % qwen.cfg.n_heads) for i in scores.flatten().topk(6).indices]
    # depth-matched control: random heads from the same layers (an unmatched draw can hit a layer-0 head whose
    # removal breaks everything, which says nothing about copying)
    table = compare_to_random(qwen, metric, top, n_random=5, match_layers=True, progress=False)
    print(top, table, table.table.to_string(), sep="\n")
    assert table.clean < 2.0  # Qwen copies the repeated half
    assert table.p_random_ge == 0.0
    assert table.target_worsening > 2 * max(table.random_mean, 0.05)


def test_prune_answer_agrees_with_its_curve_and_plot_ticks_read_as_percent(tiny, loss):
    """Every point up to the reported count is within tolerance (the curve need not be monotone: the answer is
    taken before the curve first leaves the tolerance), and the symlog axis reads "+1%", not "10^0"."""
    for tolerance in (0.0, 0.002, 0.01, 0.05):
        result = prune_curve(tiny, loss, tolerance=tolerance, steps=8, order="ablation", progress=False)
        upto = result.curve[result.curve.n_removed <= result.max_removed]
        assert upto.within_tolerance.all(), (tolerance, result.curve)
    fig = plot_prune_curve(result)
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels and all(
        t.endswith("%") and "10" not in t.replace("+10%", "").replace("-10%", "") for t in labels if t
    )


def test_metric_repr_shows_the_token_shape_not_the_tokens(tiny, loss):
    text = repr(loss)
    assert text.startswith(f"Metric({loss.name!r}, tokens {tuple(loss.tokens.shape)}") and "tensor(" not in text


def test_stacked_runs_give_the_same_metrics_whatever_the_budgets(tiny_qwen, monkeypatch):
    """How many runs share a forward (TOKENS_BUDGET) and how many are unembedded at once (LOGITS_BUDGET) change
    nothing but speed and memory."""
    from headlens.engine import intervene
    from headlens.interventions.ablation import ablated_metrics

    metric = loss_metric(tiny_qwen, n_seqs=3, seq_len=24)
    sets = [[(0, 0)], [(0, 1), (1, 2)], [(1, 3)], [(0, 2), (1, 0)], [(1, 1)]]
    base = ablated_metrics(tiny_qwen, metric, sets, method="mean", reference=metric.tokens, batch_size=64)
    monkeypatch.setattr(intervene, "TOKENS_BUDGET", 1)  # one run per forward
    monkeypatch.setattr(intervene, "LOGITS_BUDGET", 1)  # one run unembedded at a time
    one = ablated_metrics(tiny_qwen, metric, sets, method="mean", reference=metric.tokens, batch_size=64)
    assert one[0] == pytest.approx(base[0], abs=1e-6)
    assert one[1] == pytest.approx(base[1], abs=1e-5)


def test_token_ids_outside_the_vocabulary_are_refused(tiny):
    """An id of -1 read W_E[-1] (the embedding table from its end) and gave a plausible metric; an id past the
    vocabulary was an IndexError inside TransformerLens; metric positions past the tokens another."""
    good = torch.randint(0, tiny.cfg.d_vocab, (2, 8))
    fn = lambda logits, tokens: logits[..., 0].mean()  # noqa: E731
    for bad, shown in ((-1, "-1"), (tiny.cfg.d_vocab, str(tiny.cfg.d_vocab))):
        tokens = good.clone()
        tokens[0, 3] = bad
        calls = (
            lambda t: clean_metric(tiny, custom_metric(t, fn)),
            lambda t: ablation_sweep(tiny, custom_metric(t, fn), progress=False),
            lambda t: ablated_metric(tiny, custom_metric(good, fn), [(1, 0)], method="mean", reference=t),
        )
        for call in calls:
            with pytest.raises(HeadlensError, match=f"token id {shown} is not in this model's vocabulary"):
                call(tokens)
    with pytest.raises(HeadlensError, match=r"metric positions \[20\] are outside the 8 token positions"):
        Metric("x", good, fn, positions=torch.tensor([20]))


def test_repeat_metric_reads_the_census_probe_per_sequence(tiny):
    """The census's repeated probe varies its half-length per sequence; repeat_loss_metric(probe=) was a TypeError.
    Each sequence's loss is read from its own second copy on."""
    probe = default_probes(tiny, seed=0, n_seqs=3, kinds=["repeated"])["repeated"]
    assert len(set(probe.n_per_seq.tolist())) > 1
    metric = repeat_loss_metric(tiny, probe=probe)
    with torch.inference_mode():
        logprobs = tiny(probe.tokens).log_softmax(-1)
    losses = [
        -logprobs[b, range(int(s), probe.seq_len - 1), probe.tokens[b, int(s) + 1 :]]
        for b, s in enumerate(probe.seq_len - probe.n_per_seq)
    ]
    assert clean_metric(tiny, metric) == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)
    with pytest.raises(HeadlensError, match="probe= or n_seqs/half_len/seed, not both"):
        repeat_loss_metric(tiny, probe=probe, half_len=8)  # the probe's own half-lengths would be used silently


def test_metric_positions_given_twice_fractional_layers_and_an_infinite_tolerance_are_refused(tiny, monkeypatch):
    """A position listed twice (also as -1 and n - 1) weighed it twice in the metric; layers=[0.5] swept layer 0;
    prune_curve(tolerance=inf) called every head removable (the CLI refused it), a string was a TypeError."""
    good = torch.randint(0, tiny.cfg.d_vocab, (2, 8))
    fn = lambda logits, tokens: logits[..., 0].mean()  # noqa: E731
    with pytest.raises(HeadlensError, match=r"metric positions \[7, -1\] name a position twice"):
        Metric("x", good, fn, positions=torch.tensor([7, -1]))
    assert Metric("x", good, fn, positions=torch.tensor([-1, 2])).positions.tolist() == [7, 2]
    metric = custom_metric(good, fn)
    monkeypatch.setattr(type(tiny), "forward", lambda *a, **k: pytest.fail("ran the model"))
    for layers in ([0.5], [True], 1, "1"):
        with pytest.raises(HeadlensError, match="layers must be"):
            ablation_sweep(tiny, metric, layers=layers, progress=False)
    for tolerance in (float("inf"), float("nan"), "0.01", True):
        with pytest.raises(HeadlensError, match="tolerance must be a finite number >= 0"):
            prune_curve(tiny, metric, tolerance=tolerance, progress=False)


def test_zero_ablation_refuses_a_reference_at_every_entry_and_the_causal_checks_still_run_it(tiny, loss):
    t = loss.tokens
    calls = {
        "ablation_hooks": lambda: ablation_hooks(tiny, [(0, 1)], reference=t),
        "run_ablated": lambda: run_ablated(tiny, t, [(0, 1)], reference=t),
        "ablated_metric": lambda: ablated_metric(tiny, loss, [(0, 1)], reference=t),
        "compare_to_random": lambda: compare_to_random(tiny, loss, [(0, 1)], n_random=2, reference=t, progress=False),
        "ablation_sweep": lambda: ablation_sweep(tiny, loss, reference=t, progress=False),
        "head_importance": lambda: head_importance(tiny, loss, reference=t),
        "prune_curve": lambda: prune_curve(tiny, loss, steps=2, reference=t, progress=False),
    }
    for call in calls.values():  # each used to ignore the reference and answer for zero ablation
        with pytest.raises(HeadlensError, match="zero ablation reads no reference"):
            call()
    from test_census import planted_model

    from headlens.census.run import run_census
    from headlens.census.validate import causal_validation

    model = planted_model()  # the checks hold a reference per task and must not pass it to zero ablation
    table = run_census(model, default_probes(model, seed=0, n_seqs=4, n=16, seq_len=40), progress=False, n_boot=0).table
    zero = causal_validation(model, table, labels=["induction"], method="zero", n_random=3, n_seqs=2, progress=False)
    assert zero["verdict"].tolist()[0] in ("supported", "no evidence") and zero["clean"].notna().all()

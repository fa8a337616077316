"""The toy attention-only model: induction heads form abruptly, and the census finds the circuit.

Ground truth comes from the packaged checkpoint (trained by ``analyses/induction_phase_change.py``
with ``headlens.analysis.toy.TRAIN_DEFAULTS``) and the history recorded while it trained; a short re-run of
the same training must reproduce that history exactly, which ties the packaged files to the code.
"""

import pandas as pd
import pytest
import torch
from transformer_lens import utils

from headlens.analysis import toy
from headlens.census import scores
from headlens.errors import HeadlensError


@pytest.fixture(scope="module")
def model():
    return toy.load_induction_model()


@pytest.fixture(scope="module")
def circuit():
    return toy.circuit_heads()


@pytest.fixture(scope="module")
def history():
    return toy.load_induction_history()


def head_scores(model, *, seed=123, hooks=()):
    """Induction and previous-token score of every head, [layer, head], on fresh [A A] probes."""
    probes = toy.toy_probes(model, seed=seed)
    tokens, n = probes.repeated.tokens, probes.repeated.n
    out = {
        "induction": torch.zeros(model.cfg.n_layers, model.cfg.n_heads),
        "previous_token": torch.zeros(model.cfg.n_layers, model.cfg.n_heads),
    }

    def record(pattern, hook):
        out["induction"][hook.layer()] = scores.induction(pattern, n)
        out["previous_token"][hook.layer()] = scores.previous_token(pattern)

    fwd = [*hooks, *[(utils.get_act_name("pattern", l), record) for l in range(model.cfg.n_layers)]]
    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=fwd)
    return out


def test_packaged_checkpoint_matches_train_defaults(model):
    cfg = model.cfg
    d = toy.TRAIN_DEFAULTS
    assert cfg.attn_only and cfg.n_layers == d["n_layers"] == 2
    assert (cfg.n_heads, cfg.d_model, cfg.d_vocab, cfg.n_ctx) == (
        d["n_heads"],
        d["d_model"],
        d["d_vocab"],
        d["seq_len"],
    )
    assert model.tokenizer is None
    assert toy.checkpoint_path().stat().st_size < 2_000_000


def test_trained_model_has_induction_head_in_layer1_and_previous_token_head_in_layer0(model, circuit):
    s = head_scores(model)
    layer1 = s["induction"][1]
    assert circuit["induction"][0] == 1 and circuit["previous_token"][0] == 0
    assert int(layer1.argmax()) == circuit["induction"][1]
    assert float(layer1.max()) > 0.5
    assert float(s["induction"][0].max()) < 0.1  # layer 0 cannot do induction (no composition)
    layer0 = s["previous_token"][0]
    assert int(layer0.argmax()) == circuit["previous_token"][1]
    assert float(layer0.max()) > 0.5


def test_induction_head_reads_its_previous_token_partner(model, circuit):
    """K-composition: zero-ablating the layer-0 previous-token head breaks the induction head; another layer-0 head does not."""
    layer, head = circuit["induction"]
    partner = circuit["previous_token"][1]

    def ablate(h):
        def hook(z, hook):
            z[:, :, h] = 0.0
            return z

        return [(utils.get_act_name("z", 0), hook)]

    base = float(head_scores(model)["induction"][layer, head])
    after = [float(head_scores(model, hooks=ablate(h))["induction"][layer, head]) for h in range(model.cfg.n_heads)]
    assert base > 0.5
    assert after[partner] < 0.05  # 0.000: the induction head is gone
    assert all(a > 0.9 * base for h, a in enumerate(after) if h != partner)  # 0.539, 0.561, 0.549 vs 0.532


def test_phase_change_is_abrupt_and_coincides_with_induction(history, circuit):
    found = toy.phase_change(history)
    # packaged run (6000 steps): plateau 4.16 nats (= log 64, chance) until ~1650, then 80% of the
    # fall to 1.78 within 1650..2600; best prefix-matching score 0.04 -> 0.48 in that same window,
    # first >= 0.5 at step 2650 (L1H2).
    assert found["loss_plateau"] - found["loss_final"] >= 2.0
    assert found["window_steps"] <= 0.2 * found["total_steps"]
    assert found["window_start"] >= 0.2 * found["total_steps"]  # a real plateau comes first
    assert found["score_at_window_start"] < 0.1
    assert found["score_rise_in_window"] >= 0.7
    assert found["induction_head"] == "L{}H{}".format(*circuit["induction"])
    assert found["window_start"] <= found["induction_step"] <= found["window_end"] + found["tolerance"]
    assert found["coincide"] is True
    before = history[history["step"] < found["window_start"]]
    assert before[toy.head_columns(history)].to_numpy().max() < 0.1  # no induction head before the drop
    assert history[toy.head_columns(history, kind="previous_token", layer=0)].iloc[-1].max() > 0.5


def test_short_rerun_reproduces_packaged_history(history):
    steps = 2 * toy.TRAIN_DEFAULTS["record_every"]
    _, short = toy.train_induction_model(**{**toy.TRAIN_DEFAULTS, "steps": steps}, progress=False)
    packaged = history[history["step"] <= steps].reset_index(drop=True)
    pd.testing.assert_frame_equal(short, packaged, check_exact=False, rtol=1e-4, atol=1e-5)


def test_same_seed_same_history_other_seed_differs():
    args = dict(
        steps=20,
        record_every=10,
        d_model=32,
        n_heads=2,
        seq_len=16,
        d_vocab=16,
        batch_size=8,
        eval_batch=8,
        progress=False,
    )
    _, a = toy.train_induction_model(seed=3, **args)
    _, b = toy.train_induction_model(seed=3, **args)
    _, c = toy.train_induction_model(seed=4, **args)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert list(a["step"]) == [0, 10, 20]
    assert list(a.columns[:4]) == ["step", "loss", "loss_first_half", "loss_repeated_half"]
    assert {"L1H1", "prev_L0H0"} <= set(a.columns)
    assert not a.drop(columns="step").equals(c.drop(columns="step"))


def test_training_batch_repeats_spans_at_varying_offsets():
    gen = torch.Generator().manual_seed(0)
    tokens = toy.training_batch(n_seqs=64, seq_len=64, d_vocab=64, generator=gen)
    offsets, per_row = set(), []
    for row in tokens.tolist():
        found = 0
        for off in range(2, 64):
            for i in range(off + 1, 64):
                if row[i] == row[i - off] and row[i - 1] == row[i - 1 - off]:
                    offsets.add(off)
                    found += 1
        per_row.append(found)
    assert min(per_row) >= 1 and sum(per_row) / len(per_row) > 4  # every sequence repeats bigrams
    assert len(offsets) > 40  # at many offsets: no fixed-position shortcut


def test_census_labels_the_toy_circuit(model, circuit):
    pytest.importorskip("headlens.census.run")
    from headlens.census.run import run_census

    table = run_census(model, toy.toy_probes(model, seed=0), progress=False).table
    layer, head = circuit["induction"]
    row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
    assert row["label"] == "induction"
    assert row["induction"] > 0.5  # 0.535 on the seed-0 probes
    layer0 = table[table["layer"] == 0]
    partner = layer0.loc[layer0["previous_token"].idxmax()]
    assert int(partner["head"]) == circuit["previous_token"][1]
    assert partner["label"] == "previous_token"
    assert partner["previous_token"] > 0.5  # 0.520


def test_bad_input_raises_headlens_error(tmp_path, history):
    with pytest.raises(HeadlensError, match="multiple of n_heads"):
        toy.toy_config(d_model=65, n_heads=4)
    with pytest.raises(HeadlensError, match="steps must be an integer >= 1"):
        toy.train_induction_model(steps=0, progress=False)
    with pytest.raises(HeadlensError, match="no toy checkpoint"):
        toy.load_induction_model(tmp_path / "missing.safetensors")
    with pytest.raises(HeadlensError, match=">= 3 recorded steps"):
        toy.phase_change(history.head(2))
    with pytest.raises(HeadlensError, match="distinct tokens"):
        toy.repeated_tokens(100, n_seqs=1, d_vocab=64, generator=torch.Generator())

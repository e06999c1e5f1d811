#!/usr/bin/env bash
# Builds llama.cpp's Python bindings (PyPI llama-cpp-python, an sdist that compiles
# llama.cpp) once into $GPUSCALE_CACHE/llama-venv. It is the peer the worker is checked
# and benchmarked against. The build takes about 11 minutes on 2 cores, so CI never runs
# this: the parity fixture it produces is committed (inference-worker/tests/fixtures).
set -euo pipefail
CACHE="${GPUSCALE_CACHE:-$HOME/.cache/gpuscale}"
VENV="$CACHE/llama-venv"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "[ensure-llama-cpp] building llama-cpp-python==$VERSION into $VENV (about 11 minutes)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # CPU only, native ISA: the same build a user of llama.cpp on this machine would run.
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF" \
    "$VENV/bin/pip" install -q "llama-cpp-python==$VERSION" numpy
fi
echo "$VENV/bin/python"

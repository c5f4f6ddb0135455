#!/usr/bin/env bash
# Set up a development environment in .venv: torch (CUDA 13.0 build, so every .cu file compiles and links
# even on machines without a GPU), the build and test tools, then build and install xmodal against that
# torch. Safe to run again: it reuses .venv and rebuilds incrementally (build/ is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${XMODAL_TORCH:-torch==2.14.1}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q "$TORCH_SPEC" numpy tqdm safetensors pillow "cmake>=3.26" ninja "scikit-build-core>=0.10" \
  pytest hypothesis pytest-benchmark faiss-cpu
.venv/bin/python -m pip install -q --no-build-isolation --no-deps .
.venv/bin/python -m xmodal info

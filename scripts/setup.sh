#!/usr/bin/env bash
# Set up a development environment in .venv: torch (CUDA 13.0 build), the build and test tools, then build
# and install xmodal against that torch. Safe to run again: it reuses .venv and rebuilds incrementally
# (build/ is kept).
#
#   bash scripts/setup.sh [--cuda auto|on|off]
#
# --cuda auto (the default) compiles the CUDA kernels only when a GPU is visible, so a laptop or CPU server
# builds in about a minute instead of spending minutes on kernels it cannot run; --cuda on compiles them
# anyway (CI does, so every .cu file is compiled on every run; needs nvcc on PATH); --cuda off never does.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=${2:-}; shift 2 || { echo "setup.sh: --cuda needs a value: auto, on or off" >&2; exit 2; } ;;
    --cuda=*) cuda=${1#--cuda=}; shift ;;
    *) echo "setup.sh: unknown argument '$1' (usage: bash scripts/setup.sh [--cuda auto|on|off])" >&2; exit 2 ;;
  esac
done
case "$cuda" in
  auto|on|off) ;;
  *) echo "setup.sh: --cuda must be auto, on or off, got '$cuda'" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${XMODAL_TORCH:-torch==2.14.1}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q "$TORCH_SPEC" numpy tqdm safetensors pillow "cmake>=3.26" ninja "scikit-build-core>=0.10" \
  pytest hypothesis pytest-benchmark faiss-cpu torch_geometric \
  fastapi uvicorn httptools uvloop prometheus_client httpx cryptography python-multipart \
  mkdocs mkdocs-material "mkdocstrings[python]" selenium "ray[serve,data]"
# MovieLens-100k ships inside RecBole's wheel; xmodal.recommend reads its files and never imports RecBole (whose
# own dependencies do not resolve with current torch), hence --no-deps
.venv/bin/python -m pip install -q --no-deps recbole==1.2.1
# the search page's browser tests drive Debian's Chromium through Selenium (a browser is never downloaded)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt_get=
  if command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt_get=apt-get; elif command -v sudo >/dev/null; then apt_get="sudo apt-get"; fi
  fi
  if [ -z "$apt_get" ] || ! { $apt_get install -y -q --no-install-recommends chromium chromium-driver \
       || { $apt_get update -q && $apt_get install -y -q --no-install-recommends chromium chromium-driver; }; }; then
    echo "setup.sh: could not install chromium and chromium-driver (Debian packages): the search page's browser" \
         "tests will be skipped" >&2
  fi
fi
if [ "$cuda" = auto ]; then
  if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    cuda=on
  else
    cuda=off
    echo "setup.sh: no GPU visible: building the CPU kernels only (--cuda on compiles the CUDA ones too)"
  fi
fi
XMODAL_CUDA=$(echo "$cuda" | tr a-z A-Z) .venv/bin/python -m pip install -q --no-build-isolation --no-deps .
.venv/bin/python -m xmodal info

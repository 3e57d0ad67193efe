#!/usr/bin/env bash
# Sets up .venv on a fresh machine of this project's kind and builds the extension in place.
#   torch/torchvision: the versions on this machine's disk (constraints.txt), a CUDA build of torch
#   that also runs on CPU and brings Triton; the C++ CPU kernels always; the CUDA kernels when nvcc
#   is present (SEMCORR_BUILD_CUDA=1 forces them, =0 skips them).
# Idempotent: a second run reuses .venv and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -c constraints.txt torch==2.14.1 torchvision==0.29.1 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"${PIP[@]}" install -c constraints.txt "setuptools>=64" wheel ninja "pybind11>=2.12" 2> >(grep -v "is ignored" >&2)
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
"${PIP[@]}" install -c constraints.txt --no-build-isolation -e ".[dev]" 2> >(grep -v "is ignored" >&2)
.venv/bin/semcorr info

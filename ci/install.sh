#!/usr/bin/env bash
# Install dask-dynbatch with its test, metrics, docs and lint dependencies into a fresh virtual
# environment ($VENV, default .venv).
# Torch first, pinned to the CPU build these machines keep on local disk, so that the package's
# torch range is already satisfied and nothing downloads a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[torch,test,metrics,docs,lint]"

#!/usr/bin/env bash
# The test suite at the lowest dependency versions pyproject.toml declares (ci/lowest_constraints.py
# pins each runtime dependency to its lower bound), in a fresh virtual environment of its own. One
# Python only: the machines and CI have CPython 3.11 and no registry they reach offers another.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q torch==2.13.0  # the CPU build on local disk (see ci/install.sh)
python3 ci/lowest_constraints.py >"$work/constraints.txt"
"$work/venv/bin/python" -m pip install -q -c "$work/constraints.txt" -e ".[torch,test,metrics]"
"$work/venv/bin/python" -m pip list 2>/dev/null | grep -E -i '^(dask|distributed|bokeh|numpy|scipy|psutil) '
# the quality gates ran with the suite in .venv: mypy's findings belong to the versions there
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_quality.py "$@"

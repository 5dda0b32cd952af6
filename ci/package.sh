#!/usr/bin/env bash
# The package as a user gets it: the sdist built, installed into a fresh virtual environment without
# torch (with the metrics and test extras), the installed demo run on its NumPy model, and the
# sdist's own tests run from the unpacked sdist in that environment. Needs ci/install.sh's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m build --sdist --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/dask_dynbatch-*/)
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "dask-dynbatch[metrics,test] @ file://$sdist"
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then echo "package.sh: torch was installed"; exit 1; fi
echo "package.sh: the installed demo, without torch"
(cd "$work" && timeout 300 "$work/venv/bin/dask-dynbatch-demo" --requests 2000 --plain-requests 100 --dashboard-address :0)
echo "package.sh: the sdist's tests, without torch"
# the quality gates (ruff, mypy, docs) ran in the development environment; this one has no lint/docs extras
(cd "$src" && timeout 1800 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_quality.py)

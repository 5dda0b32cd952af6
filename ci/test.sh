#!/usr/bin/env bash
# Install (ci/install.sh) and run the whole test suite (ruff, mypy and the docs build among its
# tests), then the package as a user installs it without torch (ci/package.sh) and the suite at the
# lowest declared dependency versions (ci/lowest.sh). Chromium is installed for the dashboard test
# when apt-get is available and it is missing. Arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"
fi
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exit 5 = no tests collected; treat as failure only if tests were expected
if [ $rc -eq 5 ]; then echo "no tests collected"; exit 1; fi
if [ $rc -ne 0 ]; then exit $rc; fi
echo "== the sdist, installed without torch"
bash ci/package.sh
echo "== the lowest declared dependency versions"
bash ci/lowest.sh

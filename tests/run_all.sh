#!/usr/bin/env bash
# The whole test suite from a clean clone: installs what it needs, then runs every
# test environment (engine + real loaders, older diffusers for Z-Image, both gradios).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -r requirements-test.txt
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/webui
if [ -f tests/run_diffusers_versions.sh ]; then bash tests/run_diffusers_versions.sh; fi
if [ -f tests/webui/run_ui_tests.sh ]; then bash tests/webui/run_ui_tests.sh; fi

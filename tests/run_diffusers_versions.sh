#!/usr/bin/env bash
# Z-Image LoRAs in the older diffusers releases people still run: tests/test_loaders_zimage.py
# under diffusers 0.36.0 (the first with Z-Image) and 0.37.0, each in its own environment
# (tests/lanes/diffusers-0.36.txt, -0.37.txt; kept outside the clone by tests/lanes/env.sh).
#
#   bash tests/run_diffusers_versions.sh            # install what is missing, run both
#   bash tests/run_diffusers_versions.sh --install  # only create/update the environments
#
# torch is always pinned (2.13.0, the CPU wheel this machine has). Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tests/lanes/env.sh
LANE_LOG_NAME=run_diffusers_versions
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
INSTALL_ONLY=0
[[ "${1:-}" == "--install" ]] && INSTALL_ONLY=1

failed=0
start=$SECONDS
for version in 0.36 0.37; do
    t0=$SECONDS
    reqs=(tests/lanes/torch-2.13.txt "tests/lanes/diffusers-$version.txt")
    lane_env "diffusers${version//./}" "$PYTHON" "${reqs[@]}"
    [[ $INSTALL_ONLY == 1 ]] && continue
    lane_log "diffusers $version: tests/test_loaders_zimage.py ($("$LANE_PY" tests/lanes/versions.py))"
    if run_pytest "$LANE_PY" tests/test_loaders_zimage.py; then
        lane_log "diffusers $version: passed ($((SECONDS - t0)) s)"
    else
        lane_log "diffusers $version: FAILED ($((SECONDS - t0)) s)"
        failed=1
    fi
done
lane_log "done in $((SECONDS - start)) s"
exit $failed

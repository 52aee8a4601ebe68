#!/usr/bin/env bash
# Z-Image LoRAs in the older diffusers releases people still run: tests/test_loaders_zimage.py
# under diffusers 0.36.0 (the first with Z-Image) and 0.37.0, each in its own environment
# (.venv-diffusers036, .venv-diffusers037; ignored by git via .venv-*/).
#
#   bash tests/run_diffusers_versions.sh            # install what is missing, run both
#   bash tests/run_diffusers_versions.sh --install  # only create/update the environments
#
# Those diffusers releases need huggingface-hub < 1.0, hence transformers 4.x. torch is
# always pinned (2.13.0, the CPU wheel this machine has). Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
INSTALL_ONLY=0
[[ "${1:-}" == "--install" ]] && INSTALL_ONLY=1

COMMON=(
    "torch==2.13.0"
    "safetensors>=0.4"
    "numpy"
    "tqdm"
    "transformers==4.57.6"
    "huggingface-hub<1.0"
    "accelerate"
    "peft==0.18.1"
    "pytest"
)

log() { printf '[run_diffusers_versions %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

make_venv() {
    local version="$1" venv="$2"
    local stamp="$venv/.ckpt2lora-stamp"
    local want
    want="$(printf '%s\n' "${COMMON[@]}" "diffusers==$version" | sha256sum | cut -c1-16)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "diffusers $version: environment up to date"
        return
    fi
    log "diffusers $version: installing into $venv"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${COMMON[@]}" "diffusers==$version"
    echo "$want" >"$stamp"
}

failed=0
start=$SECONDS
for version in 0.36.0 0.37.0; do
    short="${version%.*}"          # 0.36
    venv="$ROOT/.venv-diffusers${short//./}"  # .venv-diffusers036
    t0=$SECONDS
    make_venv "$version" "$venv"
    [[ $INSTALL_ONLY == 1 ]] && continue
    log "diffusers $version: tests/test_loaders_zimage.py"
    if "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_loaders_zimage.py; then
        log "diffusers $version: passed ($((SECONDS - t0)) s)"
    else
        log "diffusers $version: FAILED ($((SECONDS - t0)) s)"
        failed=1
    fi
done
log "done in $((SECONDS - start)) s"
exit $failed

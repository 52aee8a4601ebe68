#!/usr/bin/env bash
# The WebUI tab's tests, each gradio in its own virtual environment, plus the browser test.
#
#   bash tests/webui/run_ui_tests.sh            # install what is missing, run everything
#   bash tests/webui/run_ui_tests.sh --install  # only create / update the environments
#
# Needs Python 3.11 and root (for `apt-get install chromium`); installs everything else:
#   .venv-gradio4  gradio 4.40.0 (Forge, Neo)
#   .venv-gradio3  gradio 3.41.2 (A1111 1.10)
# each with Playwright for the browser tests, which drive Debian's chromium headless.
# Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
INSTALL_ONLY=0
[[ "${1:-}" == "--install" ]] && INSTALL_ONLY=1
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

log() { printf '[run_ui_tests %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
quiet_pip() { grep -v "^WARNING: Location '.*' is ignored" || true; }

# One environment per gradio; a stamp of the requirements skips an up-to-date one.
make_venv() {
    local name="$1" reqs="$2" venv="$ROOT/.venv-$1"
    local stamp="$venv/.ckpt2lora-stamp" want
    want="$(cat "$reqs" tests/webui/requirements-test.txt requirements.txt | sha256sum | cut -c1-16)"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "$name: environment up to date"
        return 0
    fi
    local t0=$SECONDS
    log "$name: installing into $venv"
    "$PYTHON" -m venv "$venv"
    # torch first and pinned: the local CPU wheel (an unpinned torch pulls a CUDA build).
    "$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check "torch==2.13.0" 2>&1 | quiet_pip
    "$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check \
        -r tests/webui/requirements-test.txt -r "$reqs" 2>&1 | quiet_pip
    "$venv/bin/python" -c "import gradio, torch, safetensors; print('gradio', gradio.__version__, 'torch', torch.__version__)"
    echo "$want" > "$stamp"
    log "$name: installed in $((SECONDS - t0)) s"
}

install_chromium() {
    if [[ -x /usr/bin/chromium ]]; then
        log "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
        return 0
    fi
    local t0=$SECONDS
    log "chromium: apt-get install chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
    log "chromium: installed in $((SECONDS - t0)) s"
}

# The three installs run side by side (mostly download time); each one's output is kept.
t_install=$SECONDS
pids=() names=()
for job in "make_venv gradio4 requirements-ui-gradio4.txt" "make_venv gradio3 requirements-ui-gradio3.txt" install_chromium; do
    name="${job// /_}"
    ( set -euo pipefail; $job ) > "$LOGS/$name.log" 2>&1 &
    pids+=($!) names+=("$name")
done
fail=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        fail=1
        log "FAILED: ${names[$i]}"
    fi
    cat "$LOGS/${names[$i]}.log"
done
[[ $fail -eq 0 ]] || { log "installation failed"; exit 1; }
log "installs done in $((SECONDS - t_install)) s"
[[ $INSTALL_ONLY -eq 1 ]] && exit 0

PYTEST=(-m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/webui)
status=0
for name in gradio4 gradio3; do
    log "UI tests and browser tests (headless chromium), $name"
    "$ROOT/.venv-$name/bin/python" "${PYTEST[@]}" || status=1
done
[[ $status -eq 0 ]] && log "all UI tests passed" || log "UI tests FAILED"
exit $status

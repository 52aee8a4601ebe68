#!/usr/bin/env bash
# The WebUI tab's tests, each gradio in its own virtual environment, plus the browser test.
#
#   bash tests/webui/run_ui_tests.sh            # install what is missing, run everything
#   bash tests/webui/run_ui_tests.sh --install  # only create / update the environments
#
# Needs Python 3.11 and root (for `apt-get install chromium`); installs everything else, in
# environments kept outside the clone (tests/lanes/env.sh):
#   gradio4  gradio 4.40.0 (Forge, Neo)        requirements-ui-gradio4.txt
#   gradio3  gradio 3.41.2 (A1111 1.10)        requirements-ui-gradio3.txt
# each with Playwright for the browser tests, which drive Debian's chromium headless.
# Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
INSTALL_ONLY=0
[[ "${1:-}" == "--install" ]] && INSTALL_ONLY=1
source tests/lanes/env.sh
LANE_LOG_NAME=run_ui_tests
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

log() { lane_log "$@"; }

# One environment per gradio, outside the clone, keyed by its pins (tests/lanes/env.sh).
make_venv() {
    lane_env "$1" "$PYTHON" tests/lanes/torch-2.13.txt "$2"
    "$LANE_PY" -c "import gradio, torch, safetensors; print('gradio', gradio.__version__, 'torch', torch.__version__)"
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

status=0
for job in "gradio4 requirements-ui-gradio4.txt" "gradio3 requirements-ui-gradio3.txt"; do
    read -r name reqs <<<"$job"
    python="$(lane_env_dir "$name" "$PYTHON" tests/lanes/torch-2.13.txt "$reqs")/bin/python"
    log "UI tests and browser tests (headless chromium), $name: $("$python" tests/lanes/versions.py)"
    run_pytest "$python" -W ignore::DeprecationWarning tests/webui || status=1
done
[[ $status -eq 0 ]] && log "all UI tests passed" || log "UI tests FAILED"
exit $status

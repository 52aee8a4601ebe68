#!/usr/bin/env bash
# The whole test suite from a clean clone (the README's test command; CI runs it via .ci/run).
#
# First every environment is installed, side by side (that is mostly download); then the lanes
# run one after another (2 cores), each printing its result and time, then a summary. A failed
# lane fails the run, but the others still run. Lanes:
#   ruff            ruff check .
#   engine          the engine tests, real loaders: .venv (Python 3.11, torch 2.13.0, numpy 2)
#   diffusers-old   the Z-Image loader tests under diffusers 0.36.0 and 0.37.0
#   ui              the tab under gradio 4.40.0 and 3.41.2 (Python 3.11), headless chromium
#   windows-surface (a) the I/O tests with every function Windows' os lacks removed
#   a1111           (b) AUTOMATIC1111 1.10: Python 3.10, torch 2.1.2, numpy 1.26.2, gradio 3.41.2
#   neo             (c) Forge Neo: Python 3.13, torch 2.14.1, numpy 2, gradio 4.40.0
# Environments other than .venv live outside the clone, keyed by their pins
# (${CKPT2LORA_ENV_CACHE:-~/.cache/ckpt2lora-envs}, tests/lanes/env.sh): reused while the pins
# are unchanged. Needs pyenv's (or PATH's) python3.10 and python3.13, and root for chromium.
set -uo pipefail
cd "$(dirname "$0")/.."
source tests/lanes/env.sh
LANE_LOG_NAME=run_all
PYTHON=${PYTHON:-python3}
START=$SECONDS

# -- installs, side by side -------------------------------------------------------------------
install_engine() {
    [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv || return 1
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 \
        -r requirements-test.txt 2>&1 | quiet_pip
    return "${PIPESTATUS[0]}"
}
INSTALLS=(
    "engine install_engine"
    "diffusers-old bash tests/run_diffusers_versions.sh --install"
    "ui bash tests/webui/run_ui_tests.sh --install"
    "a1111 bash tests/lanes/stack.sh a1111 --install"
    "neo bash tests/lanes/stack.sh neo --install"
)
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
declare -A INSTALL_FAILED=()
pids=()
lane_log "installing the environments"
for job in "${INSTALLS[@]}"; do
    read -r name command <<<"$job"
    (
        t0=$SECONDS
        $command
        rc=$?
        lane_log "install $name: $([[ $rc -eq 0 ]] && echo done || echo FAILED) in $((SECONDS - t0)) s"
        exit $rc
    ) >"$LOGS/$name.log" 2>&1 &
    pids+=($!)
done
# A line a minute while the installs run (a cold cache takes 10+ minutes, mostly download).
still_installing() {
    local i names=()
    for i in "${!INSTALLS[@]}"; do
        kill -0 "${pids[$i]}" 2>/dev/null && names+=("${INSTALLS[$i]%% *}")
    done
    echo "${names[*]}"
}
waited=0
while [[ -n "$(still_installing)" ]]; do
    sleep 5
    waited=$((waited + 5))
    if ((waited % 60 == 0)); then
        lane_log "still installing: $(still_installing) ($((SECONDS - START)) s; env cache $(du -sh "$ENV_CACHE" 2>/dev/null | cut -f1))"
    fi
done
for i in "${!INSTALLS[@]}"; do
    read -r name _ <<<"${INSTALLS[$i]}"
    wait "${pids[$i]}" || INSTALL_FAILED[$name]=1
    cat "$LOGS/$name.log"
done
INSTALL_SECONDS=$((SECONDS - START))
lane_log "installs done in $INSTALL_SECONDS s"

# -- lanes, one after another -------------------------------------------------------------------
RESULTS=()
FAILED=0
lane() {
    local name="$1" t0=$SECONDS rc=0
    shift
    printf '\n===== lane %s =====\n' "$name"
    if [[ -n "${INSTALL_FAILED[$name]:-}" ]]; then
        rc=1
        lane_log "$name: its environment failed to install (output above)"
    else
        "$@" || rc=$?
    fi
    local result="passed"
    if [[ $rc -eq 5 ]]; then
        result="FAILED (pytest collected no tests)"
    elif [[ $rc -ne 0 ]]; then
        result="FAILED (exit code $rc)"
    fi
    [[ $rc -eq 0 ]] || FAILED=1
    RESULTS+=("$(printf '%-16s %-34s %5d s' "$name" "$result" $((SECONDS - t0)))")
    printf '===== lane %s: %s in %d s =====\n' "$name" "$result" $((SECONDS - t0))
}

lane ruff .venv/bin/ruff check .
lane engine run_pytest .venv/bin/python tests --ignore=tests/webui
lane diffusers-old bash tests/run_diffusers_versions.sh
lane ui bash tests/webui/run_ui_tests.sh
if [[ -f tests/windows_surface/run.sh ]]; then
    lane windows-surface bash tests/windows_surface/run.sh
else
    RESULTS+=("$(printf '%-16s %-34s' windows-surface "not run (no tests/windows_surface/run.sh)")")
fi
lane a1111 bash tests/lanes/stack.sh a1111
lane neo bash tests/lanes/stack.sh neo

printf '\n===== summary (installs %d s, total %d s) =====\n' "$INSTALL_SECONDS" $((SECONDS - START))
printf '%s\n' "${RESULTS[@]}"
if [[ $FAILED -ne 0 ]]; then
    echo "FAILED: at least one lane failed (see above)"
    exit 1
fi
echo "all lanes passed"

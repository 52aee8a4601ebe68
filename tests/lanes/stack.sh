#!/usr/bin/env bash
# Lanes (b) and (c): the engine and the WebUI tab under a WebUI's own stack.
#
#   bash tests/lanes/stack.sh a1111 [--install]   AUTOMATIC1111 1.10: Python 3.10, torch 2.1.2,
#                                                 numpy 1.26.2, safetensors 0.4.2, gradio 3.41.2
#   bash tests/lanes/stack.sh neo [--install]     Forge Neo: Python 3.13, torch 2.14.1, numpy 2,
#                                                 gradio 4.40.0 (+ audioop-lts)
#
# Two environments per stack, both on the stack's Python, torch, numpy and safetensors:
#   <stack>-engine  + the real loaders (diffusers, transformers, peft, LyCORIS) at the newest
#                   releases that still support that Python and torch; the engine tests run here
#   <stack>-ui      + the WebUI's gradio and its pins; tests/webui runs here
# They cannot be one: gradio 4.40 needs huggingface_hub < 0.26, every diffusers with Z-Image
# (>= 0.36) needs a newer one; and a WebUI's venv has its own loaders, not these.
# Environments: tests/lanes/env.sh (outside the clone, keyed by the pins). Python: pyenv's
# ~/.pyenv/versions/<x.y.z>, else python3.10 / python3.13 on PATH, or CKPT2LORA_PYTHON.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source tests/lanes/env.sh

STACK="${1:-}"
INSTALL_ONLY=0
[[ "${2:-}" == "--install" ]] && INSTALL_ONLY=1
LANE_LOG_NAME="stack $STACK"

# The engine tests each stack runs: every test file, less what the stack's loaders cannot
# check (tests/lanes/<stack>-excluded.txt; the engine lane runs those).
ENGINE_TESTS=(tests/test_*.py)

case "$STACK" in
    a1111) PY_VERSION=3.10.13 ;;
    neo) PY_VERSION=3.13.0 ;;
    *)
        echo "usage: bash tests/lanes/stack.sh a1111|neo [--install]" >&2
        exit 2
        ;;
esac
PYTHON="${CKPT2LORA_PYTHON:-$HOME/.pyenv/versions/$PY_VERSION/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="python${PY_VERSION%.*}"

# The installs side by side (mostly download); each one's output is kept and shown.
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
pids=()
for part in engine ui; do
    lane_env "$STACK-$part" "$PYTHON" "tests/lanes/$STACK-torch.txt" "tests/lanes/$STACK-$part.txt" \
        >"$LOGS/$part" 2>&1 &
    pids+=($!)
done
install_chromium >"$LOGS/chromium" 2>&1 &
pids+=($!)
installed=0
for i in 0 1 2; do
    wait "${pids[$i]}" || installed=1
    cat "$LOGS/$(echo engine ui chromium | cut -d' ' -f$((i + 1)))"
done
[[ $installed -eq 0 ]] || { lane_log "installation failed"; exit 1; }
[[ $INSTALL_ONLY -eq 1 ]] && exit 0

# lane_env set LANE_PY in the subshells; compute the paths again here (cheap, no install).
ENGINE_PY="$(lane_env_dir "$STACK-engine" "$PYTHON" "tests/lanes/$STACK-torch.txt" "tests/lanes/$STACK-engine.txt")/bin/python"
UI_PY="$(lane_env_dir "$STACK-ui" "$PYTHON" "tests/lanes/$STACK-torch.txt" "tests/lanes/$STACK-ui.txt")/bin/python"

# What this stack's loaders cannot check (tests/lanes/<stack>-excluded.txt): printed, then
# left off the list (a file) or --deselect'ed (a test, all its parameters).
EXCLUDE_ARGS=()
EXCLUDED="tests/lanes/$STACK-excluded.txt"
if [[ -f "$EXCLUDED" ]]; then
    lane_log "engine tests NOT run here, and why (header of $EXCLUDED):"
    while IFS= read -r line; do
        entry="${line%%#*}"
        entry="${entry// /}"
        [[ -n "$entry" ]] || continue
        echo "    excluded: $line"
        if [[ "$entry" == *::* ]]; then
            EXCLUDE_ARGS+=(--deselect "$entry")
        else # a whole file: pytest's --ignore does not apply to files named on its command line
            for i in "${!ENGINE_TESTS[@]}"; do
                [[ "${ENGINE_TESTS[$i]}" != "$entry" ]] || unset "ENGINE_TESTS[$i]"
            done
        fi
    done <"$EXCLUDED"
    ENGINE_TESTS=("${ENGINE_TESTS[@]}")
fi

status=0
lane_log "versions: $("$ENGINE_PY" tests/lanes/versions.py)"
lane_log "engine tests: ${ENGINE_TESTS[*]}"
run_pytest "$ENGINE_PY" "${ENGINE_TESTS[@]}" "${EXCLUDE_ARGS[@]}" || status=1
lane_log "versions: $("$UI_PY" tests/lanes/versions.py)"
lane_log "UI tests: tests/webui (with headless chromium)"
run_pytest "$UI_PY" -W ignore::DeprecationWarning tests/webui || status=1
[[ $status -eq 0 ]] && lane_log "passed" || lane_log "FAILED"
exit $status

# Test environments kept outside the clone, keyed by their pins (source this file).
#
#   lane_env NAME PYTHON REQUIREMENTS...      build NAME's environment if needed; LANE_PY is
#                                             set to its python
#   lane_env_dir NAME PYTHON REQUIREMENTS...  print where that environment lives
#   run_pytest PYTHON ARGS...                 pytest, where "no tests collected" is a failure
#   install_chromium                          Debian's chromium for the browser tests (root)
#
# An environment lives in ${CKPT2LORA_ENV_CACHE:-~/.cache/ckpt2lora-envs}/NAME-KEY, where KEY
# hashes the interpreter's version and the requirement files' text (tests/lanes/env_key.py).
# The same pins reuse it; changed pins build a new one and remove NAME's older ones. An
# environment counts only once its .complete stamp is written, so an interrupted install is
# rebuilt next time; a lock keeps two runs from building the same one at once. The requirement
# files are installed in the order given, one pip call each: the first is the torch pin alone,
# so the rest resolves against that torch instead of pulling another one.

ENV_CACHE="${CKPT2LORA_ENV_CACHE:-$HOME/.cache/ckpt2lora-envs}"
LANES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

lane_log() { printf '[%s %s] %s\n' "${LANE_LOG_NAME:-lanes}" "$(date +%H:%M:%S)" "$*"; }
# pip lists every local index folder it skips, and every version it rejects, on one line.
quiet_pip() { grep -v "^WARNING: Location '.*' is ignored" | cut -c1-400 || true; }

lane_env_dir() {
    local name="$1" python="$2"
    shift 2
    if ! command -v "$python" >/dev/null 2>&1; then
        lane_log "$name: no interpreter $python (install that Python, e.g. with pyenv)" >&2
        return 1
    fi
    local key
    key="$("$python" "$LANES_DIR/env_key.py" "$@")" || return 1
    echo "$ENV_CACHE/$name-$key"
}

lane_env() {
    local name="$1" python="$2" dir
    dir="$(lane_env_dir "$@")" || return 1
    shift 2
    LANE_PY="$dir/bin/python"
    mkdir -p "$ENV_CACHE"
    (
        flock 9
        if [[ -f "$dir/.complete" && -x "$dir/bin/python" ]]; then
            lane_log "$name: reusing $dir"
            exit 0
        fi
        t0=$SECONDS
        lane_log "$name: installing into $dir"
        rm -rf "$dir"
        "$python" -m venv "$dir" || exit 1
        # Python 3.10's bundled pip (23.0) backtracks for many minutes over gradio 3.41.2's
        # dependencies; a current pip resolves them in seconds.
        "$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=25" 2>&1 | quiet_pip
        for reqs in "$@"; do
            if ! "$dir/bin/python" -m pip install -q --no-compile --disable-pip-version-check \
                -r "$reqs" >"$dir.pip.log" 2>&1; then
                quiet_pip <"$dir.pip.log"
                rm -f "$dir.pip.log"
                lane_log "$name: pip install -r $reqs failed"
                exit 1
            fi
            quiet_pip <"$dir.pip.log"
        done
        rm -f "$dir.pip.log"
        "$dir/bin/python" -m pip check >/dev/null 2>&1 ||
            lane_log "$name: pip check: $("$dir/bin/python" -m pip check 2>&1 | head -3 | tr '\n' ' ')"
        date -u +%FT%TZ >"$dir/.complete"
        lane_log "$name: installed in $((SECONDS - t0)) s ($(du -sh "$dir" | cut -f1))"
        # This lane's environments for older pins are dead weight (several GB with a CUDA torch).
        for old in "$ENV_CACHE/$name"-*; do
            [[ "$old" != "$dir" && -d "$old" && "$(basename "$old")" =~ ^$name-[0-9a-f]{16}$ ]] || continue
            lane_log "$name: removing the outdated $old"
            rm -rf "$old" "$old.lock"
        done
    ) 9>"$dir.lock"
}

run_pytest() {
    local python="$1" rc=0
    shift
    "$python" -m pytest -q -p no:cacheprovider "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        lane_log "pytest collected no tests from $* (a lane that tests nothing is a failure)"
    fi
    return $rc
}

install_chromium() {
    (
        flock 9 # the UI lanes install side by side; apt takes one at a time
        if [[ -x /usr/bin/chromium ]]; then
            lane_log "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
            exit 0
        fi
        t0=$SECONDS
        lane_log "chromium: apt-get install chromium"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null || exit 1
        lane_log "chromium: installed in $((SECONDS - t0)) s"
    ) 9>"${TMPDIR:-/tmp}/ckpt2lora-chromium.lock"
}

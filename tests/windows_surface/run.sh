#!/usr/bin/env bash
# Windows-surface lane (issue 9, 3a): the engine tests that read, write, make checkpoints,
# take LoRA files as variants and get interrupted, run with every function Windows' os
# lacks removed (sitecustomize.py here; CLI subprocesses inherit it through PYTHONPATH).
# Exits non-zero on failure; the last line is pytest's summary.
# Left out: the two chmod-000 tests (POSIX permission bits, which Windows does not have;
# as root they need os.geteuid to know to drop root's capabilities).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${VENV_PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/tests/windows_surface${PYTHONPATH:+:$PYTHONPATH}"
# First prove the surface is really gone, in a fresh interpreter like the CLI's.
"$PY" -c "
import os, sitecustomize
missing = [n for n in ('pread', 'preadv', 'pwrite', 'fchmod', 'fchown', 'getuid', 'geteuid', 'fork', 'setsid', 'killpg') if hasattr(os, n)]
assert not missing, f'the Windows surface is not in effect: os still has {missing}'
print(f'windows surface: {len(sitecustomize.REMOVED)} os functions removed')
"
# Windows always sets USERNAME; getpass.getuser() (torch's compile cache asks) falls back
# to os.getuid without it.
export USERNAME=${USERNAME:-${USER:-windows-surface}}
BASETEMP=$(mktemp -d "${TMPDIR:-/tmp}/windows_surface.XXXXXX")
trap 'rm -rf "$BASETEMP"' EXIT
# --basetemp: pytest's default temporary folder asks os.getuid, which Windows lacks.
"$PY" -m pytest -q -p no:cacheprovider --basetemp="$BASETEMP/t" \
    tests/test_portable_io.py tests/test_bad_input.py tests/test_output_safety.py \
    tests/test_checkpoint_output.py tests/test_lora_variants.py tests/test_interrupt.py \
    tests/test_detail.py \
    --deselect tests/test_bad_input.py::test_unreadable_file \
    --deselect tests/test_output_safety.py::test_folder_not_writable \
    "$@"

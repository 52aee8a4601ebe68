"""What a newcomer meets first: --help and --version answer at once (no torch import), the
standalone page without gradio says what to install in one sentence, sizes in one unit."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['ckpt2lora', {flag!r}]\n"
        "try:\n"
        "    runpy.run_module('lib_ckpt2lora', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert ("usage: ckpt2lora" in run.stdout) if flag == "--help" else run.stdout.strip() == "ckpt2lora 0.1.0"


def test_module_help_names_the_module():
    run = subprocess.run([sys.executable, "-m", "lib_ckpt2lora", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m lib_ckpt2lora "), run.stdout[:200]


@pytest.mark.skipif(importlib.util.find_spec("gradio") is not None, reason="gradio is installed in this environment")
def test_standalone_page_without_gradio_says_what_to_install(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "lib_ckpt2lora.ui", "--models-dir", str(tmp_path), "--lora-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and 'pip install "ckpt2lora[ui]"' in run.stderr, run.stderr


def test_standalone_help_says_gradio_is_needed():
    command = [sys.executable, "-m", "lib_ckpt2lora.ui", "--help"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "gradio" in run.stdout


def test_sizes_are_decimal_everywhere():
    from lib_ckpt2lora.budget import format_size

    assert format_size(1_048_576) == "1.05 MB"  # what the CLI said as "1.0 MiB"
    assert format_size(12_300_000_000) == "12.30 GB"
    assert format_size(999_999_999) == "1000.0 MB" and format_size(1_500_000_000) == "1.50 GB"

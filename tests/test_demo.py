"""The first thing a newcomer runs: ``python -m lib_ckpt2lora.demo``.

Its files must still be there after it ends (in ./demo/ by default), the printed LoRA
path must exist, it must say how to load the LoRA, and a second run must not replace
the first run's files unless asked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from lib_ckpt2lora import demo

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--dim", "64", "--blocks", "1"]


def test_demo_command_keeps_its_files_in_demo_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "lib_ckpt2lora.demo", *SMALL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "demo"
    for name in demo.DEMO_FILES:
        assert (folder / name).is_file(), name
    printed = [line for line in done.stdout.splitlines() if line.startswith("LoRA: ")]
    assert printed and Path(tmp_path, printed[0].split()[1]).resolve() == (folder / "demo_lora.safetensors").resolve()
    assert "<lora:demo_lora:1>" in done.stdout and "models/Lora" in done.stdout
    assert 'load_lora_weights("demo", weight_name="demo_lora.safetensors")' in done.stdout
    with safe_open(str(folder / "demo_lora.safetensors"), "pt") as lora:
        assert any(key.endswith(".lora_A.weight") for key in lora.keys())


def test_second_run_refuses_to_replace_the_files_unless_asked(tmp_path, capsys):
    folder = tmp_path / "mine"
    assert demo.main([*SMALL, "--dir", str(folder)]) == 0
    before = {name: (folder / name).read_bytes() for name in demo.DEMO_FILES}
    capsys.readouterr()

    assert demo.main([*SMALL, "--dir", str(folder), "--blocks", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err and "demo_base.safetensors" in err and "Traceback" not in err
    assert {name: (folder / name).read_bytes() for name in demo.DEMO_FILES} == before

    assert demo.main([*SMALL, "--dir", str(folder), "--blocks", "2", "--overwrite"]) == 0
    assert (folder / "demo_base.safetensors").read_bytes() != before["demo_base.safetensors"]


@pytest.mark.parametrize("leftover", demo.DEMO_FILES)
def test_any_leftover_demo_file_is_protected(tmp_path, leftover, capsys):
    (tmp_path / leftover).write_bytes(b"the user's own file")
    assert demo.main([*SMALL, "--dir", str(tmp_path)]) == 2
    assert (tmp_path / leftover).read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover]

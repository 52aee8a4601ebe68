"""`pip install .` builds a wheel that holds only the library, installs a `ckpt2lora` command,
and that command answers --help and --version without torch (which takes seconds to import,
and which a clean venv given --no-deps does not have: the proof that nothing imports it).

Builds in an isolated environment, so it needs the package index (as CI's installs do)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# What the build reads: a copy, so setuptools' build/ and egg-info land there, not in the clone.
SOURCES = ("pyproject.toml", "README.md", "style.css", "lib_ckpt2lora")


def _can_build_here() -> bool:
    """The test environment's own setuptools can build the wheel (no download): it needs
    setuptools >= 70.1 (bdist_wheel built in) or the wheel package; else pip fetches both."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    major, minor = (int(part) for part in version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    isolation = ["--no-build-isolation"] if _can_build_here() else []
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", *isolation]
        + ["-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (found,) = out.glob("ckpt2lora-*.whl")
    return found


def test_wheel_holds_only_the_library(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"lib_ckpt2lora", "ckpt2lora-0.1.0.dist-info", "ckpt2lora-0.1.0.data"}, tops
    data = [name for name in names if name.startswith("ckpt2lora-0.1.0.data/")]
    assert data == ["ckpt2lora-0.1.0.data/data/share/ckpt2lora/style.css"], data
    assert "lib_ckpt2lora/cli.py" in names and "lib_ckpt2lora/architectures/__init__.py" in names
    assert not any(part in name for name in names for part in ("tests/", "benchmarks/", "scripts/", "javascript/"))
    entry_points = zipfile.ZipFile(wheel).read("ckpt2lora-0.1.0.dist-info/entry_points.txt").decode()
    assert "ckpt2lora = lib_ckpt2lora.cli:main" in entry_points


def test_installed_command_answers_without_torch(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bindir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    python = bindir / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    # Outside the clone, so the installed package is the one imported.
    run = subprocess.run([str(bindir / "ckpt2lora"), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: ckpt2lora ") and "--rank-thresh" in run.stdout and "--target-size" in run.stdout
    version = subprocess.run([str(bindir / "ckpt2lora"), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert version.stdout.strip() == "ckpt2lora 0.1.0", version
    # A real job needs torch; the import of the package alone does not.
    probe = subprocess.run(
        [str(python), "-c", "import sys, lib_ckpt2lora; assert 'torch' not in sys.modules; print(lib_ckpt2lora.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert str(env_dir) in probe.stdout
    assert (env_dir / "share" / "ckpt2lora" / "style.css").is_file()

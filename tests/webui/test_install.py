"""install.py: installs only what is missing, never with a version, never torch."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_install(monkeypatch, missing: set[str]) -> list[str]:
    calls = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name not in missing
    launch.run_pip = lambda command, desc=None, live=False: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(ROOT / "install.py"), run_name="__main__")
    return calls


def test_nothing_installed_when_the_webui_has_everything(monkeypatch):
    assert run_install(monkeypatch, set()) == []


def test_missing_packages_installed_unpinned_and_never_torch(monkeypatch, capsys):
    calls = run_install(monkeypatch, {"tqdm", "torch", "safetensors"})
    assert calls == ["install safetensors", "install tqdm"]
    assert not any(c for c in calls if any(op in c for op in "<>=~"))
    assert "torch is missing" in capsys.readouterr().out


def test_requirements_are_the_engines():
    names = runpy.run_path(str(ROOT / "install.py"), run_name="not_main")["required_names"]()
    assert {"torch", "safetensors", "numpy", "tqdm"} <= set(names)


def test_outside_the_webui_it_installs_nothing(monkeypatch, capsys):
    """ComfyUI-Manager runs ``python install.py`` (after installing requirements.txt itself):
    no ``launch`` module there, so one line and nothing installed."""
    monkeypatch.setitem(sys.modules, "launch", None)  # import launch -> ImportError
    runpy.run_path(str(ROOT / "install.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "nothing to install" in out


def test_requirements_carry_no_versions():
    """An installed package always satisfies a line without a version, so no installer
    (ComfyUI-Manager pip-installs each line) upgrades or downgrades the host's packages."""
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf8").splitlines()]
    assert [line for line in lines if line] == ["torch", "safetensors", "numpy", "tqdm"]

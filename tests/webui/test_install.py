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

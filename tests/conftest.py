"""Shared pytest setup: the repository root and tests/ on sys.path, so ``import
lib_ckpt2lora`` and ``import tiny_models`` work without installing anything.

Kept free of heavy imports (torch, diffusers): the WebUI tests run in environments
without them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for path in (str(ROOT), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)


class _RootIsAFolder:
    """The repository root has an ``__init__.py`` (ComfyUI loads the root as a node pack).
    pytest would collect the root as a package and import that file as a test module
    (inserting the root's parent into sys.path): collect it as a plain folder instead."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path) == ROOT:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config):
    # Registered as a plugin: a conftest's own hooks only see the folders beneath it.
    # (pytest < 8 collects no folders above the arguments and has no pytest.Dir.)
    if hasattr(pytest, "Dir") and not config.pluginmanager.has_plugin("ckpt2lora-root-is-a-folder"):
        config.pluginmanager.register(_RootIsAFolder(), "ckpt2lora-root-is-a-folder")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: the tiny models' matrices gain nothing from more, and
    on a busy 2-core machine torch's spinning threads made one extraction ~15x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# One tiny pair + extracted LoRA per architecture for the whole session, shared by the
# loader test modules (diffusers, LyCORIS).
@pytest.fixture(scope="session")
def sd15_case(tmp_path_factory):
    import loader_checks

    return loader_checks.build_case("sd15", tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="session")
def sdxl_case(tmp_path_factory):
    import loader_checks

    return loader_checks.build_case("sdxl", tmp_path_factory.mktemp("sdxl"))

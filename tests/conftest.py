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

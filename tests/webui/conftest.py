"""The tab's tests run in environments with gradio (tests/webui/run_ui_tests.sh).

Elsewhere (the engine's environment, no gradio) this folder is skipped. The WebUI is
replaced by the stub under stub_modules/, put first on sys.path.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STUB = HERE / "stub_modules"

try:
    import gradio  # noqa: F401
except ImportError:  # not a UI environment
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("CKPT2LORA_STUB_ROOT", tempfile.mkdtemp(prefix="ckpt2lora-stub-"))
    try:  # gradio 4 writes a .pyi beside every new component class; Forge and Neo patch this out too
        import gradio.component_meta

        gradio.component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    except ImportError:
        pass
    for path in (str(STUB), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny matrices gain nothing from threads; on a busy 2-core machine they cost a lot."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives headless Chromium (Playwright) against the standalone app")


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A fresh stub WebUI: empty checkpoint and Lora folders under tmp_path, fresh state."""
    import network
    import networks
    from modules import progress, script_callbacks, sd_models, shared, shared_state

    models = tmp_path / "models" / "Stable-diffusion"
    loras = tmp_path / "models" / "Lora"
    models.mkdir(parents=True)
    loras.mkdir(parents=True)
    monkeypatch.setattr(sd_models, "model_path", str(models))
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(loras))
    monkeypatch.setattr(shared.cmd_opts, "ckpt_dir", None)
    monkeypatch.setattr(shared, "state", shared_state.State())
    monkeypatch.setitem(script_callbacks.callback_map, "callbacks_ui_tabs", [])
    monkeypatch.setitem(sys.modules, "network", network)
    progress.finished_tasks.clear()
    sd_models.list_models()
    networks.list_available_networks()
    return type("StubWebUI", (), {"models": models, "loras": loras, "root": tmp_path})

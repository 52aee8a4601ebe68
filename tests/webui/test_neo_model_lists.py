"""Inside Forge Neo the base/variant lists hold every model Neo lists (issue 17, the tab).

Neo has no separate diffusion-model list: its ``--ckpt-dirs`` folders (ComfyUI's
``diffusion_models`` / ``unet``, where Anima, Flux.2 and Wan files usually sit) join
``models/Stable-diffusion`` in ``sd_models.list_models``, and ``checkpoint_tiles()`` names them
by their path inside their folder (stub_neo/sd_models.py, from nolanlane/sd-webui-forge-classic
@6e1e0d5). The tab takes its lists from there, so a pair in a diffusion-model folder is offered,
resolved to its file and extracted; the sidecar gets Neo's preset name.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from uihelpers import run_event, write_pair

from lib_ckpt2lora.ui import job, tab_layout
from lib_ckpt2lora.ui.tab import build_tab

HERE = Path(__file__).resolve().parent


def load_stub(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, HERE / "stub_neo" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anima_shapes(width: int = 64) -> dict[str, tuple[int, ...]]:
    """A small Anima in its released layout (Cosmos' ``net.`` prefix, ComfyUI's names)."""
    shapes = {"net.x_embedder.proj.1.weight": (width, 68), "net.final_layer.linear.weight": (64, width)}
    for i in range(2):
        for module in ("self_attn.q_proj", "cross_attn.k_proj", "mlp.layer1", "adaln_modulation_mlp.1"):
            shapes[f"net.blocks.{i}.{module}.weight"] = (width, width)
        shapes[f"net.llm_adapter.blocks.{i}.cross_attn.q_proj.weight"] = (32, 32)
    shapes["net.llm_adapter.embed.weight"] = (100, 32)
    return shapes


@pytest.fixture
def neo(webui, monkeypatch, tmp_path):
    """The stub WebUI with Neo's checkpoint listing and Lora presets, a diffusion-model folder
    given as --ckpt-dirs, an Anima pair in it and an SD1.5 pair in models/Stable-diffusion."""
    from modules import shared

    from lib_ckpt2lora.ui import webui_services

    diffusion_models = tmp_path / "ComfyUI" / "models" / "diffusion_models"
    write_pair(diffusion_models, "anima-base.safetensors", "anima-finetune.safetensors", shapes=anima_shapes())
    write_pair(webui.models, "sd15_base.safetensors", "sd15_finetune.safetensors")
    sd_models = load_stub("neo_sd_models", "sd_models.py")
    monkeypatch.setattr(sd_models, "model_path", str(webui.models))
    monkeypatch.setattr(shared.cmd_opts, "ckpt_dirs", [str(diffusion_models)], raising=False)
    monkeypatch.setattr(webui_services, "sd_models", sd_models)
    monkeypatch.setitem(sys.modules, "network", load_stub("network", "network.py"))
    sd_models.list_models()
    return type("Neo", (), {"diffusion_models": diffusion_models, "loras": webui.loras, "sd_models": sd_models})


def test_diffusion_model_folder_is_in_the_base_and_variant_lists(neo):
    from lib_ckpt2lora.ui.webui_services import WebUIServices

    services = WebUIServices()
    choices = tab_layout.model_choices(services)
    expected = {"anima-base.safetensors", "anima-finetune.safetensors", "sd15_base.safetensors", "sd15_finetune.safetensors"}
    assert set(choices["base"]) == expected
    assert expected <= set(choices["variant"]) and expected <= set(choices["variant2"])
    assert services.resolve_checkpoint("anima-base.safetensors") == neo.diffusion_models / "anima-base.safetensors"
    assert services.checkpoint_title(neo.diffusion_models / "anima-finetune.safetensors") == "anima-finetune.safetensors"


def test_a_pair_from_the_diffusion_model_folder_extracts_with_the_anima_preset(neo):
    from lib_ckpt2lora.ui.webui_services import WebUIServices

    blocks = build_tab(WebUIServices())
    tab = blocks.ckpt2lora
    values = dict(vars(job.Form()))
    values.update(base="anima-base.safetensors", variant="anima-finetune.safetensors", name="anima_style")
    data = run_event(blocks, tab.handler, ["task(test)"] + [values[f] for f in job.FORM_FIELDS])
    assert "Saved the LoRA" in data[-1], data[-1]
    with safe_open(str(neo.loras / "anima_style.safetensors"), "pt") as lora:
        assert lora.metadata()["ckpt2lora_architecture"] == "anima"
        keys = list(lora.keys())
    assert "diffusion_model.blocks.0.mlp.layer1.lora_A.weight" in keys and not any(".net." in key for key in keys)
    sidecar = json.loads((neo.loras / "anima_style.json").read_text())
    assert sidecar["sd version"] == "anima"

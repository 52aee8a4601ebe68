"""Inside Forge Neo the tab writes --format neo by default (issue 11 section 1).

Neo is the one WebUI that runs Z-Image, and its @3df257a era keeps one LoRA patch per
weight, so split q/k/v modules lose q and k there (tests/test_neo_patcher.py). The tab
knows it is in Neo by Neo's Z-Image engine module, ``backend.diffusion_engine.zimage``,
which Neo's model loader imports at start-up; A1111, Forge and Forge Classic lack it.
"""

from __future__ import annotations

import sys
import types

from safetensors import safe_open
from uihelpers import run_event

from lib_ckpt2lora import demo
from lib_ckpt2lora.ui import job
from lib_ckpt2lora.ui.tab import build_tab
from lib_ckpt2lora.ui.webui_services import WebUIServices

NEO_ENGINE = "backend.diffusion_engine.zimage"


def zimage_tab(webui):
    from modules import sd_models

    demo.make_pair(webui.models, dim=64, blocks=2)
    sd_models.list_models()
    return build_tab(WebUIServices())


def extract_with_the_tab_defaults(blocks) -> list:
    tab = blocks.ckpt2lora
    services = tab.services
    titles = services.list_checkpoints()
    values = dict(vars(job.Form()))
    values.update(
        base=next(t for t in titles if t.startswith("demo_base")),
        variant=next(t for t in titles if t.startswith("demo_variant")),
        name="zimage",
        format=tab.components["format"].value,  # what the page shows before anyone touches it
    )
    return run_event(blocks, tab.handler, ["task(test)"] + [values[f] for f in job.FORM_FIELDS])


def lora_keys(webui) -> list[str]:
    with safe_open(str(webui.loras / "zimage.safetensors"), "pt") as f:
        return list(f.keys())


def test_inside_neo_the_tab_writes_the_fused_qkv_format(webui, monkeypatch):
    monkeypatch.setitem(sys.modules, NEO_ENGINE, types.ModuleType(NEO_ENGINE))
    blocks = zimage_tab(webui)
    assert blocks.ckpt2lora.components["format"].value == "neo"
    data = extract_with_the_tab_defaults(blocks)
    assert "Saved the LoRA" in data[-1], data[-1]
    keys = lora_keys(webui)
    assert "diffusion_model.layers.0.attention.qkv.lora_down.weight" in keys
    assert not any(".to_q." in key or ".to_k." in key or ".to_v." in key for key in keys)


def test_elsewhere_the_tab_keeps_the_split_default(webui, monkeypatch):
    monkeypatch.delitem(sys.modules, NEO_ENGINE, raising=False)
    blocks = zimage_tab(webui)
    assert blocks.ckpt2lora.components["format"].value == "auto"
    data = extract_with_the_tab_defaults(blocks)
    assert "Saved the LoRA" in data[-1], data[-1]
    keys = lora_keys(webui)
    assert "diffusion_model.layers.0.attention.to_q.lora_A.weight" in keys

"""The tab's side of issue 10 §4: "List layers", a low-rank checkpoint's Detail LoRA, and
messages that name the tab's controls (never a CLI flag)."""

from __future__ import annotations

import json
import re

import pytest
from uihelpers import form_inputs, run_event, standalone_tab

from lib_ckpt2lora.ui import job

# job.FLAG_LABELS entry -> the tab component it names
FLAG_COMPONENTS = {
    "--base": "base",
    "--variant": "variant",
    "--variant2": "variant2",
    "--out": "name",
    "--alpha": "alpha",
    "--rank": "rank",
    "--rank-thresh": "rank_thresh",
    "--rank-max": "rank_max",
    "--min-dim": "min_dim",
    "--include": "include",
    "--exclude": "exclude",
    "--full-layer": "full_layer",
    "--detail": "detail",
    "--detail-scale": "detail_scale",
    "--format": "format",
    "--save-dtype": "save_dtype",
    "--device": "device",
    "--svd": "svd",
    "--overwrite": "overwrite",
}


@pytest.fixture
def tab(tmp_path):
    return standalone_tab(tmp_path)


inputs = form_inputs


def test_flag_labels_are_the_tabs_own_labels(tab):
    blocks = tab[0]
    components = blocks.ckpt2lora.components
    for flag, name in FLAG_COMPONENTS.items():
        label = job.FLAG_LABELS[flag]
        assert components[name].label.startswith(label), (flag, label, components[name].label)
    kinds = [f"Output: {kind}" for kind in job.OUTPUT_KINDS]
    assert job.FLAG_LABELS["--checkpoint"] in kinds and job.FLAG_LABELS["--checkpoint-full"] in kinds
    assert blocks.ckpt2lora.list_button.value == job.FLAG_LABELS["--list-layers"]


def test_list_layers_shows_the_plan_in_the_tab_and_writes_nothing(tab):
    blocks, models, loras = tab
    before = sorted(p.name for p in models.iterdir()) + sorted(p.name for p in loras.iterdir())
    [shown] = run_event(
        blocks, blocks.ckpt2lora.list_layers, inputs(base="base.safetensors", variant="tuned.safetensors", include="attn")
    )
    assert shown.get("visible") is True
    text = shown["value"]
    assert re.search(r"^\d+ of \d+ layers would be extracted\.$", text, re.M), text
    assert "not in 'Include only'" in text and not re.search(r"--[a-z]", text)
    assert sorted(p.name for p in models.iterdir()) + sorted(p.name for p in loras.iterdir()) == before


def test_low_rank_checkpoint_with_detail_puts_the_detail_lora_in_the_lora_folder(tab):
    blocks, models, loras = tab
    form = inputs(
        base="base.safetensors", variant="tuned.safetensors", output_kind=job.OUTPUT_KINDS[1], name="low", rank=1, detail=True
    )
    status = run_event(blocks, blocks.ckpt2lora.handler, form)[-1]
    assert "ckpt2lora-error" not in status, status
    assert (models / "low.safetensors").is_file()
    assert (loras / "low_detail.safetensors").is_file() and not (models / "low_detail.safetensors").exists()
    assert "Detail residual" in json.loads((loras / "low_detail.json").read_text())["description"]
    assert "low_detail.safetensors" in status


def test_full_checkpoint_with_detail_is_refused_in_the_tabs_words(tab):
    blocks, models, loras = tab
    form = inputs(base="base.safetensors", variant="tuned.safetensors", output_kind=job.OUTPUT_KINDS[2], name="m", detail=True)
    status = run_event(blocks, blocks.ckpt2lora.handler, form)[-1]
    assert "ckpt2lora-error" in status and "Detail" in status and "Checkpoint (full delta)" in status
    assert not re.search(r"--[a-z]", status)
    assert not (models / "m.safetensors").exists()

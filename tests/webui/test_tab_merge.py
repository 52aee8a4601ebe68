"""The tab's "Merge LoRAs" section (issue 20): LoRAs picked from the Lora list with weights,
merged (or one resized) into the Lora folder, with the same status, table and chart as an
extraction; every mistake one sentence in the tab's words, nothing written."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from uihelpers import run_event, write_pair

from lib_ckpt2lora.ui import merge_job
from lib_ckpt2lora.ui.merge_job import MERGE_FIELDS, MergeForm

MODULES = {  # kohya SD1.5 names (diffusers paths) with their weights' shapes
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 48),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (192, 48),
}


def write_lora(path, seed: int, rank: int = 2):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (rows, cols) in MODULES.items():
        tensors[module + ".lora_down.weight"] = torch.randn(rank, cols, generator=gen) * 0.1
        tensors[module + ".lora_up.weight"] = torch.randn(rows, rank, generator=gen) * 0.1
        tensors[module + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})


def product(path, module):
    lora = load_file(str(path))
    down, up = lora[module + ".lora_down.weight"].double(), lora[module + ".lora_up.weight"].double()
    return up @ down * float(lora[module + ".alpha"]) / down.shape[0]


@pytest.fixture
def tab(tmp_path):
    from lib_ckpt2lora.ui.standalone_services import StandaloneServices
    from lib_ckpt2lora.ui.tab import build_tab

    models, loras = tmp_path / "checkpoints", tmp_path / "loras"
    write_pair(models, "base.safetensors", "tuned.safetensors")
    loras.mkdir()
    write_lora(loras / "style.safetensors", seed=1)
    write_lora(loras / "detail.safetensors", seed=2)
    blocks = build_tab(StandaloneServices(models, loras))
    blocks.queue()
    return blocks, loras


def run_merge(blocks, **changes):
    values = dict(vars(MergeForm()))
    values.update(changes)
    events = blocks.ckpt2lora.merge.events
    return run_event(blocks, events.handler, [values[f] for f in MERGE_FIELDS])


def test_section_is_in_the_tab_with_the_extraction_labels(tab):
    blocks, _ = tab
    controls = blocks.ckpt2lora.merge.layout.inputs
    assert set(controls) == set(MERGE_FIELDS)
    assert controls["rank"].label == "Rank" and controls["target_size"].label == "Target size (MB)"
    assert blocks.ckpt2lora.services.list_loras() == ["detail", "style"]  # the Lora list's names
    assert "style" in str(controls["loras"].choices)


def test_merge_writes_the_weighted_sum_and_shows_table_and_chart(tab):
    blocks, loras = tab
    names = ["style", "detail"]
    table, chart_html, _, status = run_merge(blocks, loras=names, weights="0.5, -1", name="mix", rank=8)
    assert "ckpt2lora-ok" in status and "mix.safetensors" in status and "&lt;lora:mix:1&gt;" in status, status
    out = loras / "mix.safetensors"
    assert out.is_file() and (loras / "mix.json").is_file()  # the Lora card's sidecar
    weights = dict(zip(names, (0.5, -1.0)))
    for module in MODULES:
        expected = sum(w * product(loras / f"{n}.safetensors", module) for n, w in weights.items())
        assert float((product(out, module) - expected).norm() / expected.norm()) < 1e-3, module
    rows = table["value"]["data"] if isinstance(table, dict) and "value" in table else table.get("data", table)
    assert rows and any("Total" in str(row) for row in rows)
    shown = chart_html["value"] if isinstance(chart_html, dict) else chart_html
    assert "<svg" in str(shown)


def test_one_lora_is_resized(tab):
    blocks, loras = tab
    status = run_merge(blocks, loras=["style"], rank=1, name="small")[-1]
    assert "ckpt2lora-ok" in status, status
    lora = load_file(str(loras / "small.safetensors"))
    assert {lora[m + ".lora_down.weight"].shape[0] for m in MODULES} == {1}


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(loras=[]), "Choose one LoRA"),
        (dict(loras=["style", "detail"], weights="0.5"), "'Weights' holds 1 number(s) for 2"),
        (dict(loras=["style"], weights="half"), "'Weights' must be numbers"),
        (dict(loras=["style"], name="style", overwrite=True), "would replace one of the LoRAs"),
        (dict(loras=["style"], rank=4, target_size=1), "'Rank'"),
        (dict(loras=["style"], name="detail"), "already exists in the Lora folder"),
    ],
)
def test_mistakes_are_one_sentence_in_the_tabs_words_and_write_nothing(tab, changes, words):
    blocks, loras = tab
    before = sorted(p.name for p in loras.iterdir())
    status = run_merge(blocks, **changes)[-1]
    assert "ckpt2lora-error" in status, status
    assert words.replace("'", "&#x27;") in status, (words, status)
    assert not re.search(r"--[a-z]", status), status
    assert sorted(p.name for p in loras.iterdir()) == before


def test_output_name_follows_the_loras_until_typed():
    assert merge_job.default_merge_name(["a.safetensors"]) == "a_resized"
    assert merge_job.default_merge_name(["sub/a.safetensors", "b.safetensors"]) == "merged_a_b"
    assert merge_job.parse_weights("", 3) == [1.0, 1.0, 1.0]
    assert merge_job.parse_weights("0.5; -0.7", 2) == [0.5, -0.7]


def test_merge_inside_the_webui_with_its_task_id_and_lora_list(webui):
    """The (stub) WebUI host: its Lora list, its queue and progress (the task id input)."""
    import networks

    from lib_ckpt2lora.ui.tab import build_tab
    from lib_ckpt2lora.ui.webui_services import WebUIServices

    write_lora(webui.loras / "a.safetensors", seed=1)
    write_lora(webui.loras / "b.safetensors", seed=2)
    networks.list_available_networks()
    blocks = build_tab(WebUIServices())
    services = blocks.ckpt2lora.services
    assert {"a", "b"} <= set(services.list_loras())
    values = dict(vars(MergeForm()))
    values.update(loras=["a", "b"], weights="1, 0.5", name="ab", rank=4)
    data = run_event(blocks, blocks.ckpt2lora.merge.events.handler, ["task(merge)"] + [values[f] for f in MERGE_FIELDS])
    assert "Saved the LoRA" in data[-1], data[-1]
    assert (webui.loras / "ab.safetensors").is_file() and (webui.loras / "ab.json").is_file()
    assert "ab" in services.list_loras()  # the Lora list was refreshed

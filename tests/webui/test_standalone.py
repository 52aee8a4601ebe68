"""The same tab as a standalone gradio app (python -m lib_ckpt2lora.ui)."""

from __future__ import annotations

import json

import pytest
from uihelpers import generic_shapes, run_event, write_pair

from lib_ckpt2lora.ui import job
from lib_ckpt2lora.ui.__main__ import main, parse_args
from lib_ckpt2lora.ui.standalone_services import StandaloneServices
from lib_ckpt2lora.ui.tab import build_tab


@pytest.fixture
def folders(tmp_path):
    models, loras = tmp_path / "checkpoints", tmp_path / "loras"
    write_pair(models / "sd15", "base.safetensors", "tuned.safetensors")
    loras.mkdir()
    return models, loras


def standalone(models, loras, **kwargs):
    services = StandaloneServices(models, loras, **kwargs)
    blocks = build_tab(services)
    blocks.queue()  # as __main__ does: gr.Progress needs the queue
    return blocks


def inputs(**changes):
    values = dict(vars(job.Form()))
    values.update(changes)
    return [values[f] for f in job.FORM_FIELDS]


def test_standalone_lists_files_and_extracts(folders):
    models, loras = folders
    blocks = standalone(models, loras)
    tab = blocks.ckpt2lora
    assert tab.services.list_checkpoints() == ["sd15/base.safetensors", "sd15/tuned.safetensors"]
    assert tab.components["free_model"].visible is False  # no WebUI model to free
    data = run_event(blocks, tab.handler, inputs(base="sd15/base.safetensors", variant="sd15/tuned.safetensors"))
    table, chart, send, use, name, compare_button, select_base, *_, status = data  # *_: base, variant, the Wan experts
    assert "Saved the LoRA" in status and "tuned.safetensors" in status
    assert (loras / "tuned.safetensors").is_file()
    assert json.loads((loras / "tuned.json").read_text())["sd version"] == "SD1"
    assert "<svg" in chart["value"]
    assert send.get("visible") is False  # no txt2img here
    assert compare_button.get("visible") is False and select_base.get("visible") is False
    assert tab.compare_handler is None  # nothing generates images outside the WebUI
    variant = run_event(blocks, tab.refresh_choices, [])[1]
    assert "LoRA: tuned" in [c[0] if isinstance(c, (list, tuple)) else c for c in variant["choices"]]


def test_standalone_checkpoint_output_is_listed(folders):
    models, loras = folders
    blocks = standalone(models, loras)
    tab = blocks.ckpt2lora
    data = run_event(
        blocks,
        tab.handler,
        inputs(base="sd15/base.safetensors", variant="sd15/tuned.safetensors", output_kind=job.OUTPUT_KINDS[2], name="merged"),
    )
    assert "ckpt2lora-error" not in data[-1], data[-1]
    assert (models / "merged.safetensors").is_file()
    assert "merged.safetensors" in tab.services.list_checkpoints()
    assert data[3].get("visible") is False  # nothing to switch to outside the WebUI


def test_standalone_stop(folders):
    models, loras = folders
    blocks = standalone(models, loras)
    services = blocks.ckpt2lora.services

    def extract_then_stop(opts, progress=None, should_stop=None, log=None):
        from lib_ckpt2lora.extract import extract

        def progress_and_stop(done, total, layer):
            progress(done, total, layer)
            if done == 1:
                services.request_stop()

        return extract(opts, progress=progress_and_stop, should_stop=should_stop, log=log)

    services._extract_fn = extract_then_stop
    data = run_event(blocks, blocks.ckpt2lora.handler, inputs(base="sd15/base.safetensors", variant="sd15/tuned.safetensors"))
    assert job.STOPPED in data[-1]
    assert list(loras.iterdir()) == []


def test_generic_models_work_too(tmp_path):
    models, loras = tmp_path / "m", tmp_path / "l"
    write_pair(models, "a.safetensors", "b.safetensors", shapes=generic_shapes())
    loras.mkdir()
    blocks = standalone(models, loras)
    data = run_event(blocks, blocks.ckpt2lora.handler, inputs(base="a.safetensors", variant="b.safetensors", name="g"))
    assert "Saved the LoRA" in data[-1]
    assert json.loads((loras / "g.json").read_text())["sd version"] == "Unknown"


def test_command_line(tmp_path, capsys):
    args = parse_args(["--models-dir", str(tmp_path), "--lora-dir", str(tmp_path), "--port", "7999"])
    assert args.port == 7999 and args.host == "127.0.0.1"
    assert main(["--models-dir", str(tmp_path / "missing"), "--lora-dir", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err

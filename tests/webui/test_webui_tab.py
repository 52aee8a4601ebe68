"""The tab inside the (stub) WebUI, run end to end on tiny checkpoints with the real engine.

Run under gradio 4.40.0 (Forge, Neo) and 3.41.2 (A1111) by run_ui_tests.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
from uihelpers import generic_shapes, run_event, write_pair

from lib_ckpt2lora.ui import job
from lib_ckpt2lora.ui.tab import build_tab

HERE = Path(__file__).resolve().parent
GRADIO = gr.__version__


def webui_tab():
    from lib_ckpt2lora.ui.webui_services import WebUIServices

    return build_tab(WebUIServices())


def title_of(services, prefix: str) -> str:
    return next(t for t in services.list_checkpoints() if t.startswith(prefix))


def form_inputs(tab, **changes) -> list:
    values = dict(vars(job.Form()))
    values.update(changes)
    return ["task(test)"] + [values[f] for f in job.FORM_FIELDS]


def extract(blocks, **changes) -> list:
    tab = blocks.ckpt2lora
    return run_event(blocks, tab.handler, form_inputs(tab, **changes))


@pytest.fixture
def sd15(webui):
    """The stub WebUI with an SD1.5-layout base and fine-tune in its checkpoint folder."""
    from modules import sd_models

    write_pair(webui.models, "sd15_base.safetensors", "sd15_finetune.safetensors")
    sd_models.list_models()
    return webui


def error_text(status: str) -> str:
    assert "ckpt2lora-error" in status, status
    text = status.split(">", 1)[1].split("</div>", 1)[0]
    assert "Traceback" not in text and "\n" not in text
    return text


# -- loading ---------------------------------------------------------------------------
def test_extension_loads_like_a1111_and_extracts(tmp_path):
    """scripts/ckpt2lora.py executed the WebUI's way in a clean process, tab rendered, Extract run."""
    run = subprocess.run(
        [sys.executable, str(HERE / "webui_boot.py"), str(tmp_path)],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("BOOT-RESULT "))
    result = json.loads(line[len("BOOT-RESULT ") :])
    assert result["lib_importable_before"] is False  # the root is on sys.path only while the script runs
    assert result["root_on_path_after"] is False
    assert result["tabs"] == [["ckpt2lora", "ckpt2lora"]]
    for elem_id in (
        "ckpt2lora_base",
        "ckpt2lora_variant",
        "ckpt2lora_extract",
        "ckpt2lora_stop",
        "ckpt2lora_refresh",
        "ckpt2lora_status",
        "ckpt2lora_table",
        "ckpt2lora_chart",
        "ckpt2lora_send_txt2img",
        "ckpt2lora_free_model",
        "ckpt2lora_overwrite",
    ):
        assert elem_id in result["elem_ids"]
    assert all(" [" in title for title in result["titles"])  # A1111 titles carry the hash
    assert "Saved the LoRA" in result["status"]
    assert result["lora_exists"]
    assert result["sidecar"]["sd version"] == "SD1"
    assert result["sidecar"]["preferred weight"] == 1
    assert "sd15_finetune" in result["sidecar"]["description"] and "sd15_base" in result["sidecar"]["description"]
    assert result["networks"] == ["sd15_finetune"]  # the Lora list was refreshed
    assert result["result_name"] == "sd15_finetune"
    assert "LoRA: sd15_finetune" in [c[0] if isinstance(c, list) else c for c in result["variant_choices"]]
    assert result["lora_dir_files"] == ["sd15_finetune.json", "sd15_finetune.safetensors"]


def test_tab_lists_the_webuis_models(sd15):
    blocks = webui_tab()
    tab = blocks.ckpt2lora
    base = tab.components["base"]
    choices = [c[0] if isinstance(c, (tuple, list)) else c for c in base.choices]
    assert any(c.startswith("sd15_base.safetensors [") for c in choices)
    assert tab.components["free_model"].visible is True
    assert tab.components["free_model"].value is False
    assert tab.components["overwrite"].value is False
    assert tab.send_button.visible is False


def test_refresh_button_updates_all_lists(sd15):
    blocks = webui_tab()
    write_pair(sd15.models, "later_base.safetensors", "later_variant.safetensors", shapes=generic_shapes())
    on_refresh = next(f.fn for f in _fns(blocks) if f.fn is not None and f.fn.__name__ == "on_refresh")
    base, variant, variant2, base_low, variant_low = run_event(blocks, on_refresh, [])
    assert any(str(c).startswith("later_base") or "later_base" in str(c) for c in base["choices"])
    assert any("later_variant" in str(c) for c in variant["choices"])
    assert "None" in str(variant2["choices"][0])
    assert base_low["choices"] == base["choices"] and variant_low["choices"] == variant["choices"]  # Wan 2.2 experts


def _fns(blocks):
    return list(blocks.fns.values()) if isinstance(blocks.fns, dict) else list(blocks.fns)


# -- extracting ------------------------------------------------------------------------
def test_extract_writes_lora_sidecar_table_and_chart(sd15):
    from modules import sd_models

    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    base, variant = title_of(services, "sd15_base"), title_of(services, "sd15_finetune")
    data = extract(blocks, base=base, variant=variant, name="my lora")
    table, chart, send, use, name, compare_button, select_base, result_base, result_variant, *_, status = data
    assert "Saved the LoRA" in status and "my lora.safetensors" in status
    assert (sd15.loras / "my lora.safetensors").is_file()
    sidecar = json.loads((sd15.loras / "my lora.json").read_text())
    assert sidecar["sd version"] == "SD1" and sidecar["preferred weight"] == 1
    if os.name != "nt":  # not private (mkstemp's 0600): the LoRA's own mode
        assert (sd15.loras / "my lora.json").stat().st_mode == (sd15.loras / "my lora.safetensors").stat().st_mode
    rows = table["value"]["data"] if isinstance(table["value"], dict) else table["value"]
    assert rows[-1][0] == "Total" and rows[-1][1] == "ALL"
    assert any(r[0].startswith("IN-1") for r in rows) and any(r[0].startswith("text_encoder") for r in rows)
    assert table.get("visible") is True
    assert "<svg" in chart["value"] and "ckpt2lora-bar" in chart["value"] and chart["visible"] is True
    assert send.get("visible") is True and use.get("visible") is False
    assert name == "my lora"
    assert compare_button.get("visible") is True and select_base.get("visible") is True
    assert (result_base, result_variant) == (base, variant)
    assert len(sd_models.checkpoints_list) == 2  # a LoRA does not touch the checkpoint list


def test_progress_goes_to_the_webuis_state(sd15, monkeypatch):
    """Each layer: shared.state.job_count/job_no/textinfo for the progress bar, under the task id."""
    from modules import progress, shared, shared_state

    seen = []

    class Recording(shared_state.State):
        def __setattr__(self, key, value):
            super().__setattr__(key, value)
            if key == "textinfo" and value:
                seen.append((self.job_no, self.job_count, value, progress.current_task))

    monkeypatch.setattr(shared, "state", Recording())
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    data = extract(blocks, base=title_of(services, "sd15_base"), variant=title_of(services, "sd15_finetune"))
    assert "Saved the LoRA" in data[-1]
    layers = [s for s in seen if s[1] > 0]
    assert len(layers) >= 10
    total = layers[0][1]
    assert [s[0] for s in layers] == list(range(1, total + 1))
    assert all(s[3] == "task(test)" for s in seen)
    assert any("input_blocks.1.1.transformer_blocks.0.attn1.to_q" in s[2] for s in layers)
    assert "task(test)" in progress.finished_tasks
    assert shared.state.job_count == 0  # state.end() ran


@pytest.mark.parametrize(
    "output",
    [{"detail": True}, {"output_kind": job.OUTPUT_KINDS[1]}, {"output_kind": job.OUTPUT_KINDS[2]}],
    ids=["lora+detail", "checkpoint-lowrank", "checkpoint-full"],
)
def test_webui_interrupt_stops_within_one_layer_and_leaves_nothing(sd15, monkeypatch, output):
    from modules import shared, shared_state

    numbers = []

    class InterruptAfterTwo(shared_state.State):
        def __setattr__(self, key, value):
            super().__setattr__(key, value)
            if key == "job_no" and value:
                numbers.append(value)
                if value == 2:
                    self.interrupt()  # the WebUI's Interrupt button

    monkeypatch.setattr(shared, "state", InterruptAfterTwo())
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    before = sorted(p.name for p in sd15.models.iterdir())
    data = extract(blocks, base=title_of(services, "sd15_base"), variant=title_of(services, "sd15_finetune"), **output)
    assert job.STOPPED in data[-1]
    assert max(numbers) <= 3  # at most the layer under way finishes
    assert list(sd15.loras.iterdir()) == []
    assert sorted(p.name for p in sd15.models.iterdir()) == before
    assert data[2].get("visible") is False


def test_stop_button_stops_our_job(sd15, monkeypatch):
    from modules import shared, shared_state

    blocks = webui_tab()
    tab = blocks.ckpt2lora
    numbers = []

    class PressStop(shared_state.State):
        def __setattr__(self, key, value):
            super().__setattr__(key, value)
            if key == "job_no" and value:
                numbers.append(value)
                if value == 1:
                    run_event(blocks, tab.services.request_stop, [])  # our Stop button's event

    monkeypatch.setattr(shared, "state", PressStop())
    data = extract(blocks, base=title_of(tab.services, "sd15_base"), variant=title_of(tab.services, "sd15_finetune"))
    assert job.STOPPED in data[-1]
    assert max(numbers) <= 2
    assert list(sd15.loras.iterdir()) == []
    # A later run is not stopped by that old request, nor by a Stop pressed while idle.
    run_event(blocks, tab.services.request_stop, [])
    monkeypatch.setattr(shared, "state", shared_state.State())
    data = extract(blocks, base=title_of(tab.services, "sd15_base"), variant=title_of(tab.services, "sd15_finetune"))
    assert "Saved the LoRA" in data[-1]


def test_extract_waits_for_a_running_generation(sd15):
    """The job takes the WebUI's queue lock: it never runs beside a txt2img generation."""
    from modules import call_queue

    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    inputs = form_inputs(blocks.ckpt2lora, base=title_of(services, "sd15_base"), variant=title_of(services, "sd15_finetune"))
    results = []
    with call_queue.queue_lock:  # a generation is running
        worker = threading.Thread(target=lambda: results.append(run_event(blocks, blocks.ckpt2lora.handler, inputs)))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not results
        assert list(sd15.loras.iterdir()) == []
    worker.join(timeout=120)
    assert results and "Saved the LoRA" in results[0][-1]


def test_stop_while_waiting_for_a_generation(sd15):
    """Stop pressed while our job waits behind a generation: it ends without writing."""
    from modules import call_queue

    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    inputs = form_inputs(blocks.ckpt2lora, base=title_of(services, "sd15_base"), variant=title_of(services, "sd15_finetune"))
    results = []
    with call_queue.queue_lock:
        worker = threading.Thread(target=lambda: results.append(run_event(blocks, blocks.ckpt2lora.handler, inputs)))
        worker.start()
        time.sleep(0.5)
        run_event(blocks, services.request_stop, [])
    worker.join(timeout=120)
    assert results and job.STOPPED in results[0][-1]
    assert list(sd15.loras.iterdir()) == []


def test_free_model_only_when_asked(sd15, monkeypatch):
    from modules import sd_models

    calls = []
    monkeypatch.setattr(sd_models, "unload_model_weights", lambda *a, **k: calls.append(1))
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    base, variant = title_of(services, "sd15_base"), title_of(services, "sd15_finetune")
    extract(blocks, base=base, variant=variant, name="a")
    assert calls == []
    extract(blocks, base=base, variant=variant, name="b", free_model=True)
    assert calls == [1]


def test_neo_sidecar_uses_preset_names(sd15, monkeypatch):
    stub_neo = HERE / "stub_neo"
    import importlib.util

    spec = importlib.util.spec_from_file_location("network", stub_neo / "network.py")
    neo_network = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(neo_network)
    monkeypatch.setitem(sys.modules, "network", neo_network)
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    extract(blocks, base=title_of(services, "sd15_base"), variant=title_of(services, "sd15_finetune"), name="neo")
    assert json.loads((sd15.loras / "neo.json").read_text())["sd version"] == "sd"


def test_a_lora_from_the_lora_list_as_variant(sd15):
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    base = title_of(services, "sd15_base")
    extract(blocks, base=base, variant=title_of(services, "sd15_finetune"), name="first")
    assert "first" in services.list_loras()
    data = extract(blocks, base=base, variant=job.LORA_PREFIX + "first", name="again", rank=2)
    assert "Saved the LoRA" in data[-1], data[-1]
    assert (sd15.loras / "again.safetensors").is_file()


def test_two_variants_union(sd15):
    from modules import sd_models

    write_pair(sd15.models, "unused.safetensors", "sd15_other.safetensors", seed=0)  # same base weights, other delta
    (sd15.models / "unused.safetensors").unlink()
    sd_models.list_models()
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    data = extract(
        blocks,
        base=title_of(services, "sd15_base"),
        variant=title_of(services, "sd15_finetune"),
        variant2=title_of(services, "sd15_other"),
        mode="union",
        alpha=0.75,
        name="both",
    )
    assert "Saved the LoRA" in data[-1], data[-1]
    description = json.loads((sd15.loras / "both.json").read_text())["description"]
    assert "union" in description and "sd15_other" in description


def test_checkpoint_output_goes_to_the_checkpoint_folder(sd15):
    from modules import sd_models

    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    data = extract(
        blocks,
        base=title_of(services, "sd15_base"),
        variant=title_of(services, "sd15_finetune"),
        output_kind=job.OUTPUT_KINDS[1],
        name="merged_lowrank",
    )
    status = data[-1]
    assert "Saved the checkpoint" in status, status
    assert (sd15.models / "merged_lowrank.safetensors").is_file()
    title = data[4]
    assert title in sd_models.checkpoints_list  # the list was refreshed; the title selects it
    assert data[3].get("visible") is True and data[2].get("visible") is False
    base_choices = run_event(blocks, blocks.ckpt2lora.refresh_choices, [])[0]["choices"]
    assert any(title == c or title in str(c) for c in base_choices)
    assert not (sd15.loras / "merged_lowrank.json").exists()


# -- errors: one sentence in the tab, nothing written ----------------------------------
def test_errors_are_one_clear_sentence(sd15):
    from modules import sd_models

    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    base, variant = title_of(services, "sd15_base"), title_of(services, "sd15_finetune")

    assert error_text(extract(blocks, base=None, variant=variant)[-1]) == "Choose a base model."
    assert "Choose a variant" in error_text(extract(blocks, base=base, variant=None)[-1])
    assert "same file" in error_text(extract(blocks, base=base, variant=base)[-1])
    assert "second variant" in error_text(extract(blocks, base=base, variant=variant, mode="common")[-1])
    assert "inside the output folder" in error_text(extract(blocks, base=base, variant=variant, name="../x")[-1])

    extract(blocks, base=base, variant=variant, name="taken")
    message = error_text(extract(blocks, base=base, variant=variant, name="taken")[-1])
    assert "already exists" in message and "Overwrite" in message
    assert "Saved" in extract(blocks, base=base, variant=variant, name="taken", overwrite=True)[-1]

    write_pair(sd15.models, "gen_base.safetensors", "gen_variant.safetensors", shapes=generic_shapes())
    sd_models.list_models()
    message = error_text(extract(blocks, base=base, variant=title_of(services, "gen_variant"), name="mixed")[-1])
    assert "gen_variant" in message  # the engine's sentence, naming the file

    (sd15.models / "sd15_finetune.safetensors").unlink()
    assert "does not exist any more" in error_text(extract(blocks, base=base, variant=variant, name="gone")[-1])
    files = sorted(p.name for p in sd15.loras.iterdir())
    assert files == ["taken.json", "taken.safetensors"]


def test_unexpected_engine_failure_is_reported_not_raised(sd15):
    from lib_ckpt2lora.ui.webui_services import WebUIServices

    def broken(opts, progress=None, should_stop=None, log=None):
        raise RuntimeError("boom\nsecond line")

    blocks = build_tab(WebUIServices(extract_fn=broken))
    services = blocks.ckpt2lora.services
    data = extract(blocks, base=title_of(services, "sd15_base"), variant=title_of(services, "sd15_finetune"))
    text = error_text(data[-1])
    assert text.startswith("The extraction failed unexpectedly (RuntimeError: boom)")

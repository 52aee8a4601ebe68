"""The tab in a WebUI that stays up for days (issue 21), in the stub WebUI.

* A new Extract clears the previous Compare (images and SSIM line) and the List layers box.
* Stop during Compare stops the image being sampled, through the WebUI's own
  ``shared.state.interrupt()`` (A1111 1.10 and Forge Neo @3df257a: the CFG denoiser raises
  InterruptedException on ``state.interrupted`` at every step; the stub's sampling loop
  checks it at every step), and never interrupts a txt2img of the user's that Compare waits for.
* Two Extract presses (two browser tabs) never run at once, and Extract waits while
  txt2img holds the WebUI's queue (``modules.call_queue.queue_lock``, taken by
  ``wrap_gradio_gpu_call`` around txt2img in both WebUIs and around our jobs).
Run under gradio 4.40.0 and 3.41.2 (run_ui_tests.sh).
"""

from __future__ import annotations

import threading
import time

from test_webui_compare import SETTINGS, extracted, run_compare  # noqa: F401 (extracted: a fixture)
from test_webui_tab import extract, form_inputs, title_of
from uihelpers import fn_index, run_event, write_pair

from lib_ckpt2lora.ui import compare
from lib_ckpt2lora.ui.tab import build_tab


def dependency(blocks, fn) -> dict:
    """The event's config (gradio 3 and 4 spell targets differently)."""
    return blocks.config["dependencies"][fn_index(blocks, fn)]


def triggers(dep: dict) -> set:
    targets = dep["targets"]
    if targets and isinstance(targets[0], (list, tuple)):  # gradio 4: [[id, "click"], ...]
        return {(target_id, event) for target_id, event in targets}
    return {(target_id, dep["trigger"]) for target_id in targets}  # gradio 3


def test_a_new_extract_clears_the_previous_compare_and_layers(extracted):  # noqa: F811
    blocks, data, base, variant = extracted
    tab = blocks.ckpt2lora
    view, status = run_compare(blocks, data)
    assert view["visible"] is True and "SSIM" in status
    listed = run_event(blocks, tab.list_layers, form_inputs(tab, base=base, variant=variant)[1:])
    assert listed[0]["visible"] is True

    # The Extract press also fires the clearing, outside the queue (at once, even while the
    # job waits for the WebUI's queue), on the Compare view, its status line and the list.
    clear = dependency(blocks, tab.clear_previous)
    assert triggers(clear) == {(tab.extract_button._id, "click")}
    assert clear["outputs"] == [c._id for c in (*tab.compare_outputs, tab.layers)]
    assert clear["queue"] is False
    assert triggers(dependency(blocks, tab.handler)) == triggers(clear)
    view, status, layers = run_event(blocks, tab.clear_previous, [])
    assert view["visible"] is False and view.get("value") == "" and status == ""
    assert layers["visible"] is False and layers.get("value") == ""
    # Then a failed Extract (base and variant the same file): nothing brings the old view back.
    result = extract(blocks, base=base, variant=base, name="again")
    assert "ckpt2lora-error" in result[-1]
    assert result[5]["visible"] is False  # no Compare button for a failed run


def test_stop_during_compare_stops_the_image_being_sampled(extracted, monkeypatch):  # noqa: F811
    from modules import processing

    blocks, data, _, _ = extracted
    services = blocks.ckpt2lora.services
    assert fn_index(blocks, services.request_stop) >= 0  # what the Stop button runs
    steps = []

    def press_stop_at_step_two(p, step):
        steps.append((p.prompt, step))
        if step == 2:
            services.request_stop()

    monkeypatch.setattr(processing, "_on_sampling_step", press_stop_at_step_two)  # a test hook, not a WebUI name
    view, status = run_compare(blocks, data, dict(SETTINGS, steps="20"))
    assert compare.INTERRUPTED in status and "ckpt2lora-stopped" in status and "SSIM" not in status
    assert view["visible"] is False
    # The sampler stopped at the step of the press: not the 17 steps after it, nor a second image.
    assert [step for _, step in steps] == [0, 1, 2], steps


def test_stop_while_compare_waits_leaves_the_users_txt2img_alone(extracted, monkeypatch):  # noqa: F811
    from modules import call_queue, processing, shared

    blocks, data, _, _ = extracted
    services = blocks.ckpt2lora.services
    steps, results = [], []
    monkeypatch.setattr(processing, "_on_sampling_step", lambda p, step: steps.append(step))
    with call_queue.queue_lock:  # the user's txt2img is generating
        worker = threading.Thread(target=lambda: results.append(run_compare(blocks, data)))
        worker.start()
        time.sleep(0.5)
        services.request_stop()  # Stop pressed while our Compare waits
        assert shared.state.interrupted is False, "the user's generation was interrupted"
    worker.join(timeout=60)
    assert results and compare.INTERRUPTED in results[0][-1]
    assert steps == []  # our Compare generated nothing


class OneAtATime:
    """An extract function that records how many runs overlap (and how they start)."""

    def __init__(self):
        from lib_ckpt2lora.extract import extract

        self.real = extract
        self.running = self.most = 0
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, opts, **kwargs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.started.set()
        try:
            time.sleep(0.3)  # widen the window two overlapping jobs would share
            return self.real(opts, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def tab_with(recorder, webui):
    from modules import sd_models

    from lib_ckpt2lora.ui.webui_services import WebUIServices

    write_pair(webui.models, "sd15_base.safetensors", "sd15_finetune.safetensors")
    sd_models.list_models()
    blocks = build_tab(WebUIServices(extract_fn=recorder))
    services = blocks.ckpt2lora.services
    return blocks, title_of(services, "sd15_base"), title_of(services, "sd15_finetune")


def test_two_extract_presses_from_two_browser_tabs_run_one_after_the_other(webui):
    recorder = OneAtATime()
    blocks, base, variant = tab_with(recorder, webui)
    results = {}

    def press(name):
        results[name] = extract(blocks, base=base, variant=variant, name=name)

    presses = [threading.Thread(target=press, args=(name,)) for name in ("first", "second")]
    for thread in presses:
        thread.start()
    for thread in presses:
        thread.join(timeout=120)
    assert recorder.most == 1, "two extractions ran at once"
    assert all("Saved the LoRA" in results[name][-1] for name in ("first", "second")), results
    assert sorted(p.name for p in webui.loras.glob("*.safetensors")) == ["first.safetensors", "second.safetensors"]


def test_extract_waits_while_txt2img_generates(webui):
    from modules import call_queue

    recorder = OneAtATime()
    blocks, base, variant = tab_with(recorder, webui)
    results = []
    with call_queue.queue_lock:  # txt2img holds the WebUI's queue
        worker = threading.Thread(target=lambda: results.append(extract(blocks, base=base, variant=variant, name="later")))
        worker.start()
        time.sleep(0.5)
        assert not recorder.started.is_set(), "the extraction started during txt2img"
    worker.join(timeout=120)
    assert results and "Saved the LoRA" in results[0][-1]

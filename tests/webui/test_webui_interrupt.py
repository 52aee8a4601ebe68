"""The WebUI's own Interrupt button stops the extraction on the first press (issue 11 s2).

The press runs the logic of A1111 1.10.1's ``modules/ui_toprow.py`` interrupt handler
(identical in lllyasviel Forge, Forge Classic and Forge Neo @3df257a), mirrored below:
with "Don't Interrupt in the middle" (``opts.interrupt_after_current``, A1111's default)
and ``job_count > 1`` it only sets ``state.stopping_generation``; the tab sets job_count
to the number of layers, so before the fix that first press was ignored.
"""

from __future__ import annotations

import pytest
from test_webui_tab import extract, title_of, webui_tab

from lib_ckpt2lora.ui import job


def interrupt_button_press():
    """ui_toprow.Toprow.create_submit_box's ``interrupt_function``, as in the WebUI (its
    gr.Info toast left out: it only shows a message)."""
    from modules import shared

    if not shared.state.stopping_generation and shared.state.job_count > 1 and shared.opts.interrupt_after_current:
        shared.state.stop_generating()
    else:
        shared.state.interrupt()


@pytest.fixture
def sd15(webui):
    from modules import sd_models
    from uihelpers import write_pair

    write_pair(webui.models, "sd15_base.safetensors", "sd15_finetune.safetensors")
    sd_models.list_models()
    return webui


@pytest.mark.parametrize("dont_interrupt_in_the_middle", [True, False], ids=["option-on", "option-off"])
@pytest.mark.parametrize("output", [{}, {"output_kind": job.OUTPUT_KINDS[1]}], ids=["lora", "checkpoint"])
def test_first_press_of_the_webuis_interrupt_stops_within_one_layer(sd15, monkeypatch, dont_interrupt_in_the_middle, output):
    from modules import shared, shared_state

    monkeypatch.setattr(shared.opts, "interrupt_after_current", dont_interrupt_in_the_middle)
    numbers, presses = [], []

    class PressOnceAtLayerTwo(shared_state.State):
        def __setattr__(self, key, value):
            super().__setattr__(key, value)
            if key == "job_no" and value:
                numbers.append(value)
                if value == 2 and not presses:
                    assert self.job_count > 1  # the layers count: the case A1111 treats as a batch
                    interrupt_button_press()
                    presses.append((self.interrupted, self.stopping_generation))

    monkeypatch.setattr(shared, "state", PressOnceAtLayerTwo())
    blocks = webui_tab()
    services = blocks.ckpt2lora.services
    before = sorted(p.name for p in sd15.models.iterdir())
    data = extract(blocks, base=title_of(services, "sd15_base"), variant=title_of(services, "sd15_finetune"), **output)
    # The press took the path the option selects: "stop after this image" or interrupt now.
    assert presses == [(False, True)] if dont_interrupt_in_the_middle else presses == [(True, False)]
    assert job.STOPPED in data[-1]
    assert max(numbers) <= 3  # at most the layer under way finishes
    assert list(sd15.loras.iterdir()) == []
    assert sorted(p.name for p in sd15.models.iterdir()) == before
    # The WebUI's wrapper clears both flags after the job: the next run is not stopped.
    assert not shared.state.stopping_generation and not shared.state.interrupted
    monkeypatch.setattr(shared, "state", shared_state.State())
    data = extract(blocks, base=title_of(services, "sd15_base"), variant=title_of(services, "sd15_finetune"), name="later")
    assert "Saved the LoRA" in data[-1]

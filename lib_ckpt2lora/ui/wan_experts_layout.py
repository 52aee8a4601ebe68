"""The tab's "Wan 2.2 experts" controls, laid out (wan_experts_wiring connects them).

Hidden until the chosen base is a model that comes as expert files (Wan 2.2 A14B: the 14B
shapes without CLIP image input, read from its header): an SDXL or Flux user never sees
them, a Wan 2.2 user sees them as soon as the high-noise (or low-noise) file is the base.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import gradio as gr

from . import wan_experts


def expert_inputs(c: dict, choices: dict[str, list[str]], element_id: Callable[[str], str]) -> SimpleNamespace:
    """Adds ``expert``, ``base_low`` and ``variant_low`` to ``c``; returns the parts whose
    visibility changes (``group``: everything; ``low_pair``: the low-noise dropdowns)."""
    with gr.Column(visible=False, elem_id=element_id("wan_experts"), elem_classes=["ckpt2lora-wan-experts"]) as group:
        c["expert"] = gr.Radio(
            label="Wan 2.2 expert",
            choices=list(wan_experts.EXPERT_CHOICES),
            value=wan_experts.NONE,
            elem_id=element_id("expert"),
            info="Wan 2.2 14B is two files: the pair above is the high-noise or the low-noise expert, or "
            "'both' also extracts the low-noise pair below (writes NAME_high and NAME_low).",
        )
        with gr.Row(visible=False, elem_id=element_id("low_pair")) as low_pair:
            c["base_low"] = gr.Dropdown(
                label="Low-noise base",
                choices=choices["base_low"],
                value=None,
                elem_id=element_id("base_low"),
                info="The low-noise expert the low-noise variant comes from.",
            )
            c["variant_low"] = gr.Dropdown(
                label="Low-noise variant (checkpoint or LoRA)",
                choices=choices["variant_low"],
                value=None,
                elem_id=element_id("variant_low"),
                info="The fine-tuned or merged low-noise expert.",
            )
    return SimpleNamespace(group=group, low_pair=low_pair)


def expert_results(element_id: Callable[[str], str]) -> SimpleNamespace:
    """After a "both" run: which expert's LoRA the follow-up buttons and the summary use, and
    both experts' names, models and reports (JSON, hidden) for switching between them."""
    shown = gr.Radio(
        label="Expert shown (Send to txt2img and Compare use its LoRA)",
        choices=[wan_experts.HIGH, wan_experts.LOW],
        value=wan_experts.HIGH,
        visible=False,
        elem_id=element_id("expert_shown"),
    )
    outputs = gr.Textbox("", visible=False, elem_id=element_id("expert_outputs"))
    return SimpleNamespace(shown=shown, outputs=outputs)

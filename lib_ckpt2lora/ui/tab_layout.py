"""The tab's gradio components, laid out: what the user sees, with no event handlers.

``build_layout(services)`` is called inside the tab's ``gr.Blocks``; ``tab_wiring`` then
connects the components it returns. (The import graph is one-way: wiring imports layout.)
Written gradio-3 style so that it runs under gradio 3.41.2 (A1111) and 4.40.0 (Forge, Neo).
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..options import FORMATS, SAVE_DTYPES, SVD_MODES
from . import chart, job
from .compat import table_kwargs
from .merge_layout import build_merge_layout
from .rank_controls import rank_controls
from .wan_experts_layout import expert_inputs, expert_results

PREFIX = "ckpt2lora_"
# The model dropdowns, as keys of model_choices() and of the layout's inputs (refreshed together).
MODEL_LISTS = ("base", "variant", "variant2", "base_low", "variant_low")


def element_id(name: str) -> str:
    return PREFIX + name


_id = element_id


def model_choices(services) -> dict[str, list[str]]:
    checkpoints = services.list_checkpoints()
    loras = [job.LORA_PREFIX + name for name in services.list_loras()]
    return {
        "base": checkpoints,
        "variant": checkpoints + loras,
        "variant2": [job.NONE_CHOICE] + checkpoints + loras,
        "base_low": checkpoints,  # Wan 2.2's low-noise expert pair (wan_experts_layout.py)
        "variant_low": checkpoints + loras,
    }


def build_layout(services) -> SimpleNamespace:
    """Every component of the tab. ``inputs`` maps each ``job.FORM_FIELDS`` name to its control;
    the other attributes are the buttons and the result area."""
    defaults = job.Form()
    inputs: dict = {}
    with gr.Row(elem_id=_id("main"), equal_height=False):
        with gr.Column(scale=5, elem_id=_id("inputs")):
            refresh, experts = _model_inputs(services, inputs, defaults)
            _output_inputs(inputs, defaults)
            _rank_inputs(inputs, defaults)
            _advanced_inputs(services, inputs, defaults)
            actions = _switches_and_actions(services, inputs)
        with gr.Column(scale=6, elem_id=_id("results")):
            results = _results()
    merge = build_merge_layout(services)  # the "Merge LoRAs" section (merge_layout.py)
    return SimpleNamespace(
        inputs=inputs, refresh=refresh, merge=merge, experts=experts, **vars(actions), **vars(results)
    )


def _model_inputs(services, c: dict, defaults: job.Form):
    """Base, variant, Wan 2.2's experts (hidden unless the base has them) and the folded second
    variant; returns the refresh button and the experts' parts."""
    choices = model_choices(services)
    with gr.Row(elem_classes=["ckpt2lora-models"]):
        c["base"] = gr.Dropdown(
            label="Base model",
            choices=choices["base"],
            value=None,
            elem_id=_id("base"),
            info="The model the variant was trained or merged from.",
        )
        c["variant"] = gr.Dropdown(
            label="Variant (checkpoint or LoRA)",
            choices=choices["variant"],
            value=None,
            elem_id=_id("variant"),
            info="The fine-tuned or merged model whose difference you want.",
        )
        refresh = services.tool_button("\U0001f504", _id("refresh"))  # refreshes the model lists
    experts = expert_inputs(c, choices, _id)
    with gr.Accordion("Second variant (common part / union)", open=False, elem_id=_id("second")):
        with gr.Row():
            c["variant2"] = gr.Dropdown(
                label="Second variant",
                choices=choices["variant2"],
                value=job.NONE_CHOICE,
                elem_id=_id("variant2"),
            )
            c["mode"] = gr.Radio(
                label="Mode",
                choices=list(job.MODES),
                value=defaults.mode,
                elem_id=_id("mode"),
                info="common: what both variants share; union: both, the shared part once.",
            )
        c["alpha"] = gr.Slider(
            label="Union balance alpha (weights 2*alpha and 2*(1-alpha))",
            minimum=0.0,
            maximum=1.0,
            step=0.05,
            value=defaults.alpha,
            elem_id=_id("alpha"),
        )
    return refresh, experts


def _output_inputs(c: dict, defaults: job.Form) -> None:
    with gr.Row():
        c["output_kind"] = gr.Radio(
            label="Output",
            choices=list(job.OUTPUT_KINDS),
            value=defaults.output_kind,
            elem_id=_id("output_kind"),
        )
        c["name"] = gr.Textbox(
            label="Output name",
            value="",
            placeholder="derived from the variant's name",
            elem_id=_id("name"),
        )


def _rank_inputs(c: dict, defaults: job.Form) -> None:
    rank_controls(
        c,
        defaults,
        _id,
        "0 = per layer (Energy to keep); a size chooses all layers' ranks together, up to Max rank (Rank must be 0)",
    )


def _advanced_inputs(services, c: dict, defaults: job.Form) -> None:
    with gr.Accordion("Advanced", open=False, elem_id=_id("advanced")):
        with gr.Row():
            c["min_dim"] = gr.Slider(
                label="Skip layers smaller than (min dim)",
                minimum=0,
                maximum=1024,
                step=1,
                value=defaults.min_dim,
                elem_id=_id("min_dim"),
            )
            c["include"] = gr.Textbox(
                label="Include only (comma-separated key parts)",
                value=defaults.include,
                placeholder="e.g. attn,ff",
                elem_id=_id("include"),
            )
            c["exclude"] = gr.Textbox(
                label="Exclude (comma-separated key parts)",
                value=defaults.exclude,
                placeholder="e.g. refiner,embed",
                elem_id=_id("exclude"),
            )
        with gr.Row():
            c["full_layer"] = gr.Checkbox(
                label="Full layer: also 1-D weights (norms, biases) as .diff",
                value=defaults.full_layer,
                elem_id=_id("full_layer"),
            )
            c["detail"] = gr.Checkbox(
                label="Detail: also save the residual as NAME_detail",
                value=defaults.detail,
                elem_id=_id("detail"),
            )
            c["detail_scale"] = gr.Slider(
                label="Detail scale",
                minimum=0.0,
                maximum=4.0,
                step=0.05,
                value=defaults.detail_scale,
                elem_id=_id("detail_scale"),
            )
        with gr.Row():
            c["format"] = gr.Dropdown(
                label="LoRA key format",
                choices=list(FORMATS),
                value=services.default_format,
                elem_id=_id("format"),
            )
            c["save_dtype"] = gr.Dropdown(
                label="Save dtype",
                choices=list(SAVE_DTYPES),
                value=defaults.save_dtype,
                elem_id=_id("save_dtype"),
            )
            c["device"] = gr.Dropdown(
                label="Device",
                choices=list(job.DEVICES),
                value=defaults.device,
                elem_id=_id("device"),
            )
            c["svd"] = gr.Radio(
                label="SVD",
                choices=list(SVD_MODES),
                value=defaults.svd,
                elem_id=_id("svd"),
            )


def _switches_and_actions(services, c: dict) -> SimpleNamespace:
    with gr.Row(elem_classes=["ckpt2lora-switches"]):
        c["free_model"] = gr.Checkbox(
            label="Free the WebUI's loaded model first",
            value=False,
            elem_id=_id("free_model"),
            visible=services.can_free_model,
        )
        c["overwrite"] = gr.Checkbox(
            label="Overwrite an existing file",
            value=False,
            elem_id=_id("overwrite"),
        )
    with gr.Row(elem_classes=["ckpt2lora-actions"]):
        extract_button = gr.Button("Extract", variant="primary", elem_id=_id("extract"))
        stop_button = gr.Button("Stop", elem_id=_id("stop"))
        list_button = gr.Button("List layers", elem_id=_id("list_layers"))
    return SimpleNamespace(extract_button=extract_button, stop_button=stop_button, list_button=list_button)


def _results() -> SimpleNamespace:
    """The right-hand column: status, the layer list, follow-up buttons, table and chart,
    and the hidden fields the follow-ups read."""
    r = SimpleNamespace()
    r.status = gr.HTML("", elem_id=_id("status"))
    # "List layers": what the current settings would extract, before a long run.
    r.layers = gr.Textbox(
        value="",
        label="Layers (dry run: shape, and whether each would be extracted)",
        lines=12,
        max_lines=30,
        interactive=False,
        visible=False,
        elem_id=_id("layers"),
    )
    r.expert_pick = expert_results(_id)  # Wan 2.2 "both": which expert's LoRA the buttons below use
    with gr.Row(elem_classes=["ckpt2lora-followups"]):
        r.send_button = gr.Button(
            "Send to txt2img",
            elem_id=_id("send_txt2img"),
            visible=False,
            variant="secondary",
        )
        r.use_button = gr.Button(
            "Use this checkpoint",
            elem_id=_id("use_checkpoint"),
            visible=False,
            variant="secondary",
        )
        r.compare_button = gr.Button(
            "Compare: variant vs base + LoRA",
            elem_id=_id("compare"),
            visible=False,
            variant="secondary",
        )
    # The LoRA is (variant - base): tried on the variant, it adds the change twice.
    r.select_base = gr.Checkbox(
        label="Send to txt2img also loads the base model",
        info="A LoRA is meant for the base: on the variant it would add the change a second time.",
        value=True,
        visible=False,
        elem_id=_id("select_base"),
    )
    # Compare: the txt2img prompt and seed on the variant, and on the base + the LoRA,
    # side by side as PNG data URLs in HTML (gr.Image as an event output breaks
    # gradio 4.40's API info under current pydantic, and PNG keeps pixels exact).
    r.compare_view = gr.HTML("", visible=False, elem_id=_id("compare_view"))
    r.compare_status = gr.HTML("", elem_id=_id("compare_status"))
    r.table = gr.Dataframe(
        headers=list(chart.COLUMNS),
        datatype=["str"] * len(chart.COLUMNS),
        value=None,
        interactive=False,
        visible=False,
        elem_id=_id("table"),
        label="Summary",
        **table_kwargs(),
    )
    r.chart_html = gr.HTML("", elem_id=_id("chart"), visible=False)
    r.result_name = gr.Textbox("", visible=False, elem_id=_id("result_name"))
    # The last extraction's base and variant choices, for Send to txt2img and Compare
    # (the dropdowns may have changed since).
    r.result_base = gr.Textbox("", visible=False, elem_id=_id("result_base"))
    r.result_variant = gr.Textbox("", visible=False, elem_id=_id("result_variant"))
    r.txt2img_settings = gr.Textbox("", visible=False, elem_id=_id("txt2img_settings"))
    r.task_id = gr.Textbox("", visible=False, elem_id=_id("task_id"))
    r.auto_name = gr.State("")
    return r

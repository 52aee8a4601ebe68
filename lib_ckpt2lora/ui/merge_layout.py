"""The tab's "Merge LoRAs" section, laid out (no event handlers; merge_wiring connects them):
LoRAs from the Lora list with their weights, the rank or a target size, the output name, and
the same status, table and chart as an extraction."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..options import FORMATS, SAVE_DTYPES
from . import chart
from .compat import table_kwargs
from .merge_job import MergeForm
from .rank_controls import rank_controls

PREFIX = "ckpt2lora_merge_"


def _id(name: str) -> str:
    return PREFIX + name


def build_merge_layout(services) -> SimpleNamespace:
    """Every component of the section; ``inputs`` maps each ``merge_job.MERGE_FIELDS`` name to its control."""
    defaults = MergeForm()
    c: dict = {}
    with gr.Accordion("Merge LoRAs", open=False, elem_id=_id("section")):
        with gr.Row():
            c["loras"] = gr.Dropdown(
                label="LoRAs to merge",
                choices=services.list_loras(),
                value=[],
                multiselect=True,
                elem_id=_id("loras"),
                info="One LoRA: resize it. Several (one model family): merge them into one LoRA. No base model needed.",
            )
            refresh = services.tool_button("\U0001f504", _id("refresh"))
        c["weights"] = gr.Textbox(
            label="Weights",
            value=defaults.weights,
            placeholder="empty = 1 each; e.g. 0.5, 1, -0.7 in the order chosen",
            elem_id=_id("weights"),
        )
        rank_controls(c, defaults, _id, "0 = per layer; a size chooses all ranks together (Rank must be 0)")
        with gr.Row():
            c["name"] = gr.Textbox(
                label="Output name", value="", placeholder="derived from the LoRAs' names", elem_id=_id("name")
            )
            c["format"] = gr.Dropdown(
                label="LoRA key format", choices=list(FORMATS), value=defaults.format, elem_id=_id("format")
            )
            c["save_dtype"] = gr.Dropdown(
                label="Save dtype",
                info="auto = the LoRAs' own precision",
                choices=list(SAVE_DTYPES),
                value=defaults.save_dtype,
                elem_id=_id("save_dtype"),
            )
            c["overwrite"] = gr.Checkbox(label="Overwrite an existing file", value=False, elem_id=_id("overwrite"))
        with gr.Row():
            merge_button = gr.Button("Merge", variant="primary", elem_id=_id("run"))
            stop_button = gr.Button("Stop", elem_id=_id("stop"))
        status = gr.HTML("", elem_id=_id("status"))
        table = gr.Dataframe(
            headers=list(chart.COLUMNS),
            datatype=["str"] * len(chart.COLUMNS),
            value=None,
            interactive=False,
            visible=False,
            elem_id=_id("table"),
            label="Summary",
            **table_kwargs(),
        )
        chart_html = gr.HTML("", elem_id=_id("chart"), visible=False)
        task_id = gr.Textbox("", visible=False, elem_id=_id("task_id"))
        auto_name = gr.State("")
    return SimpleNamespace(
        inputs=c,
        refresh=refresh,
        merge_button=merge_button,
        stop_button=stop_button,
        status=status,
        table=table,
        chart_html=chart_html,
        task_id=task_id,
        auto_name=auto_name,
    )

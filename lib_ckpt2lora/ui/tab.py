"""The ckpt2lora tab: one gradio Blocks, the same in the WebUI and standalone.

``build_tab(services)`` takes everything host-specific from ``services`` (model lists,
output folders, progress, queueing). The components are laid out in ``tab_layout`` and
their events connected in ``tab_wiring`` (which imports the layout, never the other way).
Written gradio-3 style so that it runs under gradio 3.41.2 (A1111) and 4.40.0 (Forge, Neo).
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .tab_layout import PREFIX, build_layout, model_choices
from .tab_wiring import status_html, wire_tab

__all__ = ["PREFIX", "build_tab", "model_choices", "status_html"]


def build_tab(services, css: str | None = None, title: str | None = None) -> gr.Blocks:
    """Build the tab; ``blocks.ckpt2lora`` holds its components and handlers (for tests)."""
    blocks_kwargs = {"analytics_enabled": False}
    if css is not None:
        blocks_kwargs["css"] = css
    if title is not None:
        blocks_kwargs["title"] = title
    with gr.Blocks(**blocks_kwargs) as blocks:
        layout = build_layout(services)
        events = wire_tab(services, layout)

    blocks.ckpt2lora = SimpleNamespace(
        services=services,
        components=layout.inputs,
        inputs=events.inputs,
        outputs=events.outputs,
        handler=events.handler,
        extract_job=events.extract_job,
        suggest=events.suggest,
        refresh=layout.refresh,
        refresh_choices=events.refresh_choices,
        status=layout.status,
        table=layout.table,
        chart=layout.chart_html,
        send_button=layout.send_button,
        use_button=layout.use_button,
        compare_button=layout.compare_button,
        compare_handler=events.compare_handler,
        compare_job=events.compare_job,
        compare_outputs=events.compare_outputs,
        clear_previous=events.clear_previous,
        select_base=layout.select_base,
        stop_button=layout.stop_button,
        extract_button=layout.extract_button,
        list_button=layout.list_button,
        list_layers=events.list_layers,
        layers=layout.layers,
        merge=SimpleNamespace(layout=layout.merge, events=events.merge),
        experts=SimpleNamespace(layout=layout.experts, pick=layout.expert_pick, events=events.experts),
    )
    return blocks

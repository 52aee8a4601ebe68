"""The "Merge LoRAs" section's events, connected to ``merge_layout``'s components.
Imports go one way: wiring -> layout."""

from __future__ import annotations

from types import SimpleNamespace

from . import chart
from .compat import gr_update, js_kwargs, progress_kwargs
from .merge_job import MERGE_FIELDS, MergeForm, default_merge_name, run_merge_job
from .tab_wiring import status_html


def wire_merge(services, m: SimpleNamespace) -> SimpleNamespace:
    """Connect the section's events; returns its handlers (the tests run them through gradio)."""
    c = m.inputs

    def on_refresh():
        services.refresh_loras()
        return gr_update(choices=services.list_loras())

    m.refresh.click(fn=on_refresh, inputs=[], outputs=[c["loras"]])

    def suggest(loras, name, last_auto):  # the output name follows the LoRAs until the user types one
        proposal = default_merge_name(loras)
        if not (name or "").strip() or name == last_auto:
            return gr_update(value=proposal), proposal
        return gr_update(), last_auto

    c["loras"].change(fn=suggest, inputs=[c["loras"], c["name"], m.auto_name], outputs=[c["name"], m.auto_name], queue=False)

    outputs = [m.table, m.chart_html, c["loras"], m.status]  # the status last (the WebUI appends its time there)

    def merge_job(reporter, *values):
        form = MergeForm(**dict(zip(MERGE_FIELDS, values)))
        reporter.begin("ckpt2lora: reading the LoRAs")
        result = run_merge_job(services, form, progress=reporter.progress, should_stop=reporter.should_stop)
        choices = gr_update(choices=services.list_loras())  # the new LoRA joins the list
        if not result.ok:
            return [gr_update(visible=False), gr_update(value="", visible=False), choices, status_html(result)]
        report = result.report or {}
        rows = chart.table_rows(report)
        return [
            gr_update(value=rows, visible=bool(rows)),
            gr_update(value=chart.chart_svg(report), visible=True),
            choices,
            status_html(result),
        ]

    handler = services.wrap_job(merge_job, len(outputs))
    inputs = [c[name] for name in MERGE_FIELDS]
    if services.uses_task_id:  # the WebUI's progress bar above this section's status
        inputs = [m.task_id, *inputs]
        m.merge_button.click(
            fn=handler,
            inputs=inputs,
            outputs=outputs,
            **progress_kwargs(False),
            **js_kwargs(f"(...args) => ckpt2lora.submit(args, {len(inputs)}, 'ckpt2lora_merge_status')"),
        )
    else:
        m.merge_button.click(fn=handler, inputs=inputs, outputs=outputs, **progress_kwargs(True))
    m.stop_button.click(fn=services.request_stop, inputs=[], outputs=[], queue=False)
    return SimpleNamespace(inputs=inputs, outputs=outputs, handler=handler, merge_job=merge_job, suggest=suggest)

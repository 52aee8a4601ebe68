"""The tab's events: what each button and field does, connected to ``tab_layout``'s components.

``wire_tab(services, layout)`` is called inside the tab's ``gr.Blocks`` after the layout;
it returns the handlers (the tests call them through gradio's own event processing).
Nothing here creates a visible component. Imports go one way: wiring -> layout, never back.
"""

from __future__ import annotations

import html
from types import SimpleNamespace

from . import chart, compare, job, wan_experts, wan_experts_wiring
from .compat import gr_update, js_kwargs, progress_kwargs
from .tab_layout import MODEL_LISTS, model_choices


def status_html(result: job.JobResult) -> str:
    """The result area's status: the saved files, how to use them and the warnings, or the one sentence."""
    if not result.ok:
        css = "ckpt2lora-stopped" if result.cancelled else "ckpt2lora-error error"
        return f"<div class='{css}'>{html.escape(result.message)}</div>"
    lines = []
    for path, size in zip(result.outputs, result.sizes):
        lines.append(
            f"<li><span class='ckpt2lora-path'>{html.escape(str(path))}</span> "
            f"<span class='ckpt2lora-size'>({chart.human_size(size)})</span></li>"
        )
    what = "LoRA" if result.kind == "lora" else "checkpoint"
    parts = [
        f"<div class='ckpt2lora-ok'>Saved the {what} in {result.seconds:.1f} s:</div>",
        "<ul class='ckpt2lora-outputs'>" + "".join(lines) + "</ul>",
    ]
    if result.experts:  # Wan 2.2 "both": which LoRA goes with which expert model
        parts.append(f"<div class='ckpt2lora-hint'>{html.escape(wan_experts.usage_hint([e.name for e in result.experts]))}</div>")
    elif result.kind == "lora":
        parts.append(
            f"<div class='ckpt2lora-hint'>Use it as <code>&lt;lora:{html.escape(result.name)}:1&gt;</code>"
            " with the base model.</div>"
        )
    parts.extend(budget_html(result.report))
    for warning in result.warnings:
        parts.append(f"<div class='ckpt2lora-warning'>{html.escape(warning)}</div>")
    return "<div class='ckpt2lora-result'>" + "".join(parts) + "</div>"


def budget_html(report: dict | None) -> list[str]:
    """A run with a target size: what the budget chose (job.budget_text); nothing otherwise."""
    text = job.budget_text(report)
    if text is None:
        return []
    summary = "".join(f"<div>{html.escape(line)}</div>" for line in text.summary)
    groups = "".join(f"<li>{html.escape(line)}</li>" for line in text.groups)
    return [f"<div class='ckpt2lora-budget'>{summary}<ul class='ckpt2lora-budget-groups'>{groups}</ul></div>"]


def wire_tab(services, layout: SimpleNamespace) -> SimpleNamespace:
    """Connect every event of the tab; returns the handlers and the extract event's inputs/outputs."""
    c = layout.inputs
    dropdowns = [c[key] for key in MODEL_LISTS]

    # -- refresh -------------------------------------------------------------------
    def refresh_all():
        services.refresh_checkpoints()
        services.refresh_loras()

    def on_refresh():
        refresh_all()
        now = model_choices(services)
        return [gr_update(choices=now[k]) for k in MODEL_LISTS]

    layout.refresh.click(fn=on_refresh, inputs=[], outputs=dropdowns)

    # -- the output name follows the variant until the user types one ----------------
    def suggest(variant, variant2, mode, output_kind, name, last_auto, expert=None):
        proposal = job.default_name(variant, variant2, mode, output_kind, expert)
        if not (name or "").strip() or name == last_auto:
            return gr_update(value=proposal), proposal
        return gr_update(), last_auto

    suggest_inputs = [c["variant"], c["variant2"], c["mode"], c["output_kind"], c["name"], layout.auto_name, c["expert"]]
    for trigger in (c["variant"], c["variant2"], c["mode"], c["output_kind"], c["expert"]):
        trigger.change(fn=suggest, inputs=suggest_inputs, outputs=[c["name"], layout.auto_name], queue=False)

    # -- Extract ---------------------------------------------------------------------
    # Only the status is visible while a job runs: gradio's own progress shows there once.
    # The status stays last (the WebUI's queue wrapper appends its "Time taken" there).
    outputs = [
        layout.table,
        layout.chart_html,
        layout.send_button,
        layout.use_button,
        layout.result_name,
        layout.compare_button,
        layout.select_base,
        layout.result_base,
        layout.result_variant,
        layout.expert_pick.shown,
        layout.expert_pick.outputs,
        layout.status,
    ]

    def extract_job(reporter, *values):
        form = job.Form(**dict(zip(job.FORM_FIELDS, values)))
        reporter.begin("ckpt2lora: reading the models")
        result = job.run_job(services, form, progress=reporter.progress, should_stop=reporter.should_stop)
        return result_updates(result, form)

    def result_updates(result: job.JobResult, form: job.Form):
        if not result.ok:
            hidden = gr_update(visible=False)
            chart_hidden = gr_update(value="", visible=False)
            experts = wan_experts_wiring.result_updates(result)
            return [hidden, chart_hidden, hidden, hidden, "", hidden, hidden, "", "", *experts, status_html(result)]
        report = result.report or {}
        rows = chart.table_rows(report)
        is_lora = result.kind == "lora"
        sendable = is_lora and services.can_send_to_txt2img
        comparable = is_lora and services.can_compare and form.mode == "single"
        return [
            gr_update(value=rows, visible=bool(rows)),
            gr_update(value=chart.chart_svg(report), visible=True),
            gr_update(visible=sendable),
            gr_update(visible=(not is_lora) and services.can_select_checkpoint),
            result.name,
            gr_update(visible=comparable),
            gr_update(visible=sendable and services.can_select_checkpoint),
            form.base or "",
            form.variant or "",
            *wan_experts_wiring.result_updates(result),
            status_html(result),
        ]

    def refresh_choices():
        """After a job: the new file joins the lists (choices only; the chosen values stay)."""
        now = model_choices(services)
        return [gr_update(choices=now[k]) for k in MODEL_LISTS]

    handler = services.wrap_job(extract_job, len(outputs))
    inputs = [c[name] for name in job.FORM_FIELDS]
    if services.uses_task_id:  # the WebUI's progress bar (shared.state), not gradio's
        inputs = [layout.task_id, *inputs]
        event = layout.extract_button.click(
            fn=handler,
            inputs=inputs,
            outputs=outputs,
            **progress_kwargs(False),
            **js_kwargs(f"(...args) => ckpt2lora.submit(args, {len(inputs)})"),
        )
    else:  # gradio's own progress (gr.Progress)
        event = layout.extract_button.click(fn=handler, inputs=inputs, outputs=outputs, **progress_kwargs(True))
    event.then(fn=refresh_choices, inputs=[], outputs=dropdowns, queue=False, **progress_kwargs(False))

    # A new Extract, whatever its outcome, starts a new result: the previous Compare (its
    # images and SSIM line) and the List layers box belong to the last one. Cleared at the
    # press, outside the queue, while the job may still wait for it.
    cleared_by_extract = [layout.compare_view, layout.compare_status, layout.layers]

    def clear_previous():
        return [gr_update(value="", visible=False), "", gr_update(value="", visible=False)]

    layout.extract_button.click(fn=clear_previous, inputs=[], outputs=cleared_by_extract, queue=False)
    layout.stop_button.click(fn=services.request_stop, inputs=[], outputs=[], queue=False)

    def list_layers(*values):
        form = job.Form(**dict(zip(job.FORM_FIELDS, values)))
        return gr_update(value=job.list_job(services, form).text, visible=True)

    layout.list_button.click(fn=list_layers, inputs=[c[name] for name in job.FORM_FIELDS], outputs=[layout.layers])
    layout.send_button.click(
        fn=None,
        inputs=[layout.result_name, layout.result_base, layout.select_base],
        outputs=[],
        **js_kwargs("(name, base, selectBase) => ckpt2lora.sendToTxt2img(name, base, selectBase)"),
    )
    layout.use_button.click(
        fn=None, inputs=[layout.result_name], outputs=[], **js_kwargs("(title) => ckpt2lora.selectCheckpoint(title)")
    )

    # -- Compare (WebUI only: it generates through the WebUI's processing and queue) --
    compare_outputs = [layout.compare_view, layout.compare_status]

    def compare_job(reporter, settings_json, lora_name, base, variant):
        reporter.begin("ckpt2lora: Compare")
        result = compare.run_compare(services, lora_name, base, variant, settings_json, reporter.should_stop)
        return compare_updates(result)

    def compare_updates(result: compare.CompareResult):
        if not result.ok:
            css = "ckpt2lora-stopped" if result.message == compare.INTERRUPTED else "ckpt2lora-error error"
            return [gr_update(value="", visible=False), f"<div class='{css}'>{html.escape(result.message)}</div>"]
        text = f"Seed {result.seed}: {result.message}"
        view = compare.images_html(result.images, result.labels)
        return [gr_update(value=view, visible=True), f"<div class='ckpt2lora-similarity'>{html.escape(text)}</div>"]

    compare_handler = None
    if services.can_compare:
        compare_handler = services.wrap_job(compare_job, len(compare_outputs))
        compare_inputs = [
            layout.task_id,
            layout.txt2img_settings,
            layout.result_name,
            layout.result_base,
            layout.result_variant,
        ]
        layout.compare_button.click(
            fn=compare_handler,
            inputs=compare_inputs,
            outputs=compare_outputs,
            **progress_kwargs(False),
            **js_kwargs(f"(...args) => ckpt2lora.compare(args, {len(compare_inputs)})"),
        )

    from .merge_wiring import wire_merge  # here: merge_wiring imports status_html from this module

    merge_events = wire_merge(services, layout.merge)
    expert_events = wan_experts_wiring.wire_experts(services, layout)
    return SimpleNamespace(
        merge=merge_events,
        experts=expert_events,
        inputs=inputs,
        outputs=outputs,
        handler=handler,
        extract_job=extract_job,
        suggest=suggest,
        refresh_choices=refresh_choices,
        list_layers=list_layers,
        compare_handler=compare_handler,
        clear_previous=clear_previous,
        cleared_by_extract=cleared_by_extract,
        compare_job=compare_job,
        compare_outputs=compare_outputs,
    )

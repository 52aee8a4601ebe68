"""The ckpt2lora tab: one gradio Blocks, the same in the WebUI and standalone.

``build_tab(services)`` takes everything host-specific from ``services`` (model lists,
output folders, progress, queueing). Written gradio-3 style so that it runs under
gradio 3.41.2 (A1111) and 4.40.0 (Forge, Neo).
"""

from __future__ import annotations

import html
from types import SimpleNamespace

import gradio as gr

from ..options import FORMATS, SAVE_DTYPES, SVD_MODES
from . import chart, compare, job
from .compat import gr_update, js_kwargs, progress_kwargs, table_kwargs

PREFIX = "ckpt2lora_"


def _id(name: str) -> str:
    return PREFIX + name


def model_choices(services) -> dict[str, list[str]]:
    checkpoints = services.list_checkpoints()
    loras = [job.LORA_PREFIX + name for name in services.list_loras()]
    return {
        "base": checkpoints,
        "variant": checkpoints + loras,
        "variant2": [job.NONE_CHOICE] + checkpoints + loras,
    }


def status_html(result: job.JobResult) -> str:
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
    if result.kind == "lora":
        parts.append(
            f"<div class='ckpt2lora-hint'>Use it as <code>&lt;lora:{html.escape(result.name)}:1&gt;</code>"
            " with the base model.</div>"
        )
    for warning in result.warnings:
        parts.append(f"<div class='ckpt2lora-warning'>{html.escape(warning)}</div>")
    return "<div class='ckpt2lora-result'>" + "".join(parts) + "</div>"


def build_tab(services, css: str | None = None, title: str | None = None) -> gr.Blocks:
    """Build the tab; ``blocks.ckpt2lora`` holds its components and handlers (for tests)."""
    defaults = job.Form()
    choices = model_choices(services)
    c: dict = {}
    blocks_kwargs = {"analytics_enabled": False}
    if css is not None:
        blocks_kwargs["css"] = css
    if title is not None:
        blocks_kwargs["title"] = title
    with gr.Blocks(**blocks_kwargs) as blocks:
        with gr.Row(elem_id=_id("main"), equal_height=False):
            with gr.Column(scale=5, elem_id=_id("inputs")):
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
                with gr.Row():
                    c["rank"] = gr.Slider(
                        label="Rank",
                        info="0 = automatic, per layer",
                        minimum=0,
                        maximum=512,
                        step=1,
                        value=defaults.rank,
                        elem_id=_id("rank"),
                    )
                    c["rank_thresh"] = gr.Slider(
                        label="Energy to keep",
                        info="automatic rank",
                        minimum=0.5,
                        maximum=1.0,
                        step=0.005,
                        value=defaults.rank_thresh,
                        elem_id=_id("rank_thresh"),
                    )
                    c["rank_max"] = gr.Slider(
                        label="Max rank",
                        info="automatic rank",
                        minimum=1,
                        maximum=512,
                        step=1,
                        value=defaults.rank_max,
                        elem_id=_id("rank_max"),
                    )
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
            with gr.Column(scale=6, elem_id=_id("results")):
                status = gr.HTML("", elem_id=_id("status"))
                # "List layers": what the current settings would extract, before a long run.
                layers = gr.Textbox(
                    value="",
                    label="Layers (dry run: shape, and whether each would be extracted)",
                    lines=12,
                    max_lines=30,
                    interactive=False,
                    visible=False,
                    elem_id=_id("layers"),
                )
                with gr.Row(elem_classes=["ckpt2lora-followups"]):
                    send_button = gr.Button(
                        "Send to txt2img",
                        elem_id=_id("send_txt2img"),
                        visible=False,
                        variant="secondary",
                    )
                    use_button = gr.Button(
                        "Use this checkpoint",
                        elem_id=_id("use_checkpoint"),
                        visible=False,
                        variant="secondary",
                    )
                    compare_button = gr.Button(
                        "Compare: variant vs base + LoRA",
                        elem_id=_id("compare"),
                        visible=False,
                        variant="secondary",
                    )
                # The LoRA is (variant - base): tried on the variant, it adds the change twice.
                select_base = gr.Checkbox(
                    label="Send to txt2img also loads the base model",
                    info="A LoRA is meant for the base: on the variant it would add the change a second time.",
                    value=True,
                    visible=False,
                    elem_id=_id("select_base"),
                )
                # Compare: the txt2img prompt and seed on the variant, and on the base + the LoRA,
                # side by side as PNG data URLs in HTML (gr.Image as an event output breaks
                # gradio 4.40's API info under current pydantic, and PNG keeps pixels exact).
                compare_view = gr.HTML("", visible=False, elem_id=_id("compare_view"))
                compare_status = gr.HTML("", elem_id=_id("compare_status"))
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
                result_name = gr.Textbox("", visible=False, elem_id=_id("result_name"))
                # The last extraction's base and variant choices, for Send to txt2img and Compare
                # (the dropdowns may have changed since).
                result_base = gr.Textbox("", visible=False, elem_id=_id("result_base"))
                result_variant = gr.Textbox("", visible=False, elem_id=_id("result_variant"))
                txt2img_settings = gr.Textbox("", visible=False, elem_id=_id("txt2img_settings"))
                task_id = gr.Textbox("", visible=False, elem_id=_id("task_id"))
                auto_name = gr.State("")

        # -- refresh -------------------------------------------------------------------
        dropdowns = [c["base"], c["variant"], c["variant2"]]

        def refresh_all():
            services.refresh_checkpoints()
            services.refresh_loras()

        def on_refresh():
            refresh_all()
            now = model_choices(services)
            return [gr_update(choices=now[k]) for k in ("base", "variant", "variant2")]

        refresh.click(fn=on_refresh, inputs=[], outputs=dropdowns)

        # -- the output name follows the variant until the user types one ----------------
        def suggest(variant, variant2, mode, output_kind, name, last_auto):
            proposal = job.default_name(variant, variant2, mode, output_kind)
            if not (name or "").strip() or name == last_auto:
                return gr_update(value=proposal), proposal
            return gr_update(), last_auto

        suggest_inputs = [c["variant"], c["variant2"], c["mode"], c["output_kind"], c["name"], auto_name]
        for trigger in (c["variant"], c["variant2"], c["mode"], c["output_kind"]):
            trigger.change(fn=suggest, inputs=suggest_inputs, outputs=[c["name"], auto_name], queue=False)

        # -- Extract ---------------------------------------------------------------------
        # Only the status is visible while a job runs: gradio's own progress shows there once.
        # The status stays last (the WebUI's queue wrapper appends its "Time taken" there).
        outputs = [
            table,
            chart_html,
            send_button,
            use_button,
            result_name,
            compare_button,
            select_base,
            result_base,
            result_variant,
            status,
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
                return [hidden, chart_hidden, hidden, hidden, "", hidden, hidden, "", "", status_html(result)]
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
                status_html(result),
            ]

        def refresh_choices():
            """After a job: the new file joins the lists (choices only; the chosen values stay)."""
            now = model_choices(services)
            return [gr_update(choices=now[k]) for k in ("base", "variant", "variant2")]

        handler = services.wrap_job(extract_job, len(outputs))
        inputs = [c[name] for name in job.FORM_FIELDS]
        if services.uses_task_id:  # the WebUI's progress bar (shared.state), not gradio's
            inputs = [task_id, *inputs]
            event = extract_button.click(
                fn=handler,
                inputs=inputs,
                outputs=outputs,
                **progress_kwargs(False),
                **js_kwargs(f"(...args) => ckpt2lora.submit(args, {len(inputs)})"),
            )
        else:  # gradio's own progress (gr.Progress)
            event = extract_button.click(fn=handler, inputs=inputs, outputs=outputs, **progress_kwargs(True))
        event.then(fn=refresh_choices, inputs=[], outputs=dropdowns, queue=False, **progress_kwargs(False))
        stop_button.click(fn=services.request_stop, inputs=[], outputs=[], queue=False)

        def list_layers(*values):
            form = job.Form(**dict(zip(job.FORM_FIELDS, values)))
            return gr_update(value=job.list_job(services, form).text, visible=True)

        list_button.click(fn=list_layers, inputs=[c[name] for name in job.FORM_FIELDS], outputs=[layers])
        send_button.click(
            fn=None,
            inputs=[result_name, result_base, select_base],
            outputs=[],
            **js_kwargs("(name, base, selectBase) => ckpt2lora.sendToTxt2img(name, base, selectBase)"),
        )
        use_button.click(fn=None, inputs=[result_name], outputs=[], **js_kwargs("(title) => ckpt2lora.selectCheckpoint(title)"))

        # -- Compare (WebUI only: it generates through the WebUI's processing and queue) --
        compare_outputs = [compare_view, compare_status]

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
            compare_inputs = [task_id, txt2img_settings, result_name, result_base, result_variant]
            compare_button.click(
                fn=compare_handler,
                inputs=compare_inputs,
                outputs=compare_outputs,
                **progress_kwargs(False),
                **js_kwargs(f"(...args) => ckpt2lora.compare(args, {len(compare_inputs)})"),
            )

    blocks.ckpt2lora = SimpleNamespace(
        services=services,
        components=c,
        inputs=inputs,
        outputs=outputs,
        handler=handler,
        extract_job=extract_job,
        suggest=suggest,
        refresh=refresh,
        refresh_choices=refresh_choices,
        status=status,
        table=table,
        chart=chart_html,
        send_button=send_button,
        use_button=use_button,
        compare_button=compare_button,
        compare_handler=compare_handler,
        compare_job=compare_job,
        compare_outputs=compare_outputs,
        select_base=select_base,
        stop_button=stop_button,
        extract_button=extract_button,
        list_button=list_button,
        list_layers=list_layers,
        layers=layers,
    )
    return blocks

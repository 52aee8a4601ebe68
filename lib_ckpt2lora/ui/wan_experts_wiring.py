"""The "Wan 2.2 experts" controls' events (wan_experts_layout's components; wan_experts.py decides).

- The base changes: the controls show when the base comes as expert files (read from its
  header), the expert set from the file's name (``..._high_noise_...``) unless "both" is
  chosen; otherwise
  they hide and the choice goes back to none, so a hidden control never changes a run.
- "both": the low-noise pair shows, proposed from the high-noise names when the list has
  the matching ``..._low_noise_...`` files.
- After a "both" run: the "Expert shown" choice switches the summary, the chart and the
  LoRA that Send to txt2img and Compare use.
Imports go one way: wiring -> layout.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from . import chart, job, wan_experts
from .compat import gr_update
from .tab_layout import model_choices


def wire_experts(services, layout: SimpleNamespace) -> SimpleNamespace:
    c = layout.inputs
    parts, pick = layout.experts, layout.expert_pick

    def on_base(base, expert):
        path = None
        if base and not job.is_lora_choice(base):
            path = services.resolve_checkpoint(base)
        if not wan_experts.has_experts(path):
            return gr_update(visible=False), gr_update(value=wan_experts.NONE)
        named = wan_experts.expert_from_name(base)
        if named != wan_experts.NONE and expert != wan_experts.BOTH:  # the file says which expert it is
            return gr_update(visible=True), gr_update(value=named)
        return gr_update(visible=True), gr_update()  # "both", or a name without a hint: the choice stays

    c["base"].change(fn=on_base, inputs=[c["base"], c["expert"]], outputs=[parts.group, c["expert"]], queue=False)

    def on_expert(expert, base, variant, base_low, variant_low):
        both = expert == wan_experts.BOTH
        proposals = [gr_update(), gr_update()]
        if both:
            lists = model_choices(services)
            for i, (high, low, key) in enumerate(((base, base_low, "base_low"), (variant, variant_low, "variant_low"))):
                partner = None if low else wan_experts.low_noise_partner(high, lists[key])
                if partner:
                    proposals[i] = gr_update(value=partner)
        return [gr_update(visible=both), *proposals]

    c["expert"].change(
        fn=on_expert,
        inputs=[c["expert"], c["base"], c["variant"], c["base_low"], c["variant_low"]],
        outputs=[parts.low_pair, c["base_low"], c["variant_low"]],
        queue=False,
    )

    def on_shown(shown, outputs_json):
        entries = {entry["expert"]: entry for entry in json.loads(outputs_json or "[]")}
        entry = entries.get("low" if shown == wan_experts.LOW else "high")
        if entry is None:
            return [gr_update()] * 5
        report = entry["report"]
        rows = chart.table_rows(report)
        return [
            gr_update(value=rows, visible=bool(rows)),
            gr_update(value=chart.chart_svg(report), visible=True),
            entry["name"],
            entry["base"],
            entry["variant"],
        ]

    shown_outputs = [layout.table, layout.chart_html, layout.result_name, layout.result_base, layout.result_variant]
    pick.shown.change(fn=on_shown, inputs=[pick.shown, pick.outputs], outputs=shown_outputs, queue=False)
    return SimpleNamespace(on_base=on_base, on_expert=on_expert, on_shown=on_shown)


def result_updates(result: job.JobResult) -> list:
    """The extract event's updates of the "Expert shown" choice and its hidden JSON."""
    if not result.ok or not result.experts:
        return [gr_update(visible=False, value=wan_experts.HIGH), ""]
    # the summary's groups and total only (chart.py's inputs), not every layer of a 14B model
    entries = [{**vars(e), "report": {k: e.report.get(k) for k in ("groups", "total")}} for e in result.experts]
    return [gr_update(visible=True, value=wan_experts.HIGH), json.dumps(entries)]

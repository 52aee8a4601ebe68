"""One merge (or resize) started from the tab's "Merge LoRAs" section: form values ->
MergeOptions -> toolbox.merge_run.merge_loras -> a job.JobResult, shown like an extraction's.

No gradio here; the tests call ``run_merge_job`` directly as well as through the tab.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import Cancelled, UserError
from . import job, sidecar

logger = logging.getLogger("ckpt2lora")


@dataclass
class MergeForm:
    """Every input of the Merge LoRAs section, in the order its Merge button sends them."""

    loras: list[str] = field(default_factory=list)  # names from the Lora list
    weights: str = ""  # "0.5, 1, -0.7": one per LoRA in the order chosen; empty = 1 each
    name: str = ""
    rank: int = 0
    rank_thresh: float = 0.95
    rank_max: int = 64
    target_size: float | None = 0.0  # MB; empty / 0 = the per-module rule
    format: str = "auto"
    save_dtype: str = "auto"
    overwrite: bool = False


MERGE_FIELDS = tuple(f.name for f in fields(MergeForm))


def parse_weights(text: str, count: int) -> list[float]:
    """The Weights field: empty means 1 for every LoRA, else one number per LoRA."""
    parts = [part.strip() for part in (text or "").replace(";", ",").split(",") if part.strip()]
    if not parts:
        return [1.0] * count
    if len(parts) != count:
        raise UserError(
            f"'Weights' holds {len(parts)} number(s) for {count} LoRA(s): give one per LoRA, in the order chosen "
            "(e.g. 0.5, 1, -0.7), or leave it empty for 1 each."
        )
    weights = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"'Weights' must be numbers such as 0.5 or -0.7, not {part!r}.")
        weights.append(value)
    return weights


def default_merge_name(loras: list[str]) -> str:
    stems = [job.choice_stem(job.LORA_PREFIX + name) for name in loras or []]
    if not stems:
        return ""
    if len(stems) == 1:
        return f"{stems[0]}_resized"
    return "merged_" + "_".join(stems[:3]) + ("_etc" if len(stems) > 3 else "")


def plan_merge(services, form: MergeForm):
    """The merge's options, or UserError with one sentence in the tab's words."""
    from ..toolbox.merge_inputs import MergeInput
    from ..toolbox.merge_run import MergeOptions

    loras = list(form.loras or [])
    if not loras:
        raise UserError("Choose one LoRA to resize, or several of one model family to merge.")
    weights = parse_weights(form.weights, len(loras))
    inputs = []
    for name, weight in zip(loras, weights):
        path = services.resolve_lora(name)
        if path is None or not Path(path).is_file():
            raise UserError(f"The LoRA {name} is not in the Lora list any more: press refresh and choose again.")
        inputs.append(MergeInput(Path(path), weight))
    folder = Path(services.lora_dir())
    out = job.output_path(folder, (form.name or "").strip() or default_merge_name(loras))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not form.overwrite:
        raise UserError(f"{out.name} already exists in the Lora folder: choose another name or tick Overwrite.")
    if any(out.resolve() == item.path.resolve() for item in inputs):
        raise UserError(f"The output {out.name} would replace one of the LoRAs merged: choose another name.")
    opts = MergeOptions(
        inputs=inputs,
        out=out,
        rank=int(form.rank),
        rank_thresh=float(form.rank_thresh),
        rank_max=int(form.rank_max),
        target_size=job.target_size_option(form.target_size),
        format=form.format or "auto",
        save_dtype=form.save_dtype or "auto",
        overwrite=bool(form.overwrite),
    )
    opts.validate()
    return opts


def run_merge_job(
    services,
    form: MergeForm,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> job.JobResult:
    """Run one merge; every outcome, failures included, comes back as a JobResult."""
    from ..toolbox.merge_run import merge_loras

    started = time.monotonic()

    def log(line: str) -> None:
        print(f"ckpt2lora: {line}", file=sys.stderr)

    try:
        opts = plan_merge(services, form)
        if should_stop is not None and should_stop():
            raise Cancelled()
        result = merge_loras(opts, progress=progress, should_stop=should_stop, log=log)
        out = result.outputs[0]
        report = result.report.to_dict()
        what = " + ".join(f"{item.weight:g} x {item.path.stem}" for item in opts.inputs)
        total = report.get("total", {})
        verb = "Resized" if len(opts.inputs) == 1 else "Merged"
        text = f"{verb} by ckpt2lora from {what}: {total.get('n', 0)} layers."
        sidecars = [sidecar.write_sidecar(out, sd_version=services.sd_version_name(result.architecture), description=text)]
        services.refresh_loras()
        return job.JobResult(
            ok=True,
            message=f"Saved {out.name}.",
            kind="lora",
            name=out.stem,
            outputs=[out],
            sizes=[out.stat().st_size],
            sidecars=sidecars,
            report=job.tab_report(report),
            summary=job.tab_text(result.report.summary_text()),
            warnings=[job.tab_text(w) for w in result.warnings],
            seconds=time.monotonic() - started,
        )
    except UserError as error:
        return job.JobResult(ok=False, message=job.tab_text(str(error)), seconds=time.monotonic() - started)
    except Cancelled:
        return job.JobResult(ok=False, cancelled=True, message=job.STOPPED, seconds=time.monotonic() - started)
    except Exception as error:  # a bug: the traceback goes to the console, one sentence to the tab
        logger.exception("ckpt2lora: the merge failed")
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
        return job.JobResult(
            ok=False,
            message=f"The merge failed unexpectedly ({detail}); the console has the details.",
            seconds=time.monotonic() - started,
        )

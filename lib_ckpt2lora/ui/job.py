"""One extraction started from the tab: form values -> ExtractOptions -> extract() -> result.

No gradio here. The tab turns a ``JobResult`` into component updates; the tests call
``run_job`` directly as well as through the tab.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath

from ..budget import format_size
from ..errors import Cancelled, UserError
from ..options import ExtractOptions
from . import sidecar, wan_experts

logger = logging.getLogger("ckpt2lora")

LORA_PREFIX = "LoRA: "  # variant choices that are LoRAs from the Lora list
NONE_CHOICE = "None"  # the second variant's "no second variant" choice
OUTPUT_KINDS = ("LoRA", "Checkpoint (low-rank)", "Checkpoint (full delta)")
MODES = ("single", "common", "union")
DEVICES = ("auto", "cpu", "cuda", "mps")
# The same sentence as the CLI's (errors.Cancelled), so the README/docs quote one text.
STOPPED = "Interrupted: nothing was written."

_DEFAULTS = {f.name: f.default for f in fields(ExtractOptions)}

# The engine's messages name CLI flags; the tab shows its own controls' labels instead
# (tests check these against the built tab's labels). Flags without a control in the
# tab say so rather than point to something the user cannot find.
FLAG_LABELS = {
    "--base": "Base model",
    "--variant": "Variant",
    "--variant2": "Second variant",
    "--out": "Output name",
    "--union": "Mode: union",
    "--alpha": "Union balance alpha",
    "--checkpoint": "Output: Checkpoint (low-rank)",
    "--checkpoint-full": "Output: Checkpoint (full delta)",
    "--rank": "Rank",
    "--rank-thresh": "Energy to keep",
    "--rank-max": "Max rank",
    "--target-size": "Target size (MB)",
    "--target-energy": "a target energy (command line only)",
    "--budget-objective": "the budget objective (command line only)",
    "--min-dim": "Skip layers smaller than (min dim)",
    "--include": "Include only",
    "--exclude": "Exclude",
    "--full-layer": "Full layer",
    "--detail": "Detail",
    "--detail-scale": "Detail scale",
    "--format": "LoRA key format",
    "--save-dtype": "Save dtype",
    "--device": "Device",
    "--svd": "SVD",
    "--overwrite": "Overwrite an existing file",
    "--list-layers": "List layers",
    "--strict": "strict mode (command line only)",
    "--report-json": "a JSON report (command line only)",
    "--debug": "the command line's debug mode",
    "--expert": "Wan 2.2 expert",
    "--base-low": "Low-noise base",
    "--variant-low": "Low-noise variant",
    "--merge": "LoRAs to merge",
}
_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def tab_text(text: str) -> str:
    """An engine message as the tab shows it: CLI flags become the tab's control labels,
    quoted ("pass --overwrite" -> "pass 'Overwrite an existing file'")."""

    def label(match: re.Match) -> str:
        flag = match.group(0)
        return f"'{FLAG_LABELS[flag]}'" if flag in FLAG_LABELS else flag.lstrip("-")

    return _FLAG.sub(label, text or "")


def tab_report(report: dict) -> dict:
    """The report's skip reasons and warnings in the tab's words."""
    report = dict(report)
    report["skipped"] = {tab_text(reason): keys for reason, keys in report.get("skipped", {}).items()}
    report["warnings"] = [tab_text(w) for w in report.get("warnings", [])]
    return report


@dataclass
class Form:
    """Every input of the tab, in the order the Extract button sends them."""

    base: str | None = None
    variant: str | None = None
    variant2: str | None = NONE_CHOICE
    mode: str = "single"
    alpha: float = _DEFAULTS["alpha"]
    output_kind: str = OUTPUT_KINDS[0]
    name: str = ""
    rank: int = _DEFAULTS["rank"]
    rank_thresh: float = _DEFAULTS["rank_thresh"]
    rank_max: int = _DEFAULTS["rank_max"]
    target_size: float | None = 0.0  # MB (10^6 bytes); empty / 0 = the per-layer rule
    min_dim: int = _DEFAULTS["min_dim"]
    include: str = _DEFAULTS["include"]
    exclude: str = _DEFAULTS["exclude"]
    full_layer: bool = _DEFAULTS["full_layer"]
    detail: bool = _DEFAULTS["detail"]
    detail_scale: float = _DEFAULTS["detail_scale"]
    format: str = _DEFAULTS["format"]
    save_dtype: str = _DEFAULTS["save_dtype"]
    device: str = _DEFAULTS["device"]
    svd: str = _DEFAULTS["svd"]
    free_model: bool = False
    overwrite: bool = False
    # Wan 2.2 A14B (wan_experts.py): which expert the pair is, and for "both" the low-noise pair
    expert: str = wan_experts.NONE
    base_low: str | None = None
    variant_low: str | None = None


FORM_FIELDS = tuple(f.name for f in fields(Form))


@dataclass
class JobResult:
    ok: bool
    message: str
    cancelled: bool = False
    kind: str = ""  # "lora" or "checkpoint"
    name: str = ""  # the LoRA's name for <lora:NAME:1>, or the checkpoint's title
    outputs: list[Path] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    report: dict | None = None
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Wan 2.2 "both": one entry per expert (ExpertOutput), high first; empty otherwise
    experts: list = field(default_factory=list)


@dataclass
class ExpertOutput:
    """One expert's LoRA of a "both" run: what Send to txt2img and Compare use when it is chosen."""

    expert: str  # "high" / "low"
    name: str  # the LoRA's name for <lora:NAME:1>
    base: str  # the base and variant choices it was extracted from
    variant: str
    report: dict


def is_lora_choice(choice: str | None) -> bool:
    return bool(choice) and choice.startswith(LORA_PREFIX)


def choice_stem(choice: str | None) -> str:
    """'LoRA: styles/foo' -> 'foo'; 'sub/model.safetensors [abc123]' -> 'model'."""
    if not choice or choice == NONE_CHOICE:
        return ""
    text = choice[len(LORA_PREFIX) :] if is_lora_choice(choice) else choice
    text = text.split(" [")[0].replace("\\", "/")
    name = PurePosixPath(text).name
    for ext in (".safetensors", ".ckpt", ".pt", ".sft"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def default_name(
    variant: str | None, variant2: str | None, mode: str, output_kind: str, expert: str | None = None
) -> str:
    """The output name proposed from the variant's name (the user may type another)."""
    stem = choice_stem(variant)
    if not stem:
        return ""
    if expert == wan_experts.BOTH:  # NAME_high / NAME_low: "my_high_noise" -> "my"
        stem = wan_experts.without_expert_hint(stem)
    second = choice_stem(variant2) if mode in ("common", "union") else ""
    if second:
        stem = f"{stem}_{mode}_{second}"
    if output_kind == OUTPUT_KINDS[1]:
        return f"{stem}_lowrank"
    if output_kind == OUTPUT_KINDS[2]:
        return f"{stem}_merged"
    return f"{stem}_extracted" if is_lora_choice(variant) and not second else stem


def output_path(folder: Path, name: str) -> Path:
    """``folder/name.safetensors``, refusing names that would leave the folder."""
    text = (name or "").strip().replace("\\", "/")
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")]
    if not text:
        raise UserError("Type a name for the output.")
    parts = PurePosixPath(text).parts
    if text.startswith("/") or ":" in text or any(p in ("..", ".") for p in parts):
        raise UserError(f"The output name {name!r} must stay inside the output folder: use a plain name.")
    if any(c in text for c in '<>"|?*\0'):
        raise UserError(f"The output name {name!r} holds a character file names cannot have.")
    path = folder.joinpath(*parts).with_name(parts[-1] + ".safetensors")
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise UserError(f"The output name {name!r} must stay inside the output folder: use a plain name.")
    return path


@dataclass
class JobPlan:
    """What one tab job runs: the engine's options, what it writes (a LoRA or a checkpoint),
    where, and the labels of the chosen models. (The engine's own plan is extract.Plan.)"""

    opts: ExtractOptions
    kind: str
    folder: Path
    base_label: str
    variant_labels: list[str]


def plan_job(services, form: Form, listing: bool = False) -> JobPlan:
    """Resolve the chosen models and the output, or raise UserError with one sentence.

    ``listing``: for "List layers", which writes nothing: no output name or folder needed."""
    if not form.base:
        raise UserError("Choose a base model.")
    if not form.variant:
        raise UserError("Choose a variant (the fine-tuned checkpoint or a LoRA).")
    if is_lora_choice(form.base):
        raise UserError("The base must be a checkpoint, not a LoRA.")
    if form.mode not in MODES:
        raise UserError(f"Unknown mode {form.mode!r}; choose single, common or union.")
    if form.output_kind not in OUTPUT_KINDS:
        raise UserError(f"Unknown output kind {form.output_kind!r}.")
    two = form.mode in ("common", "union")
    if two and (not form.variant2 or form.variant2 == NONE_CHOICE):
        raise UserError(f"Mode {form.mode} needs a second variant: choose one, or set the mode to single.")

    base = resolve_model(services, form.base, "base")
    variant = resolve_model(services, form.variant, "variant")
    variant2 = resolve_model(services, form.variant2, "second variant") if two else None
    if base.resolve() == variant.resolve():
        raise UserError(f"The base and the variant are the same file ({base.name}); choose a different variant.")

    kind = "lora" if form.output_kind == OUTPUT_KINDS[0] else "checkpoint"
    folder = Path(services.lora_dir() if kind == "lora" else services.checkpoint_dir())
    if listing:
        return JobPlan(options_for(form, base, variant, variant2, None, None), kind, folder, choice_stem(form.base), [])
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"The output folder {folder} cannot be created ({exc.strerror}).") from None
    name = (form.name or "").strip() or default_name(form.variant, form.variant2, form.mode, form.output_kind, form.expert)
    out = output_path(folder, name)
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
    if wan_experts.writes_two(form):
        pass  # "both" writes <name>_high and <name>_low instead: wan_experts.expert_plans checks those
    elif out.exists() and not form.overwrite:
        where = "Lora folder" if kind == "lora" else "checkpoint folder"
        raise UserError(f"{out.name} already exists in the {where}: choose another name or tick Overwrite.")
    elif out.resolve() in (base.resolve(), variant.resolve()) or (variant2 and out.resolve() == variant2.resolve()):
        raise UserError(f"The output {out.name} would replace one of the inputs: choose another name.")
    detail_out = None
    if kind == "checkpoint" and form.detail:
        # The checkpoint's detail LoRA goes where the WebUI lists LoRAs, not among the checkpoints.
        lora_folder = Path(services.lora_dir())
        lora_folder.mkdir(parents=True, exist_ok=True)
        detail_out = lora_folder / (out.stem + "_detail.safetensors")
        if detail_out.exists() and not form.overwrite:
            raise UserError(f"{detail_out.name} already exists in the Lora folder: choose another name or tick Overwrite.")

    opts = options_for(form, base, variant, variant2, out, detail_out)
    opts.validate()
    labels = [choice_stem(form.variant)] + ([choice_stem(form.variant2)] if variant2 else [])
    return JobPlan(opts, kind, folder, choice_stem(form.base), labels)


def options_for(form: Form, base, variant, variant2, out, detail_out) -> ExtractOptions:
    return ExtractOptions(
        base=base,
        variant=variant,
        variant2=variant2,
        out=out,
        detail_out=detail_out,
        rank=int(form.rank),
        rank_thresh=float(form.rank_thresh),
        rank_max=int(form.rank_max),
        target_size=target_size_option(form.target_size),
        min_dim=int(form.min_dim),
        include=form.include or "",
        exclude=form.exclude or "",
        full_layer=bool(form.full_layer),
        union=form.mode == "union",
        alpha=float(form.alpha),
        checkpoint=form.output_kind == OUTPUT_KINDS[1],
        checkpoint_full=form.output_kind == OUTPUT_KINDS[2],
        detail=bool(form.detail),  # with "Checkpoint (full delta)" refused by validate(), not dropped
        detail_scale=float(form.detail_scale),
        format=form.format or "auto",
        save_dtype=form.save_dtype or "auto",
        device=form.device or "auto",
        svd=form.svd or "randomized",
        overwrite=bool(form.overwrite),
        expert=wan_experts.expert_option(form.expert),
    )


def target_size_option(megabytes) -> str:
    """The "Target size (MB)" field as ``ExtractOptions.target_size``: "" (the per-layer rule)
    when empty or 0, else "<n>MB" written out in plain digits (never "1e-05MB")."""
    if megabytes is None or (isinstance(megabytes, str) and not megabytes.strip()):
        return ""
    try:
        value = float(megabytes)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(f"'Target size (MB)' must be 0 (the per-layer rule) or a size in MB, not {megabytes}.")
    if value == 0:
        return ""
    return f"{value:.6f}".rstrip("0").rstrip(".") + "MB"


def resolve_model(services, choice: str, role: str) -> Path:
    if is_lora_choice(choice):
        name = choice[len(LORA_PREFIX) :]
        path = services.resolve_lora(name)
        if path is None:
            raise UserError(f"The LoRA {name} is not in the Lora list any more: press refresh and choose again.")
    else:
        path = services.resolve_checkpoint(choice)
        if path is None:
            raise UserError(f"The {role} {choice} is not in the checkpoint list any more: press refresh and choose again.")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The {role} file {path} does not exist any more: press refresh and choose again.")
    return path


def plan_jobs(services, form: Form, listing: bool = False) -> list[JobPlan]:
    """What the form runs: one plan, or with Wan 2.2 "both" one per expert (wan_experts.py)."""
    return wan_experts.expert_plans(services, form, plan_job(services, form, listing), listing)


def run_job(
    services,
    form: Form,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> JobResult:
    """Run one extraction (or one per Wan 2.2 expert); every outcome, failures included,
    comes back as a JobResult."""
    started = time.monotonic()
    log_lines: list[str] = []
    saved: list[Path] = []  # a "both" run's first expert stays saved if the second fails

    def log(line: str) -> None:  # the engine's one-line notes go to the console, as the CLI's do
        log_lines.append(line)
        print(f"ckpt2lora: {line}", file=sys.stderr)

    def failed(message: str, cancelled: bool = False) -> JobResult:
        if saved:
            message = message.replace(STOPPED, "Interrupted.")
            message += f" Already saved: {', '.join(p.name for p in saved)}; the other expert's LoRA was not written."
        return JobResult(ok=False, cancelled=cancelled, message=message, seconds=time.monotonic() - started)

    try:
        plans = plan_jobs(services, form)
        if should_stop is not None and should_stop():
            raise Cancelled()
        if form.free_model:
            services.free_model()
        outputs, sidecars, reports, warnings, summaries = [], [], [], [], []
        for plan in plans:
            expert = plan.opts.expert if len(plans) > 1 else ""
            title = wan_experts.TITLES.get(expert, "")
            step = progress
            if progress is not None and title:
                step = lambda done, total, layer, title=title: progress(done, total, f"{title}: {layer}")  # noqa: E731
            result = services.extract(plan.opts, progress=step, should_stop=should_stop, log=log)
            written = [Path(p) for p in result.outputs]
            saved.extend(written)
            report = result.report.to_dict()
            loras = written if plan.kind == "lora" else written[1:]  # a checkpoint's detail LoRA too
            if loras:
                sd_version = services.sd_version_name(result.architecture)
                for path in loras:
                    text = describe(plan, report, detail=path != written[0])
                    sidecars.append(sidecar.write_sidecar(path, sd_version=sd_version, description=text))
                services.refresh_loras()
            outputs.extend(written)
            reports.append((plan, written[0], tab_report(report)))
            summaries.append(tab_text(result.report.summary_text()))
            warnings.extend(f"{title}: {tab_text(w)}" if title else tab_text(w) for w in result.warnings)
        if plans[0].kind == "lora":
            name = outputs[0].stem
        else:
            services.refresh_checkpoints()
            name = services.checkpoint_title(outputs[0]) or outputs[0].name
        experts = []
        if len(plans) > 1:
            choices = {"high": (form.base, form.variant), "low": (form.base_low, form.variant_low)}
            for plan, path, report in reports:
                base, variant = choices[plan.opts.expert]
                experts.append(ExpertOutput(plan.opts.expert, path.stem, base or "", variant or "", report))
        return JobResult(
            ok=True,
            message=f"Saved {', '.join(p.name for _, p, _ in reports)}.",
            kind=plans[0].kind,
            name=name,
            outputs=outputs,
            sizes=[p.stat().st_size for p in outputs],
            sidecars=sidecars,
            report=reports[0][2],
            summary="\n".join(summaries),
            warnings=warnings,
            seconds=time.monotonic() - started,
            experts=experts,
        )
    except UserError as error:
        return failed(tab_text(str(error)))
    except Cancelled:
        return failed(STOPPED, cancelled=True)
    except Exception as error:  # a bug: the traceback goes to the console, one sentence to the tab
        logger.exception("ckpt2lora: the extraction failed")
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
        return failed(f"The extraction failed unexpectedly ({detail}); the console has the details.")


def describe(plan: JobPlan, report: dict, detail: bool = False) -> str:
    """The Lora card's description: how the file was made."""
    opts = plan.opts
    if opts.variant2 is not None:
        how = "union" if opts.union else "common part"
        source = f"the {how} of {plan.variant_labels[0]} and {plan.variant_labels[1]}"
        if opts.union:
            source += f" (alpha {opts.alpha:g})"
    else:
        source = plan.variant_labels[0]
    total = report.get("total", {})
    budget = report.get("budget")
    if budget:
        wanted = _target_mb(budget["target_bytes"]) if budget.get("target_bytes") else f"{budget['target_energy']:.0%} energy"
        rank = f"ranks chosen across all layers for {wanted} (at most {opts.rank_max} per layer)"
        captured = f"{100 * float(budget['captured_energy']):.1f}% of the difference captured over the whole model"
    else:
        rank = f"rank {opts.rank}" if opts.rank else f"automatic rank ({opts.rank_thresh:.0%} energy, at most {opts.rank_max})"
        captured = f"{100 * float(total.get('energy', 0.0)):.1f}% of the difference captured"
    what = "Detail residual (what the main LoRA missed) of" if detail else "Extracted from"
    text = f"{what} {source} minus the base {plan.base_label} by ckpt2lora: {rank}, {total.get('n', 0)} layers, {captured}."
    if detail and opts.detail_scale != 1.0:
        text += f" Pre-scaled by {opts.detail_scale:g}."
    if opts.expert:
        text += f" For Wan 2.2's {opts.expert}-noise expert model only."
    return text


def _target_mb(size: float) -> str:
    """The target as typed in the field: 0.05 MB, 1.5 MB, 100 MB."""
    return f"{size / 1e6:g} MB"


@dataclass
class BudgetText:
    """What a run with a target size chose, in the tab's words: ``summary`` (the size against
    the target; the energy kept and how many layers sit at 'Max rank' or at rank 1) and one
    line per group of layers (its mean rank and its share of the file's bytes)."""

    summary: list[str]
    groups: list[str]


def budget_text(report: dict | None) -> BudgetText | None:
    """``report["budget"]`` (``Report.to_dict()``) in the tab's words; None for a per-layer run.

    The engine's ``Report.budget_lines()`` says the same for the console; the tab only gets
    the dict, and names its own fields ('Target size (MB)', 'Max rank') instead of flags."""
    budget = (report or {}).get("budget")
    if not budget:
        return None
    written = int(budget["bytes"])
    target = budget.get("target_bytes")
    if target:
        size = (
            f"Target size {_target_mb(target)}: the LoRA takes {format_size(written)} "
            f"({written:,} bytes, {100 * written / target:.1f}% of the target)."
        )
    else:
        energy = 100 * float(budget["target_energy"])
        size = f"Target energy {energy:.1f}%: the LoRA takes {format_size(written)} ({written:,} bytes)."
    layers = int(budget["layers"])
    kept = (
        f"It keeps {100 * float(budget['captured_energy']):.1f}% of the difference's energy over the whole model "
        f"({100 * float(budget['captured_objective']):.1f}% of the '{budget['objective']}' objective the ranks were chosen for); "
        f"{layers} layer{'s' if layers != 1 else ''}: {budget['at_cap']} at 'Max rank', {budget['at_floor']} at rank 1."
    )
    groups = budget.get("groups") or []
    spent = sum(int(group["bytes"]) for group in groups) or 1
    lines = []
    for group in groups:
        name = ("[Aux] " if group.get("auxiliary") else "") + f"{group['level']} {group['type']}"
        n = int(group["n"])
        lines.append(
            f"{name}: {n} layer{'s' if n != 1 else ''}, rank {float(group['rank']):.1f} on average, "
            f"{format_size(int(group['bytes']))} ({100 * int(group['bytes']) / spent:.1f}% of the bytes)"
        )
    return BudgetText([size, kept], lines)


@dataclass
class ListingResult:
    ok: bool
    text: str  # the layer list and its count, or the one-sentence error


def list_job(services, form: Form) -> ListingResult:
    """"List layers": the dry run of the current form (headers only, nothing written)."""
    from ..listing import list_layers

    try:
        plans = plan_jobs(services, form, listing=True)
        texts = [list_layers(plan.opts).text() for plan in plans]
        if len(plans) > 1:  # Wan 2.2 "both": each expert's pair under its title
            texts = [f"{wan_experts.TITLES[p.opts.expert]}:\n{text}" for p, text in zip(plans, texts)]
    except UserError as error:
        return ListingResult(False, tab_text(str(error)))
    except Exception as error:  # a bug: the traceback goes to the console, one sentence to the tab
        logger.exception("ckpt2lora: listing the layers failed")
        failed = f"Listing the layers failed unexpectedly ({type(error).__name__}); the console has the details."
        return ListingResult(False, failed)
    return ListingResult(True, tab_text("\n\n".join(texts)))

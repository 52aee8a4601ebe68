"""Wan 2.2 A14B's two experts in the tab (no gradio here; wan_experts_layout/_wiring show it).

Wan 2.2 14B ships as a high-noise and a low-noise expert file, shaped alike, and users load
one LoRA per expert (ComfyUI: a LoRA loader on each expert model; lightx2v's and Civitai's
Wan 2.2 LoRAs come as ..._HIGH / ..._LOW pairs; Forge Neo runs the low-noise model in the
Refiner pass, backend/diffusion_engine/wan.py). The tab offers what the CLI does: one
expert (``--expert high|low``, recorded in the metadata) or both in one run
(``--base-low/--variant-low``: ``<name>_high`` and ``<name>_low``), through the same
``options.expert_pair``; the engine's own checks refuse a model without experts.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from ..options import expert_pair

NONE, HIGH, LOW, BOTH = "none", "high-noise", "low-noise", "both"
EXPERT_CHOICES = (NONE, HIGH, LOW, BOTH)
# The tab's choice -> ExtractOptions.expert ("both" runs expert_pair: "high", then "low")
EXPERT_OPTIONS = {NONE: "", HIGH: "high", LOW: "low", BOTH: ""}
TITLES = {"high": "High-noise expert", "low": "Low-noise expert"}
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Wan 2.2's released expert files say which they are: wan2.2_t2v_high_noise_14B_fp16.safetensors,
# Wan2.2-I2V-A14B .../high_noise_model/, lightx2v's ..._HIGH / ..._LOW.
_NAME_HINTS = tuple(
    (choice, re.compile(rf"(?<![a-z]){word}(?:[_\- ]?noise)?(?![a-z])", re.I)) for choice, word in ((HIGH, "high"), (LOW, "low"))
)


def expert_option(choice: str | None) -> str:
    """The tab's expert choice as ``ExtractOptions.expert``."""
    choice = choice or NONE
    if choice not in EXPERT_OPTIONS:
        raise UserError(f"Unknown 'Wan 2.2 expert' {choice!r}; choose one of {', '.join(EXPERT_CHOICES)}.")
    return EXPERT_OPTIONS[choice]


def writes_two(form) -> bool:
    return (form.expert or NONE) == BOTH


def has_experts(path: Path | None) -> bool:
    """Whether this model comes as Wan 2.2 A14B expert files, from its safetensors header only
    (a few hundred KB even for a 28 GB file); False for anything unreadable or pickled (never
    unpickled just to decide whether to show a control)."""
    from .. import architectures
    from ..reading import read_safetensors_header

    if path is None or Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return False
    try:
        infos, _, _ = read_safetensors_header(Path(path))
        return bool(getattr(architectures.detect(infos), "has_experts", False))
    except (UserError, OSError, ValueError):
        return False


def expert_from_name(choice: str | None) -> str:
    """high-noise / low-noise when the file's name says so, else none."""
    stem = _file_name(choice)
    found = [expert for expert, pattern in _NAME_HINTS if pattern.search(stem)]
    return found[0] if len(found) == 1 else NONE


def without_expert_hint(stem: str) -> str:
    """A name without its expert word, for the pair's NAME_high / NAME_low ("my_high_noise" -> "my")."""
    for _, pattern in _NAME_HINTS:
        stripped = re.sub(r"[_\- .]?" + pattern.pattern, "", stem, flags=re.I).strip("_- .")
        if stripped and stripped != stem:
            return stripped
    return stem


def low_noise_partner(choice: str | None, choices: list[str]) -> str | None:
    """The low-noise file beside a high-noise one, by name (``..._high_noise_...`` ->
    ``..._low_noise_...``, ``..._HIGH`` -> ``..._LOW``), if it is in ``choices``."""
    if not choice or expert_from_name(choice) != HIGH:
        return None
    name = _file_name(choice)
    swapped = _NAME_HINTS[0][1].sub(lambda m: _same_case(m.group(0), "low" + m.group(0)[4:]), name)
    for candidate in choices:
        if candidate != choice and _file_name(candidate) == swapped and _folder(candidate) == _folder(choice):
            return candidate
    return None


def expert_plans(services, form, plan, listing: bool = False) -> list:
    """``[plan]``, or with "both" one ``job.JobPlan`` per expert (high, then low) from
    ``options.expert_pair``: the low-noise pair resolved, both outputs checked and both pairs
    planned (headers only) before anything is written, as the CLI does."""
    from . import job
    from .job import JobPlan

    if not writes_two(form):
        return [plan]
    if not form.base_low or not form.variant_low or form.variant_low == job.NONE_CHOICE:
        raise UserError(
            "'Wan 2.2 expert' both extracts the low-noise pair too: choose its 'Low-noise base' and "
            "'Low-noise variant' (or pick one expert)."
        )
    if job.is_lora_choice(form.base_low):
        raise UserError("The 'Low-noise base' must be a checkpoint, not a LoRA.")
    base_low = job.resolve_model(services, form.base_low, "low-noise base")
    variant_low = job.resolve_model(services, form.variant_low, "low-noise variant")
    if base_low.resolve() == variant_low.resolve():
        raise UserError(
            f"The low-noise base and variant are the same file ({base_low.name}); choose a different low-noise variant."
        )
    # expert_pair names the outputs from opts.out; List layers has none, so a stand-in name
    # (dropped again below: a listing writes nothing).
    opts = plan.opts if plan.opts.out is not None else replace(plan.opts, out=plan.folder / "listing.safetensors")
    high, low = expert_pair(opts, base_low, variant_low)
    low_labels = job.choice_stem(form.base_low), [job.choice_stem(form.variant_low)]
    runs = [(high, plan.base_label, plan.variant_labels), (low, *low_labels)]
    plans = []
    for opts, base_label, variant_labels in runs:
        if listing:
            opts = replace(opts, out=None, report_json=None)
        else:
            check_output(opts, plan.kind)
        plans.append(JobPlan(opts, plan.kind, plan.folder, base_label, list(variant_labels)))
    if not listing:
        from ..listing import list_layers

        for each in plans:  # a wrong low-noise file fails now, not after the high-noise LoRA is written
            list_layers(replace(each.opts, out=None))
    return plans


def check_output(opts, kind: str) -> None:
    """One expert's output, in the tab's words (job.plan_job says the same for one output)."""
    out = opts.out
    if out.exists() and not opts.overwrite:
        where = "Lora folder" if kind == "lora" else "checkpoint folder"
        raise UserError(f"{out.name} already exists in the {where}: choose another name or tick Overwrite.")
    if out.resolve() in {p.resolve() for p in (opts.base, opts.variant, opts.variant2) if p is not None}:
        raise UserError(f"The output {out.name} would replace one of the inputs: choose another name.")


def usage_hint(names: list[str]) -> str:
    """The status line for the two LoRAs: which goes with which expert model."""
    high, low = names
    return (
        f"Wan 2.2: <lora:{high}:1> goes with the high-noise expert model, <lora:{low}:1> with the low-noise one "
        "(one LoRA per expert, each with its own base). Send to txt2img and Compare use the expert chosen below."
    )


def _file_name(choice: str | None) -> str:
    text = (choice or "").split(" [")[0].replace("\\", "/")
    return text.rsplit("/", 1)[-1]


def _folder(choice: str) -> str:
    text = choice.split(" [")[0].replace("\\", "/")
    return text.rsplit("/", 1)[0] if "/" in text else ""


def _same_case(original: str, replacement: str) -> str:
    if original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement

"""Planning: which units (LoRA modules or checkpoint tensors) exist and are selected.

Reads headers only, so every input problem (a LoRA as the base, mixed architectures, a
format the model has no names for) is reported before any tensor is read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import architectures, scaled_fp8
from .architectures import Architecture, FileView
from .errors import UserError
from .options import ExtractOptions
from .reading import FLOAT_DTYPES, TensorFile
from .report import Report
from .sources import CheckpointSource, DeltaSource
from .writing import SAVE_DTYPES


@dataclass
class Unit:
    """One LoRA module (or checkpoint tensor) to extract: one canonical weight, or several
    stacked by rows when a format fuses them (Z-Image's qkv in ComfyUI style)."""

    parts: tuple[str, ...]
    module: str | None
    shape: tuple[int, ...]
    rows: tuple[int, ...] = ()  # each part's height (one part: the unit's own)

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = (self.shape[0],)

    @property
    def key(self) -> str:
        return self.parts[0]


@dataclass
class Plan:
    arch: Architecture
    fmt: str
    base: FileView
    sources: list[DeltaSource]
    units: list[Unit]
    report: Report
    save_dtype: torch.dtype


def detail_path(out: Path) -> Path:
    return out.with_name(out.stem + "_detail.safetensors")


def detail_output(opts: ExtractOptions) -> Path:
    """Where --detail writes: ``opts.detail_out`` when given (the tab puts a checkpoint's
    detail LoRA in the Lora folder), else ``<out>_detail.safetensors`` beside the output."""
    return opts.detail_out or detail_path(opts.out)


def make_plan(opts: ExtractOptions, stack: contextlib.ExitStack, log: Callable[[str], None]) -> Plan:
    refuse_output_over_an_input(opts)
    return plan_against(open_base(opts, stack, log), opts, stack, log)


@dataclass
class OpenBase:
    """The base model, opened and recognised once (headers only): a batch run plans every
    variant against the same one, so each base tensor is read once for all of them."""

    arch: Architecture
    view: FileView
    fmt: str
    description: str
    warnings: list[str]
    save_dtype: torch.dtype

    def new_report(self) -> Report:
        report = Report(architecture=self.arch.name, description=self.description)
        report.format, report.loads_in = self.fmt, self.arch.format_loaders.get(self.fmt, "")
        report.warnings.extend(self.warnings)
        return report


def open_base(opts: ExtractOptions, stack: contextlib.ExitStack, log: Callable[[str], None]) -> OpenBase:
    base_file = stack.enter_context(TensorFile(opts.base, "base"))
    from .lora_input import is_lora_file

    if is_lora_file(base_file.infos):
        raise UserError(
            f"The base {opts.base.name} is a LoRA; give the model it was trained on as --base and the LoRA as --variant."
        )
    arch = architectures.detect(base_file.infos, strict=opts.strict, path=opts.base)
    base = FileView.build(base_file, arch)
    description = arch.describe(base_file.infos) + scaled_fp8.describe(base_file)
    log(f"Base: {opts.base.name}: {description}.")
    warnings = []
    if arch.name == "generic":
        warnings.append(
            f"{opts.base.name} is not an {architectures.KNOWN_FAMILIES} model; LoRA keys use ComfyUI's "
            "diffusion_model.<key> form (pass --strict to refuse instead)."
        )
    if opts.expert and not arch.has_experts:
        raise UserError(
            f"--expert names one of Wan 2.2 A14B's two expert files, but the base {opts.base.name} is {arch.title}; "
            "drop --expert (and --base-low/--variant-low)."
        )
    fmt = arch.resolve_format(opts.format)
    if fmt not in arch.formats:
        raise UserError(f"--format {fmt} does not apply to {arch.title}; choose one of {', '.join(arch.formats)} (or auto).")
    if opts.detail and writes_checkpoint(opts) and any(arch.fusion(key, fmt) for key in base.shapes):
        raise UserError(
            f"--format {fmt} fuses weights that a --checkpoint run handles one by one, so its --detail LoRA "
            "cannot use it; pick another --format (or auto)."
        )
    return OpenBase(arch, base, fmt, description, warnings, choose_save_dtype(opts.save_dtype, base_file))


def plan_against(opened: OpenBase, opts: ExtractOptions, stack: contextlib.ExitStack, log: Callable[[str], None]) -> Plan:
    """The plan of ``opts``' variant(s) against an opened base: opens the variants, selects the units."""
    arch, base, fmt = opened.arch, opened.view, opened.fmt
    report = opened.new_report()
    sources = [
        open_source(path, role, arch, base, stack, opts, log)
        for path, role in ((opts.variant, "variant"), (opts.variant2, "variant2"))
        if path is not None
    ]
    units = select_units(arch, fmt, base, sources, opts, report)
    models = [source.view.file for source in sources if isinstance(source, CheckpointSource)]
    if models and (note := scaled_fp8.rounding_warning([base.file, *models])):
        report.warnings.append(note)
    return Plan(arch, fmt, base, sources, units, report, opened.save_dtype)


def refuse_output_over_an_input(opts: ExtractOptions) -> None:
    """--overwrite replaces an old output, never one of the models being read."""
    if opts.out is None:  # a dry run (--list-layers) writes nothing
        return
    outputs = [opts.out, detail_output(opts)] if opts.detail else [opts.out]
    for output in outputs:
        for role, path in (("base", opts.base), ("variant", opts.variant), ("variant2", opts.variant2)):
            if path is not None and output.exists() and path.exists() and os.path.samefile(output, path):
                raise UserError(f"The output {output} is the {role} file itself; choose another output name.")


def open_source(path: Path, role: str, arch: Architecture, base: FileView, stack, opts, log) -> DeltaSource:
    file = stack.enter_context(TensorFile(path, role))
    from .lora_input import LoraSource, is_lora_file

    if is_lora_file(file.infos):
        source = LoraSource(file, arch, base)
        log(f"{role.capitalize()}: {path.name}: a LoRA with {len(source.shapes)} target weights.")
        return source
    variant_arch = architectures.detect(file.infos, strict=opts.strict, path=path)
    # the title names the kind too (Flux.1 Fill, Flux.2 Klein 4B vs dev): another kind is another model
    if (variant_arch.name, variant_arch.title) != (arch.name, arch.title):
        raise UserError(
            f"The base {base.file.path.name} is {arch.title} but the {role} {path.name} is "
            f"{variant_arch.title}; pick a {role} derived from the base."
        )
    view = FileView.build(file, variant_arch)
    log(f"{role.capitalize()}: {path.name}: {variant_arch.describe(file.infos)}{scaled_fp8.describe(file)}.")
    return CheckpointSource(view)


def select_units(arch, fmt, base: FileView, sources, opts: ExtractOptions, report: Report) -> list[Unit]:
    include, exclude = opts.include_segments, opts.exclude_segments
    units = []
    for key, shape in base.shapes.items():
        raw_key = base.refs[key].key
        missing = [source.name for source in sources if key not in source.shapes]
        if missing:
            report.skip(f"not in {missing[0]}", key)
            continue
        mismatched = [s for s in sources if tuple(s.shapes[key]) != tuple(shape)]
        if mismatched:
            report.skip("shape differs from the base", key)
            report.warnings.append(
                f"{key} has shape {list(shape)} in the base but {list(mismatched[0].shapes[key])} in "
                f"{mismatched[0].name}; that weight was skipped."
            )
            continue
        if base.dtype(key) not in FLOAT_DTYPES:
            continue
        if include and not any(seg in key or seg in raw_key for seg in include):
            report.skip("not in --include", key)
            continue
        if any(seg in key or seg in raw_key for seg in exclude):
            report.skip("in --exclude", key)
            continue
        if len(shape) >= 2:
            if not opts.full_layer and min(shape[0], _prod(shape[1:])) < opts.min_dim:
                report.skip("below --min-dim", key)
                continue
        elif not opts.full_layer:
            report.skip("1-D (use --full-layer)", key)
            continue
        fused = None if writes_checkpoint(opts) else arch.fusion(key, fmt)
        if fused == ():
            continue  # written as part of the fused module its group's first key leads
        parts = fused or (key,)
        if any(part not in base.shapes or any(part not in s.shapes for s in sources) for part in parts):
            report.skip("part of a fused weight missing", key)
            continue
        module = arch.lora_module(key, fmt)
        if module is None and not writes_checkpoint(opts):
            report.skip("not representable in a LoRA", key)
            continue
        rows = tuple(base.shapes[part][0] for part in parts)
        units.append(Unit(parts, module, (sum(rows), *shape[1:]), rows))
    for source in sources:
        extra = [k for k in source.shapes if k not in base.shapes]
        for key in extra:
            report.skip(f"only in {source.name}", key)
    return units


def writes_checkpoint(opts: ExtractOptions) -> bool:
    return opts.checkpoint or opts.checkpoint_full


def choose_save_dtype(name: str, base_file: TensorFile) -> torch.dtype:
    if name != "auto":
        return SAVE_DTYPES[name]
    counts: dict[torch.dtype, int] = {}
    for info in base_file.infos.values():
        if info.dtype in FLOAT_DTYPES:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    dominant = max(counts, key=counts.get) if counts else torch.float16
    return torch.float16 if dominant in (torch.float16, torch.float32, torch.float64) else torch.bfloat16


def _prod(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result

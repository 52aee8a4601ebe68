"""One extraction, start to finish: plan the layers, stream them, write the result.

Per layer: read the base tensor and the variant's (ahead, in a background thread),
delta in fp32 on the compute device, truncated SVD with the rank rule, factors cast and
moved to the CPU at once. Only a few layers are ever in memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import architectures
from .architectures import Architecture, FileView
from .block_lora import factorize_blocks
from .constants import NOT_DERIVED_RELATIVE_DELTA, PREFETCH_DEPTH
from .devices import fast_matmuls, is_out_of_memory, resolve_device
from .errors import Cancelled, UserError
from .metadata import lora_metadata
from .options import ExtractOptions
from .prefetch import prefetched
from .reading import FLOAT_DTYPES, TensorFile
from .report import Report, record_for
from .sources import CheckpointSource, DeltaSource
from .svd import squared_norm
from .writing import SAVE_DTYPES, check_output_path, output_group, write_tensors

Progress = Callable[[int, int, str], None]
# The skip reason of a layer whose two variants share nothing (see combine.nothing_in_common).
NOTHING_IN_COMMON = "nothing in common"


@dataclass
class ExtractResult:
    outputs: list[Path]
    architecture: str
    report: Report
    warnings: list[str] = field(default_factory=list)


@dataclass
class Unit:
    """One LoRA module (or checkpoint tensor) to extract: one canonical weight, or several
    stacked by rows when a format fuses them (Z-Image's qkv in ComfyUI style)."""

    parts: tuple[str, ...]
    module: str | None
    shape: tuple[int, ...]

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


def extract(
    opts: ExtractOptions,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Extract a LoRA (or a checkpoint) as ``opts`` says; see the module docstring."""
    log = log or _log_to_stderr
    if opts.out is None:
        raise UserError("Give the output file with --out (only --list-layers runs without one).")
    opts.validate()
    device = resolve_device(opts.device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(fast_matmuls(device))  # TF32 on CUDA for this run only
        plan = make_plan(opts, stack, log)  # reads headers only: input problems come first
        check_output_path(opts.out, opts.overwrite)
        if opts.detail:
            check_output_path(detail_output(opts), opts.overwrite)
        if writes_checkpoint(opts):
            from .checkpoint import write_checkpoint

            outputs = write_checkpoint(plan, opts, Runner(plan, opts, device, log), progress, should_stop)
        else:
            main, detail = run_lora(plan, opts, device, progress, should_stop, log)
            main = complete_attention_groups(plan, opts, main, "LoRA")
            detail = complete_attention_groups(plan, opts, detail, "detail LoRA")
            outputs = write_lora_outputs(plan, opts, main, detail)
    for line in plan.report.warnings:
        log("Warning: " + line)
    return ExtractResult(outputs, plan.arch.name, plan.report, list(plan.report.warnings))


# -- planning --------------------------------------------------------------------------
def make_plan(opts: ExtractOptions, stack: contextlib.ExitStack, log: Callable[[str], None]) -> Plan:
    refuse_output_over_an_input(opts)
    base_file = stack.enter_context(TensorFile(opts.base, "base"))
    from .lora_input import is_lora_file

    if is_lora_file(base_file.infos):
        raise UserError(
            f"The base {opts.base.name} is a LoRA; give the model it was trained on as --base and the LoRA as --variant."
        )
    arch = architectures.detect(base_file.infos, strict=opts.strict, path=opts.base)
    base = FileView.build(base_file, arch)
    report = Report(architecture=arch.name, description=arch.describe(base_file.infos))
    log(f"Base: {opts.base.name}: {report.description}.")
    if arch.name == "generic":
        report.warnings.append(
            f"{opts.base.name} is not an {architectures.KNOWN_FAMILIES} model; LoRA keys use ComfyUI's "
            "diffusion_model.<key> form (pass --strict to refuse instead)."
        )
    fmt = arch.resolve_format(opts.format)
    if fmt not in arch.formats:
        raise UserError(f"--format {fmt} does not apply to {arch.title}; choose one of {', '.join(arch.formats)} (or auto).")
    report.format, report.loads_in = fmt, arch.format_loaders.get(fmt, "")
    sources = [
        open_source(path, role, arch, base, stack, opts, log)
        for path, role in ((opts.variant, "variant"), (opts.variant2, "variant2"))
        if path is not None
    ]
    if opts.detail and writes_checkpoint(opts) and any(arch.fusion(key, fmt) for key in base.shapes):
        raise UserError(
            f"--format {fmt} fuses weights that a --checkpoint run handles one by one, so its --detail LoRA "
            "cannot use it; pick another --format (or auto)."
        )
    units = select_units(arch, fmt, base, sources, opts, report)
    return Plan(arch, fmt, base, sources, units, report, choose_save_dtype(opts.save_dtype, base_file))


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
    if variant_arch.name != arch.name:
        raise UserError(
            f"The base {base.file.path.name} is {arch.title} but the {role} {path.name} is "
            f"{variant_arch.title}; pick a {role} derived from the base."
        )
    view = FileView.build(file, variant_arch)
    log(f"{role.capitalize()}: {path.name}: {variant_arch.describe(file.infos)}.")
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
        rows = sum(base.shapes[part][0] for part in parts)
        units.append(Unit(parts, module, (rows, *shape[1:])))
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


# -- running ---------------------------------------------------------------------------
@dataclass
class Outcome:
    tensors: dict[str, torch.Tensor]
    detail: dict[str, torch.Tensor]
    record: object
    change: torch.Tensor | None = None  # what a checkpoint adds to the base (device, fp32)


class Runner:
    """Streams units through the compute device, with the CPU as fallback per unit."""

    def __init__(self, plan: Plan, opts: ExtractOptions, device: torch.device, log):
        self.plan, self.opts, self.device, self.log = plan, opts, device, log
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.relative_deltas: list[float] = []

    def load(self, unit: Unit, bases: list[torch.Tensor] | None = None):
        """Read the base and variant tensors of a unit (runs in the reader thread).

        ``bases``: the unit's base tensors when the caller has already read them."""
        if bases is None:
            bases = [self.plan.base.read(part) for part in unit.parts]
        sources = [[source.load(part) for part in unit.parts] for source in self.plan.sources]
        # On the GPU: pinned 16-bit tensors (half the bytes to copy, widened there). On the
        # CPU: widen to fp32 here, in the reader thread, off the computing thread.
        prepare = (lambda t: t.pin_memory()) if self.device.type == "cuda" else (lambda t: t.float())
        bases = [prepare(tensor) for tensor in bases]
        sources = [[prepare(item) if torch.is_tensor(item) else item for item in items] for items in sources]
        return bases, sources

    def compute(self, unit: Unit, loaded, for_checkpoint: bool = False) -> Outcome | None:
        try:
            outcome = self._compute_on(unit, loaded, self.device, self.generator, for_checkpoint)
        except RuntimeError as error:
            if self.device.type != "cuda" or not is_out_of_memory(error):
                raise
            torch.cuda.empty_cache()
            self.log(f"Warning: {unit.key} does not fit on {self.device}; computing it on the CPU.")
            outcome = self._compute_on(unit, loaded, torch.device("cpu"), None, for_checkpoint)
        if outcome is not None:
            self.plan.report.add(outcome.record)
            self.relative_deltas.append(outcome.record.relative_delta)
        return outcome

    def _compute_on(self, unit: Unit, loaded, device, generator, for_checkpoint) -> Outcome | None:
        plan, opts = self.plan, self.opts
        base_parts, source_parts = loaded
        bases = [tensor.to(device, non_blocking=True).float() for tensor in base_parts]
        deltas = [
            _stack_rows([source.delta(item, base) for item, base in zip(items, bases)])
            for source, items in zip(plan.sources, source_parts)
        ]
        base = _stack_rows(bases)
        del bases, base_parts, source_parts
        # One pass per delta gives ||delta||^2 accurately, and NaN/Inf propagate into it.
        energies = [squared_norm(delta) for delta in deltas]
        if not all(math.isfinite(energy) for energy in energies):
            plan.report.skip("NaN or Inf in the delta", unit.key)
            plan.report.warnings.append(f"{unit.key} holds NaN or Inf in the variant; it was left out.")
            return None
        if len(deltas) == 1:
            delta, energy = deltas[0], energies[0]
        else:
            from .combine import combine, nothing_in_common

            delta = combine(deltas[0], deltas[1], opts, generator)
            energy = squared_norm(delta)
            if not opts.union and nothing_in_common(energy, energies):
                plan.report.skip(NOTHING_IN_COMMON, unit.key)
                return None
        if energy == 0.0:
            plan.report.skip("no change", unit.key)
            return None
        relative = math.sqrt(energy) / max(_approximate_norm(base), 1e-12)
        group = plan.arch.group(unit.key)
        name = unit.module or unit.key
        if len(unit.shape) == 1 or opts.checkpoint_full:
            record = record_for(name, unit.key, group, unit.shape, 0, 0.0, 0.0, 1.0, relative)
            suffix = ".diff_b" if unit.key.endswith(".bias") else ".diff"
            tensors = {} if for_checkpoint or unit.module is None else {unit.module + suffix: delta.to("cpu", plan.save_dtype)}
            return Outcome(tensors, {}, record, delta if for_checkpoint else None)
        matrix = delta.reshape(unit.shape[0], -1)
        exact = opts.svd == "exact"
        # A fused unit (Z-Image's q|k|v in comfy style) is factored part by part, each with
        # its own rank, so it carries exactly what the split modules would.
        rows = [plan.base.shapes[part][0] for part in unit.parts]
        fact = factorize_blocks(matrix, rows, opts.rank, opts.rank_thresh, opts.rank_max, exact, generator, energy)
        style = plan.arch.formats[plan.fmt]
        tensors = {}
        if unit.module is not None and not for_checkpoint:
            tensors = lora_tensors(unit, style, fact.up, fact.down, fact.rank, plan.save_dtype, lora_alpha(opts))
        detail = {}
        if opts.detail and unit.module is not None:
            residual = matrix - fact.up @ fact.down
            if float(torch.linalg.vector_norm(residual)) > 0:
                extra = factorize_blocks(residual, rows, opts.rank, opts.rank_thresh, opts.rank_max, exact, generator)
                detail = lora_tensors(
                    unit, style, extra.up * opts.detail_scale, extra.down, extra.rank, plan.save_dtype, lora_alpha(opts)
                )
        record = record_for(name, unit.key, group, unit.shape, fact.rank, fact.s_max, fact.s_min, fact.energy, relative)
        change = (fact.up @ fact.down).reshape(unit.shape) if for_checkpoint else None
        return Outcome(tensors, detail, record, change)

    def finish(self) -> None:
        report = self.plan.report
        if self.relative_deltas and statistics.median(self.relative_deltas) > NOT_DERIVED_RELATIVE_DELTA:
            report.warnings.append(
                f"The variant does not look derived from the base: the median layer changes by "
                f"{100 * statistics.median(self.relative_deltas):.0f}% of its weight (fine-tunes and merges "
                "change a few percent); a LoRA from this pair will not reproduce the variant. "
                "Check that base and variant belong together (e.g. do not mix Z-Image Base and Turbo)."
            )
        not_finite = report.skipped.get("NaN or Inf in the delta")
        if not self.relative_deltas and not_finite:
            raise UserError(
                f"Nothing to extract: every changed layer of {self.opts.variant.name} holds NaN or Inf "
                f"(first: {not_finite[0]}), so the file is damaged; nothing was written."
            )
        if not self.relative_deltas and report.skipped.get(NOTHING_IN_COMMON):
            raise UserError(
                f"Nothing in common: {self.opts.variant.name} and {self.opts.variant2.name} share no change "
                "above 1% of either delta in any selected layer (use --union to combine them instead); "
                "nothing was written."
            )
        if not self.relative_deltas:
            raise UserError(
                f"No difference to extract: {self.opts.variant.name} matches {self.opts.base.name} in every "
                "selected layer; nothing was written."
            )


def run_lora(plan: Plan, opts, device, progress, should_stop, log) -> tuple[dict, dict]:
    runner = Runner(plan, opts, device, log)
    main: dict[str, torch.Tensor] = {}
    detail: dict[str, torch.Tensor] = {}
    total = len(plan.units)
    with contextlib.closing(prefetched(plan.units, runner.load, PREFETCH_DEPTH)) as stream:
        for done, (unit, loaded) in enumerate(stream):
            if should_stop is not None and should_stop():
                raise Cancelled()
            outcome = runner.compute(unit, loaded)
            if outcome is not None:
                main.update(outcome.tensors)
                detail.update(outcome.detail)
            if progress is not None:
                progress(done + 1, total, unit.key)
    runner.finish()
    return main, detail


def lora_alpha(opts: ExtractOptions) -> int:
    """The alpha of a "shared"-alpha style: the rank cap, the same on every module.

    Loaders scale a module by alpha / rank. diffusers reads kohya alphas through a key
    spelling that misses attention modules and falls back to the most common alpha, so
    per-module alphas (alpha = own rank) load wrongly there; one shared alpha, with
    rank / alpha folded into the factors, loads exactly in every loader."""
    return opts.rank if opts.rank > 0 else opts.rank_max


def lora_tensors(
    unit: Unit, style, up: torch.Tensor, down: torch.Tensor, rank: int, dtype, alpha: int
) -> dict[str, torch.Tensor]:
    """Factors in the layer's own layout: conv kernels as LoCon (down k x k, up 1 x 1)."""
    if style.alpha == "shared" and rank != alpha:
        fold = (rank / alpha) ** 0.5  # up @ down * alpha / rank == the delta
        up, down = up * fold, down * fold
    if len(unit.shape) > 2:
        down = down.reshape(rank, *unit.shape[1:])
        up = up.reshape(unit.shape[0], rank, *([1] * (len(unit.shape) - 2)))
    tensors = {
        unit.module + style.down: down.to("cpu", dtype).contiguous(),
        unit.module + style.up: up.to("cpu", dtype).contiguous(),
    }
    if style.writes_alpha:
        value = alpha if style.alpha == "shared" else rank
        tensors[unit.module + ".alpha"] = torch.tensor(float(value), dtype=dtype)
    return tensors


# -- modules a loader needs whole -----------------------------------------------------------
# A1111 applies an SDXL te2 (OpenCLIP-G) attention LoRA only when all four of q/k/v/out
# are present for that layer (it rebuilds the fused in_proj from q|k|v): one missing member
# silently disables the other three.
WHOLE_GROUP = re.compile(r"^(lora_te2_text_model_encoder_layers_\d+_self_attn_)(q|k|v|out)_proj$")
WHOLE_GROUP_MEMBERS = ("q", "k", "v", "out")


def complete_attention_groups(plan: Plan, opts: ExtractOptions, tensors: dict, what: str) -> dict:
    """Add a zero rank-1 member to every te2 attention group the run left incomplete
    (no change, NaN, --include/--exclude, a LoRA variant without it), so the members that
    were extracted are applied; one warning names the modules filled in."""
    style = plan.arch.formats[plan.fmt]
    present: dict[str, set[str]] = {}
    for name in tensors:
        if name.endswith(style.down):
            match = WHOLE_GROUP.match(name[: -len(style.down)])
            if match:
                present.setdefault(match.group(1), set()).add(match.group(2))
    missing = [(prefix, member) for prefix, members in present.items() for member in WHOLE_GROUP_MEMBERS if member not in members]
    if not missing:
        return tensors
    shapes = {}
    for key, shape in plan.base.shapes.items():
        if len(shape) == 2 and key.endswith(".weight"):
            module = plan.arch.lora_module(key, plan.fmt)
            if module is not None and WHOLE_GROUP.match(module):
                shapes[module] = (key, tuple(shape))
    filled = dict(tensors)
    names = []
    for prefix, member in missing:
        module = f"{prefix}{member}_proj"
        if module not in shapes:
            continue  # not in the base either: nothing a loader could apply it to
        key, shape = shapes[module]
        up, down = torch.zeros(shape[0], 1), torch.zeros(1, shape[1])
        filled.update(lora_tensors(Unit((key,), module, shape), style, up, down, 1, plan.save_dtype, lora_alpha(opts)))
        names.append(module)
    if names:
        plan.report.warnings.append(
            f"The {what} holds {len(names)} zero text-encoder-2 attention module(s) ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}): A1111 applies a layer's q/k/v/out only when all four exist, "
            "and these had no change, NaN, were filtered out or were not in the variant."
        )
    return filled


# -- writing ---------------------------------------------------------------------------
def write_lora_outputs(plan: Plan, opts: ExtractOptions, main, detail) -> list[Path]:
    pending = []
    for tensors, path, kind in ((main, opts.out, "main"), (detail if opts.detail else {}, detail_output(opts), "detail")):
        if tensors:
            pending.append((path, tensors, lora_file_metadata(plan, opts, tensors, path, kind)))
    # All or nothing: both files are written under temporary names, then renamed together;
    # a failure at any point leaves the user's old files (with --overwrite) untouched.
    with output_group(opts.overwrite) as group:
        for path, tensors, metadata in pending:
            write_tensors(path, tensors, metadata, opts.overwrite, group=group)
    return [path for path, _, _ in pending]


def lora_file_metadata(plan: Plan, opts: ExtractOptions, tensors: dict, path: Path, kind: str) -> dict[str, str]:
    """A LoRA file's metadata, with every module's rank read off its down factor."""
    down = plan.arch.formats[plan.fmt].down
    ranks = {name[: -len(down)]: int(t.shape[0]) for name, t in tensors.items() if name.endswith(down)}
    return lora_metadata(plan.arch, opts, ranks, path.stem, plan.fmt, kind=kind)


def _approximate_norm(tensor: torch.Tensor, stride: int = 16) -> float:
    """||tensor|| from every ``stride``-th element: ample for a relative size, 1/stride the cost."""
    flat = tensor.reshape(-1)
    if flat.numel() < 64 * stride:
        return float(torch.linalg.vector_norm(flat))
    return float(torch.linalg.vector_norm(flat[::stride])) * math.sqrt(stride)


def _stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _prod(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)

"""One merge (or resize) run: read the input LoRAs, merge each module from its factors,
choose the ranks (fixed, the energy rule, or a file-size budget), write one LoRA, report.

``--merge A.safetensors:0.5 B.safetensors`` merges; one input is a resize. Per module the
result is the truncated SVD of sum_i w_i dW_i (merge.py), the inputs read one module at a
time, so memory holds the output's factors and one module of each input. The output is
written in the family's default LoRA format (or ``--format``) with its alpha policy
(lora_format.lora_tensors: kohya SD1.5/SDXL files get ONE alpha, the rest folded into
the factors), in the inputs' precision unless ``--save-dtype`` says otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..allocation import budget_summary
from ..architectures import Group, LoraStyle
from ..budget import BudgetTooSmall, Spectrum, allocate, format_size, largest_bytes, parse_size, smallest_bytes
from ..constants import TOOL_NAME, VERSION
from ..devices import resolve_device
from ..errors import Cancelled, UserError
from ..lora_format import WHOLE_GROUP, WHOLE_GROUP_MEMBERS, lora_tensors, shared_alpha
from ..metadata import ADAPTER_METADATA_KEY, adapter_config
from ..options import BUDGET_OBJECTIVES, FORMATS, SAVE_DTYPES
from ..planning import Unit
from ..rank import captured_energy, rank_for_energy
from ..report import Report, record_for
from ..svd import release_scratch
from ..writing import SAVE_DTYPES as TORCH_DTYPES
from ..writing import check_output_path, tensors_file_size, write_all
from .merge import merge_terms
from .merge_inputs import (
    FAMILIES,
    LoraInput,
    MergeInput,
    ModuleGroup,
    diffusers_path_as_ldm,
    dotted_path,
    family_title,
    flux_layout,
    group_modules,
    parse_merge_input,
)

# Names of kohya-style families: prefix per sub-model + the underscored path.
KOHYA_PREFIXES = {
    "sd15": {"unet": "lora_unet_", "te": "lora_te_"},
    "sdxl": {"unet": "lora_unet_", "te": "lora_te1_", "te2": "lora_te2_"},
}
DEFAULT_KOHYA_PREFIXES = {"unet": "lora_unet_", "te": "lora_te_", "te2": "lora_te2_"}
KOHYA_NAMED = ("sd15", "sdxl", "flux", "flux2", "chroma")
# A module of a dotted-name family that no input spells with dots: ComfyUI and Forge map
# ``lora_unet_<path with _>`` onto every diffusion-model weight; alpha = rank (scale 1).
COMFY_KOHYA = LoraStyle(".lora_down.weight", ".lora_up.weight", alpha="own")
Progress = Callable[[int, int, str], None]


@dataclass
class MergeOptions:
    """Every setting of one merge; the rank fields mean what they mean for an extraction."""

    inputs: list[MergeInput]
    out: Path
    rank: int = 0
    rank_thresh: float = 0.95
    rank_max: int = 64
    target_size: str = ""
    target_energy: float = 0.0
    budget_objective: str = "balanced"
    format: str = "auto"
    save_dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.inputs = [item if isinstance(item, MergeInput) else parse_merge_input(item) for item in self.inputs]
        self.out = Path(self.out)

    @property
    def has_budget(self) -> bool:
        return bool(str(self.target_size or "").strip()) or self.target_energy > 0

    def validate(self) -> None:
        if not self.inputs:
            raise UserError("--merge needs at least one LoRA file (one file resizes it).")
        if self.rank < 0:
            raise UserError(f"--rank must be 0 (automatic) or a positive rank, not {self.rank}.")
        if not 0.0 < self.rank_thresh <= 1.0:
            raise UserError(f"--rank-thresh must be in (0, 1], not {self.rank_thresh}.")
        if self.rank_max < 1:
            raise UserError(f"--rank-max must be at least 1, not {self.rank_max}.")
        if self.save_dtype not in SAVE_DTYPES:
            raise UserError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, not {self.save_dtype!r}.")
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}.")
        if self.budget_objective not in BUDGET_OBJECTIVES or self.budget_objective == "relative":
            raise UserError(
                f"--budget-objective for a merge must be balanced, energy or fraction (relative needs a base model), "
                f"not {self.budget_objective!r}."
            )
        if not 0.0 <= self.target_energy <= 1.0:
            raise UserError(f"--target-energy must be a fraction in (0, 1], e.g. 0.9, not {self.target_energy}.")
        if str(self.target_size or "").strip():
            parse_size(self.target_size)
            if self.target_energy > 0:
                raise UserError("Choose one of --target-size and --target-energy, not both.")
        if self.has_budget and self.rank > 0:
            raise UserError(
                f"--target-size/--target-energy choose every module's rank itself, so they cannot go with --rank {self.rank}; "
                "drop one of the two (--rank-max still caps each module)."
            )
        if self.out.suffix.lower() != ".safetensors":
            raise UserError(f"The output {self.out.name} must end in .safetensors.")
        for item in self.inputs:
            if item.path.resolve() == self.out.resolve():
                raise UserError(f"The output {self.out} is also an input; choose another output name.")


@dataclass
class MergeResult:
    outputs: list[Path]
    architecture: str
    report: Report
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Merged:
    """One module's merged spectrum (or summed full tensor), waiting for its rank."""

    group: ModuleGroup
    name: str
    style: LoraStyle
    shape: tuple[int, ...]
    spectrum: object | None = None  # merge.Spectrum
    full: torch.Tensor | None = None  # a 1-D weight delta (norms), written whole
    bias: torch.Tensor | None = None  # summed .diff_b


def merge_loras(
    opts: MergeOptions,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge (or, with one input, resize) LoRAs as ``opts`` says; see the module docstring."""
    log = log or (lambda message: print(message, file=sys.stderr))
    opts.validate()
    check_output_path(opts.out, opts.overwrite)
    device = resolve_device(opts.device)
    with contextlib.ExitStack() as stack:
        stack.callback(release_scratch)  # a WebUI/ComfyUI worker thread outlives the run
        inputs = []
        for item in opts.inputs:
            lora = LoraInput(item)
            stack.callback(lora.file.close)
            inputs.append(lora)
        family = _one_family(inputs)
        arch_cls = FAMILIES[family]
        fmt = _resolve_format(arch_cls, opts.format)
        dtype = _save_dtype(opts.save_dtype, inputs)
        groups = group_modules(inputs)
        if flux_layout(inputs, groups) == "diffusers" and fmt != "diffusers":
            # kohya Flux names are BFL's fused modules: diffusers-layout modules keep their layout
            if opts.format not in ("auto", "neo", ""):
                raise UserError(
                    f"These Flux LoRAs use the diffusers layout (q/k/v apart), which --format {opts.format} cannot "
                    "name; use --format diffusers (or auto)."
                )
            fmt = "diffusers"
        what = "Resize" if len(inputs) == 1 else "Merge"
        log(f"{what} of {len(inputs)} {family_title(family)} LoRA(s), {len(groups)} modules, format {fmt}.")
        report = Report(
            architecture=arch_cls.title,
            description=_description(inputs, opts),
            format=fmt,
            loads_in=arch_cls.format_loaders.get(fmt, ""),
        )
        generator = torch.Generator(device=device).manual_seed(0)
        merged: list[_Merged] = []
        for done, group in enumerate(groups):
            if should_stop is not None and should_stop():
                raise Cancelled()
            merged.append(_merge_group(group, inputs, family, fmt, opts, device, generator))
            if progress is not None:
                progress(done + 1, len(groups), merged[-1].name)
        tensors = _choose_ranks(merged, opts, family, fmt, dtype, report, inputs)
        if family == "sdxl":
            tensors = _complete_te2_attention(tensors, merged, opts, dtype, report)
        if not any(record.rank for record in report.layers) and not report.full_tensors:
            raise UserError("The merged LoRAs cancel out in every module (all-zero sum); nothing was written.")
        metadata = merge_metadata(arch_cls, fmt, opts, inputs, tensors)
        write_all([(opts.out, tensors, metadata)], opts.overwrite)
    for line in report.warnings:
        log("Warning: " + line)
    return MergeResult([opts.out], family, report, list(report.warnings))


def _one_family(inputs: list[LoraInput]) -> str:
    first = inputs[0]
    for lora in inputs[1:]:
        if lora.family != first.family:
            raise UserError(
                f"{lora.name} is a {family_title(lora.family)} LoRA but {first.name} is a {family_title(first.family)} "
                "LoRA; only LoRAs of one model family can be merged."
            )
    return first.family


def _resolve_format(arch_cls, fmt: str) -> str:
    if fmt == "neo":
        return arch_cls.neo_format or arch_cls.default_format
    if fmt in ("auto", "", None):
        return arch_cls.default_format
    if fmt not in arch_cls.formats:
        raise UserError(f"--format {fmt} is not a {arch_cls.title} format; use one of {', '.join(arch_cls.formats)}.")
    return fmt


def _save_dtype(name: str, inputs: list[LoraInput]) -> torch.dtype:
    """--save-dtype, or the inputs' own precision: fp32 when any input is fp32 (or they mix
    fp16 and bf16, which neither holds exactly), else their one half-precision type."""
    if name != "auto":
        return TORCH_DTYPES[name]
    dtypes = {dtype for lora in inputs for dtype in lora.dtypes if dtype.is_floating_point}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16):
        return next(iter(dtypes))
    return torch.float32


def _merge_group(group: ModuleGroup, inputs, family, fmt, opts, device, generator) -> _Merged:
    terms, bias, shape = [], None, None
    for index, module in group.members:
        lora = inputs[index]
        term, term_bias, term_shape = lora.terms(module)
        if shape is not None and term is not None and term_shape != shape:
            first = inputs[group.members[0][0]]
            raise UserError(
                f"Module {module.name} of {lora.name} changes a {_dims(term_shape)} weight, but {first.name} changes "
                f"a {_dims(shape)} one there; these LoRAs are for different models."
            )
        if term is not None:
            shape = term_shape
            terms.append(term)
        if term_bias is not None:
            bias = term_bias if bias is None else bias + term_bias
    name, style = output_name(group, family, fmt)
    item = _Merged(group, name, style, shape or (), bias=bias)
    if terms and len(shape) == 1:  # a norm's .diff: summed whole
        item.full = sum(t.dense * t.weight for t in terms)
    elif terms:
        for term in terms:
            for attr in ("up", "down", "dense"):
                value = getattr(term, attr)
                if value is not None:
                    setattr(term, attr, value.to(device))
        cap = opts.rank if opts.rank > 0 else opts.rank_max  # only the singular triplets a rank can use
        parts = [t for term in terms for t in (term.up, term.down, term.dense) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            names = ", ".join(inputs[index].name for index, _ in group.members)
            raise UserError(
                f"Module {group.spellings[0]} holds NaN or Inf (in {names}), so a file is damaged; nothing was written."
            )
        item.spectrum = merge_terms(terms, cap, generator)
    return item


def output_name(group: ModuleGroup, family: str, fmt: str) -> tuple[str, LoraStyle]:
    """The module's name in the output format, and the style its tensors take."""
    arch_cls = FAMILIES[family]
    style = arch_cls.formats[fmt]
    part, _, path = group.key.partition(":")
    if family in KOHYA_NAMED and style.down == ".lora_down.weight":
        if family == "sdxl" and part == "unet":
            # SDXL kohya files name the UNet by its sgm path: the spelling diffusers' SDXL
            # converter reads for every module (label_emb too) and A1111 maps without its
            # upsampler bug.
            path = diffusers_path_as_ldm(path) or path
        return KOHYA_PREFIXES.get(family, DEFAULT_KOHYA_PREFIXES).get(part, "lora_unet_") + path, style
    dotted = next((d for d in map(dotted_path, group.spellings) if d is not None), None)
    if dotted is None or part != "unet":
        return DEFAULT_KOHYA_PREFIXES.get(part, "lora_unet_") + path, COMFY_KOHYA
    prefix = "transformer." if fmt == "diffusers" else "diffusion_model."
    return prefix + dotted, style


def _choose_ranks(merged: list[_Merged], opts: MergeOptions, family, fmt, dtype, report: Report, inputs) -> dict:
    """Each module's rank (fixed, energy rule or budget), its tensors, and its report record."""
    low_rank = [item for item in merged if item.spectrum is not None and item.spectrum.total_energy > 0]
    for item in merged:
        if item.spectrum is not None and item.spectrum.total_energy <= 0:
            report.skip("no change (the inputs cancel out)", item.name)
    if opts.has_budget and low_rank:
        ranks, chosen = _budget_ranks(low_rank, opts, family, fmt, dtype, report, inputs)
    else:
        ranks, chosen = [_rule_rank(item, opts) for item in low_rank], None
    tensors: dict[str, torch.Tensor] = {}
    for item, rank in zip(low_rank, ranks):
        tensors.update(_module_tensors(item, rank, opts, dtype))
        spectrum = item.spectrum
        energy = captured_energy(spectrum.s, rank, spectrum.total_energy)
        s_min = float(spectrum.s[rank - 1]) if rank else 0.0
        report.add(
            record_for(
                item.name, item.group.key, merge_group_of(item.group), item.shape, rank, float(spectrum.s[0]), s_min, energy, 0.0
            )
        )
    if chosen is not None:
        allocation, size, target, at_cap = chosen
        report.budget = budget_summary(opts, list(report.layers), tensors, allocation, size, target)
        report.budget["at_cap"] = at_cap
    for item in merged:
        if item.full is not None:
            tensors[item.name + ".diff"] = item.full.to(dtype).contiguous()
            report.add(record_for(item.name, item.group.key, merge_group_of(item.group), item.shape, 0, 0.0, 0.0, 1.0, 0.0))
        if item.bias is not None:
            tensors[item.name + ".diff_b"] = item.bias.to(dtype).contiguous()
    return tensors


def _complete_te2_attention(tensors: dict, merged: list[_Merged], opts: MergeOptions, dtype, report: Report) -> dict:
    """A1111 applies an SDXL te2 attention LoRA only when q, k, v and out all exist for the
    layer (lora_format.WHOLE_GROUP): add a zero rank-1 member where the inputs left one out.
    The four are square (width x width), so a present member gives the missing one's shape."""
    present: dict[str, dict[str, _Merged]] = {}
    for item in merged:
        match = WHOLE_GROUP.match(item.name)
        if match and item.name + item.style.down in tensors:
            present.setdefault(match.group(1), {})[match.group(2)] = item
    filled = []
    for prefix, members in present.items():
        some = next(iter(members.values()))
        for member in WHOLE_GROUP_MEMBERS:
            if member not in members:
                name = f"{prefix}{member}_proj"
                unit = Unit((name,), name, some.shape)
                zeros = torch.zeros(some.shape[0], 1), torch.zeros(1, some.shape[1])
                tensors.update(lora_tensors(unit, some.style, *zeros, 1, dtype, shared_alpha(opts)))
                filled.append(name)
    if filled:
        report.warnings.append(
            f"The LoRA holds {len(filled)} zero text-encoder-2 attention module(s) ({', '.join(filled[:3])}"
            f"{', ...' if len(filled) > 3 else ''}): A1111 applies a layer's q/k/v/out only when all four exist."
        )
    return tensors


def _rule_rank(item: _Merged, opts: MergeOptions) -> int:
    spectrum = item.spectrum
    if opts.rank > 0:
        return max(1, min(opts.rank, len(spectrum.s)))
    cap = min(opts.rank_max, len(spectrum.s))
    return max(1, rank_for_energy(spectrum.s, spectrum.total_energy, opts.rank_thresh, cap))


def _module_tensors(item: _Merged, rank: int, opts: MergeOptions, dtype) -> dict[str, torch.Tensor]:
    up, down = item.spectrum.factors(rank)
    unit = Unit((item.group.key,), item.name, item.shape)
    return lora_tensors(unit, item.style, up.cpu(), down.cpu(), rank, dtype, shared_alpha(opts))


def _budget_ranks(low_rank: list[_Merged], opts: MergeOptions, family, fmt, dtype, report: Report, inputs):
    """Ranks that fill --target-size (or reach --target-energy), best value per byte first
    (budget.allocate, as an extraction's budget); the header's size is measured exactly."""
    element = torch.empty((), dtype=dtype).element_size()
    spectra = [
        Spectrum(
            item.name,
            [float(v) for v in item.spectrum.s[: opts.rank_max]],
            item.spectrum.total_energy,
            item.spectrum.total_energy,
            (item.shape[0] + _columns(item.shape)) * element,
        )
        for item in low_rank
    ]
    target = parse_size(opts.target_size) if str(opts.target_size or "").strip() else None

    def size_of(ranks: list[int]) -> int:
        meta = {}
        for item, rank in zip(low_rank, ranks):
            unit = Unit((item.group.key,), item.name, item.shape)
            up = torch.empty(item.shape[0], rank, device="meta")
            down = torch.empty(rank, _columns(item.shape), device="meta")
            meta.update(lora_tensors(unit, item.style, up, down, rank, dtype, shared_alpha(opts), "meta"))
        arch_cls = FAMILIES[family]
        return tensors_file_size(meta, merge_metadata(arch_cls, fmt, opts, inputs, meta))

    floors = allocate(spectra, opts.budget_objective, budget_bytes=smallest_bytes(spectra))
    floor_size = size_of(floors.ranks)
    if target is None:
        allocation = allocate(spectra, opts.budget_objective, energy_target=opts.target_energy)
    else:
        if target < floor_size:
            raise UserError(
                f"--target-size {format_size(target)} is too small: rank 1 on each of the {len(spectra)} merged modules "
                f"already takes {format_size(floor_size, round_up=True)} ({floor_size} bytes)."
            )
        fixed = floor_size - floors.bytes
        if target >= largest_bytes(spectra) + fixed:
            report.warnings.append(
                f"--target-size {format_size(target)} is more than every module at --rank-max {opts.rank_max} takes; "
                "every module keeps its cap (raise --rank-max for a larger LoRA)."
            )
        budget, allocation = target - fixed, floors
        for _ in range(6):  # the header grows a little with the ranks' digits
            try:
                tried = allocate(spectra, opts.budget_objective, budget_bytes=budget)
            except BudgetTooSmall:
                break
            size = size_of(tried.ranks)
            if size <= target:
                allocation = tried
                break
            budget -= size - target
    at_cap = sum(1 for rank, spectrum in zip(allocation.ranks, spectra) if rank >= len(spectrum.values))
    return allocation.ranks, (allocation, size_of(allocation.ranks), target, at_cap)


def _columns(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape[1:]:
        count *= size
    return count


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


# Block families, as module paths start (longest first): the report's levels.
BLOCK_HEADS = (
    "single_transformer_blocks",
    "transformer_blocks",
    "double_blocks",
    "single_blocks",
    "noise_refiner",
    "context_refiner",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "input_blocks",
    "output_blocks",
    "middle_block",
    "layers",
)


def merge_group_of(group: ModuleGroup) -> Group:
    """The report's level and type of a merged module, from its name alone (no base to ask):
    text encoders apart, then the block family (``down_blocks_1``, ``double_blocks``, ``layers``)."""
    part, _, path = group.key.partition(":")
    inner = re.sub(r"attentions_\d+_", "", path)  # an SD attention block holds its ff and proj_in too
    if re.search(r"attn|attention|to_[qkv]|qkv|to_out|(^|_)[qkv]_proj|out_proj", inner):
        kind = "Attn"
    elif re.search(r"(^|_)(ff|mlp|feed_forward|fc1|fc2|linear1|linear2|proj_mlp|img_mlp|txt_mlp)(_|$)", inner):
        kind = "FF"
    elif re.search(r"mod|adaLN|norm", inner):
        kind = "Mod"
    elif re.search(r"proj_in|proj_out", inner):
        kind = "Proj"
    else:
        kind = "Other"
    if part != "unet":
        return Group({"te": "text_encoder", "te2": "text_encoder_2"}.get(part, part), kind, auxiliary=True, order=80)
    for order, head in enumerate(BLOCK_HEADS):
        if path.startswith(head + "_"):
            number = re.match(r"_(\d+)_", path[len(head) :])
            sd_level = head.endswith(("down_blocks", "up_blocks", "input_blocks", "output_blocks")) and number
            return Group(f"{head} {number.group(1)}" if sd_level else head, kind, order=order)
    return Group("other", kind, auxiliary=True, order=90)


def merge_metadata(arch_cls, fmt: str, opts: MergeOptions, inputs: list[LoraInput], tensors: dict) -> dict[str, str]:
    """kohya ``ss_*``, ``modelspec.*`` and ours; a peft config where the format wants one."""
    style = arch_cls.formats[fmt]
    ranks = {
        name[: -len(down)]: int(t.shape[0])
        for name, t in tensors.items()
        for down in (style.down, COMFY_KOHYA.down)
        if name.endswith(down)
    }
    top = max(ranks.values()) if ranks else 0
    alpha = shared_alpha(opts) if style.alpha == "shared" else top
    sources = [[lora.name, lora.weight] for lora in inputs]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(top),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": arch_cls.base_model_version,
        "ss_output_name": opts.out.stem,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch_cls.modelspec_architecture,
        "modelspec.implementation": TOOL_NAME,
        "modelspec.title": opts.out.stem,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.description": _description(inputs, opts),
        "ckpt2lora_version": VERSION,
        "ckpt2lora_kind": "resize" if len(inputs) == 1 else "merge",
        "ckpt2lora_architecture": arch_cls.name,
        "ckpt2lora_format": fmt,
        "ckpt2lora_inputs": json.dumps(sources),
    }
    peft_ranks = {name: rank for name, rank in ranks.items() if not name.startswith("lora_")}
    if style.adapter_config and peft_ranks:
        metadata[ADAPTER_METADATA_KEY] = adapter_config(peft_ranks)
    return metadata


def _description(inputs: list[LoraInput], opts: MergeOptions) -> str:
    what = " + ".join(f"{lora.weight:g} x {lora.name}" for lora in inputs)
    if opts.rank:
        rank = f"rank {opts.rank}"
    elif str(opts.target_size or "").strip():
        rank = f"target size {opts.target_size}"
    else:
        rank = f"auto rank (energy {opts.rank_thresh}, max {opts.rank_max})"
    verb = "Resize of" if len(inputs) == 1 else "Merge of"
    return f"{verb} {what}; {rank}; made with {TOOL_NAME} {VERSION}."

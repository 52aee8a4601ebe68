"""The safetensors header of what we write: kohya ``ss_*``, ``modelspec.*`` and ours."""

from __future__ import annotations

import datetime
import json
from collections import Counter

from .architectures import Architecture
from .constants import TOOL_NAME, VERSION
from .options import ExtractOptions

# diffusers' header key for a peft adapter config, and the component it describes.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
COMPONENT = "transformer"
# Other components a DiT LoRA may address, each given its own config (diffusers reads the
# header per component prefix): Anima's text conditioner (AnimaLoraLoaderMixin).
OTHER_COMPONENTS = ("text_conditioner",)


def lora_metadata(
    arch: Architecture,
    opts: ExtractOptions,
    module_ranks: dict[str, int],
    title: str,
    fmt: str,
    alpha: int,
    kind: str = "main",
) -> dict[str, str]:
    """``alpha``: the file's alpha as lora_format.file_alpha decides it."""
    style = arch.formats[fmt]
    top_rank = max(module_ranks.values()) if module_ranks else 0
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(top_rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": arch.base_model_version,
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch.modelspec_architecture,
        "modelspec.implementation": TOOL_NAME,
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.description": _description(opts, kind),
    }
    metadata.update(tool_metadata(opts, arch, fmt, kind))
    if style.adapter_config and module_ranks:
        metadata[ADAPTER_METADATA_KEY] = adapter_config(module_ranks)
    return metadata


def adapter_config(module_ranks: dict[str, int]) -> str:
    """A peft LoraConfig for diffusers: every module's rank, and alpha = rank (scale 1).

    diffusers 0.36/0.37 otherwise give modules whose rank differs from the first one's
    the wrong scale (their alpha defaults to the first rank); with this header every
    diffusers version uses the ranks and alphas as they are. ComfyUI and Forge ignore it.
    """
    by_component: dict[str, dict[str, int]] = {}
    for module, rank in module_ranks.items():
        component, _, rest = module.partition(".")
        if component not in OTHER_COMPONENTS:
            component, rest = COMPONENT, _without_prefix(module)
        by_component.setdefault(component, {})[rest] = rank
    header = {}
    for component, ranks in by_component.items():
        common = Counter(ranks.values()).most_common(1)[0][0]
        patterns = _anchored(ranks)
        config = {
            "r": common,
            "lora_alpha": common,
            "rank_pattern": patterns,
            "alpha_pattern": patterns,
            "target_modules": sorted(ranks),
        }
        header.update({f"{component}.{key}": value for key, value in config.items()})
    return json.dumps(header, sort_keys=True)


def _anchored(ranks: dict[str, int]) -> dict[str, int]:
    """peft matches a pattern key as ``(.*\\.)?(key)$``, so Flux's top-level ``proj_out``
    would also give its rank to every ``single_transformer_blocks.N.proj_out``; such a key
    gets ``^`` (then only the module itself matches). Other keys stay as they were."""
    suffixes = {module.split(".", i)[-1] for module in ranks for i in range(1, module.count(".") + 1)}
    return {("^" + module if module in suffixes else module): rank for module, rank in ranks.items()}


def _without_prefix(module: str) -> str:
    for prefix in ("diffusion_model.", "transformer."):
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module


def tool_metadata(opts: ExtractOptions, arch: Architecture, fmt: str, kind: str) -> dict[str, str]:
    recorded = {
        "ckpt2lora_version": VERSION,
        "ckpt2lora_kind": kind,
        "ckpt2lora_architecture": arch.name,
        "ckpt2lora_format": fmt,
        "ckpt2lora_base": opts.base.name,
        "ckpt2lora_variant": opts.variant.name,
        "ckpt2lora_options": json.dumps(opts.as_metadata(), sort_keys=True),
    }
    if opts.variant2 is not None:
        recorded["ckpt2lora_variant2"] = opts.variant2.name
    if opts.expert:  # Wan 2.2 A14B: the LoRA applies to this expert only
        recorded["ckpt2lora_expert"] = f"{opts.expert}_noise"
    recorded.update(opts.extra_metadata)
    return recorded


def _description(opts: ExtractOptions, kind: str) -> str:
    source = f"{opts.variant.name} minus {opts.base.name}"
    if opts.variant2 is not None:
        mode = f"union (alpha {opts.alpha})" if opts.union else "common part"
        source = f"{mode} of {opts.variant.name} and {opts.variant2.name}, relative to {opts.base.name}"
    rank = f"rank {opts.rank}" if opts.rank else f"auto rank (energy {opts.rank_thresh}, max {opts.rank_max})"
    prefix = f"Detail residual (x{opts.detail_scale}) of " if kind == "detail" else ""
    expert = f"; for Wan 2.2's {opts.expert}-noise expert only" if opts.expert else ""
    return f"{prefix}{source}{expert}; {rank}; extracted with {TOOL_NAME} {VERSION}."

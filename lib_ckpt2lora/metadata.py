"""The safetensors header of what we write: kohya ``ss_*``, ``modelspec.*`` and ours."""

from __future__ import annotations

import datetime
import json

from .architectures import Architecture
from .constants import TOOL_NAME, VERSION
from .options import ExtractOptions


def lora_metadata(
    arch: Architecture, opts: ExtractOptions, ranks: list[int], title: str, fmt: str, kind: str = "main"
) -> dict[str, str]:
    top_rank = max(ranks) if ranks else 0
    # kohya-style files give every module alpha = the rank cap (see extract.lora_alpha);
    # peft-style files have no alpha, which loaders read as alpha = rank.
    alpha = (opts.rank if opts.rank > 0 else opts.rank_max) if arch.formats[fmt].writes_alpha else top_rank
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
    return metadata


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
    recorded.update(opts.extra_metadata)
    return recorded


def _description(opts: ExtractOptions, kind: str) -> str:
    source = f"{opts.variant.name} minus {opts.base.name}"
    if opts.variant2 is not None:
        mode = f"union (alpha {opts.alpha})" if opts.union else "common part"
        source = f"{mode} of {opts.variant.name} and {opts.variant2.name}, relative to {opts.base.name}"
    rank = f"rank {opts.rank}" if opts.rank else f"auto rank (energy {opts.rank_thresh}, max {opts.rank_max})"
    prefix = f"Detail residual (x{opts.detail_scale}) of " if kind == "detail" else ""
    return f"{prefix}{source}; {rank}; extracted with {TOOL_NAME} {VERSION}."

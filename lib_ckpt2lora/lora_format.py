"""The LoRA format: module names, the alpha policy and its fold, tensor layouts, metadata.

The architecture says which names and which style (kohya or peft suffixes, shared or own
alpha) a format uses; this module turns a layer's factors into that file's tensors and
header, for the main LoRA, a detail LoRA and a checkpoint's detail LoRA alike.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .metadata import lora_metadata
from .options import ExtractOptions
from .planning import Plan, Unit
from .svd import Factorization
from .writing import tensor_info


def shared_alpha(opts: ExtractOptions) -> int:
    """The alpha of a "shared"-alpha style: the rank cap, the same on every module.

    Loaders scale a module by alpha / rank. diffusers reads kohya alphas through a key
    spelling that misses attention modules and falls back to the most common alpha, so
    per-module alphas (alpha = own rank) load wrongly there; one shared alpha, with
    rank / alpha folded into the factors, loads exactly in every loader."""
    return opts.rank if opts.rank > 0 else opts.rank_max


def file_alpha(style, opts: ExtractOptions, module_ranks: dict[str, int]) -> int:
    """The alpha a file's ``ss_network_alpha`` names: the shared alpha, or (own/none styles,
    which scale each module by 1) the largest rank."""
    if style.alpha == "shared":
        return shared_alpha(opts)
    return max(module_ranks.values()) if module_ranks else 0


def unit_tensors(
    plan: Plan, opts: ExtractOptions, unit: Unit, factors: Factorization, scale: float = 1.0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """A unit's LoRA tensors from its (joined) factors; ``scale`` multiplies up (--detail-scale).

    ``device="meta"`` gives the tensors' names, shapes and dtypes only (sizing a file)."""
    style = plan.arch.formats[plan.fmt]
    up = factors.up * scale if scale != 1.0 else factors.up
    return lora_tensors(unit, style, up, factors.down, factors.rank, plan.save_dtype, shared_alpha(opts), device)


def lora_tensors(
    unit: Unit, style, up: torch.Tensor, down: torch.Tensor, rank: int, dtype, alpha: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Factors in the layer's own layout: conv kernels as LoCon (down k x k, up 1 x 1)."""
    if style.alpha == "shared" and rank != alpha:
        fold = (rank / alpha) ** 0.5  # up @ down * alpha / rank == the delta
        up, down = up.float() * fold, down.float() * fold
    if len(unit.shape) > 2:
        down = down.reshape(rank, *unit.shape[1:])
        up = up.reshape(unit.shape[0], rank, *([1] * (len(unit.shape) - 2)))
    tensors = {
        unit.module + style.down: down.to(device, dtype).contiguous(),
        unit.module + style.up: up.to(device, dtype).contiguous(),
    }
    if style.writes_alpha:
        value = alpha if style.alpha == "shared" else rank
        tensors[unit.module + ".alpha"] = torch.tensor(float(value), dtype=dtype)
    return tensors


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
        filled.update(lora_tensors(Unit((key,), module, shape), style, up, down, 1, plan.save_dtype, shared_alpha(opts)))
        names.append(module)
    if names:
        plan.report.warnings.append(
            f"The {what} holds {len(names)} zero text-encoder-2 attention module(s) ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}): A1111 applies a layer's q/k/v/out only when all four exist, "
            "and these had no change, NaN, were filtered out or were not in the variant."
        )
    return filled


def lora_file_metadata(plan: Plan, opts: ExtractOptions, tensors: dict, path: Path, kind: str) -> dict[str, str]:
    """A LoRA file's metadata, with every module's rank read off its down factor."""
    down = plan.arch.formats[plan.fmt].down
    ranks = {name[: -len(down)]: tensor_info(tensors, name)[1][0] for name in tensors if name.endswith(down)}
    style = plan.arch.formats[plan.fmt]
    return lora_metadata(plan.arch, opts, ranks, path.stem, plan.fmt, file_alpha(style, opts, ranks), kind=kind)

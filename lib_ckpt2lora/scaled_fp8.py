"""ComfyUI's "scaled fp8" checkpoints: fp8 weights that must be multiplied by a scale.

Such a file holds a marker tensor ``<prefix>scaled_fp8`` (its dtype is the fp8 kind) and,
beside each quantized ``<module>.weight``, a per-tensor float32 scalar
``<module>.scale_weight`` (and, in some, ``<module>.scale_input`` for fp8 matmuls). The real
weight is the stored value times its scale: ComfyUI's ``comfy/ops.py scaled_fp8_ops``
computes ``weight * scale_weight`` in its forward pass and ``convert_weight``, and stores
``weight / scale_weight`` in ``set_weight``. Reading the fp8 values raw gives weights off
by that factor, hence a wrong delta. The scale keys are parameters of the layer, not
layers: they get no canonical key and no LoRA module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import UserError

if TYPE_CHECKING:  # reading.py imports this module
    from .reading import TensorInfo

MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def is_scaled_fp8(infos: dict[str, TensorInfo]) -> bool:
    return any(key == MARKER or key.endswith("." + MARKER) for key in infos)


def take_scales(infos: dict[str, TensorInfo]) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Remove the marker and the scale tensors from ``infos`` (they are not layers, and
    no architecture should see them); return each scaled weight's raw key -> its
    ``scale_weight`` key, and the infos removed (both {} and ``infos`` untouched for
    other files).

    Scales apply where the file has the marker (ComfyUI then scales every such Linear),
    or where the weight itself is fp8 (a file that lost its marker still stores scaled
    values)."""
    marked = is_scaled_fp8(infos)
    scales, removed = {}, {}
    for key in [k for k in infos if k.endswith(SCALE_SUFFIXES)]:
        weight = key.rsplit(".", 1)[0] + ".weight"
        info = infos.get(weight)
        if info is None or not (marked or str(info.dtype).startswith("torch.float8")):
            continue
        if key.endswith(".scale_weight"):
            scales[weight] = key
        removed[key] = infos.pop(key)
    if marked:
        for key in [k for k in infos if k == MARKER or k.endswith("." + MARKER)]:
            removed[key] = infos.pop(key)
    return scales, removed


def dequantize(stored: torch.Tensor, scale: torch.Tensor, key: str, path) -> torch.Tensor:
    """The real weight in float32: stored fp8 values times their per-tensor scale."""
    if scale.numel() != 1:
        raise UserError(
            f"{path} stores {key} with a scale of shape {list(scale.shape)}, not one number; "
            "this scaled-fp8 layout is not supported: use the bf16/fp16 release of the model."
        )
    return stored.float() * scale.float().reshape(())

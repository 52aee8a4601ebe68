"""ComfyUI's fp8 checkpoints: fp8 weights that must be multiplied by a per-tensor scale.

Two layouts exist, and ComfyUI reads both (it converts the old one into the new one in
``comfy/utils.py convert_old_quants``):

- The old "scaled fp8": a marker tensor ``<prefix>scaled_fp8`` (its dtype is the fp8 kind)
  and, beside each quantized ``<module>.weight``, a per-tensor float32 scalar
  ``<module>.scale_weight`` (and, in some, ``<module>.scale_input`` for fp8 matmuls).
  ComfyUI's ``comfy/ops.py scaled_fp8_ops`` computed ``weight * scale_weight``.
- The new mixed-precision layout (ComfyUI ``QUANTIZATION.md``; ``comfy/ops.py``
  ``MixedPrecisionOps`` / ``_load_quantized_module``; ``comfy/quant_ops.py QUANT_ALGOS``),
  used by the fp8 releases of Flux.2, Z-Image, Wan, Qwen-Image: per quantized layer
  ``<layer>.weight`` stored in float8 as W / scale, ``<layer>.weight_scale`` (a float32
  scalar), optionally ``<layer>.input_scale``, and the layer's format as
  ``<layer>.comfy_quant`` (uint8 bytes of JSON such as ``{"format": "float8_e4m3fn"}``)
  and/or in the header's ``_quantization_metadata`` entry
  (``{"format_version": "1.0", "layers": {layer: {"format": ...}}}``), which ComfyUI turns
  into the same per-layer markers. comfy-kitchen's ``TensorCoreFP8Layout.dequantize``
  (``comfy_kitchen/tensor/fp8.py``) gives ``weight`` (float) x ``weight_scale``.

The real weight is the stored value times its scale; reading the fp8 values raw gives
weights off by that factor, hence a wrong delta. The scales and markers are parameters of
the layer, not layers: they leave the file's key list, get no canonical key and no LoRA
module. Here the value is computed in float32 (the fp8 value is exact in it): ComfyUI
computes the same product, then rounds it to its compute dtype.

The other formats of ``QUANT_ALGOS`` (nvfp4, mxfp8, int8, ConvRot, AWQ, ...) pack values
and block scales in ways this tool does not reproduce; a file using one is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .errors import UserError

if TYPE_CHECKING:  # reading.py imports this module
    from .reading import TensorInfo

MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
# the new layout's per-layer tensors (QUANT_ALGOS "parameters", and the format marker)
QUANT_MARKER = ".comfy_quant"
QUANT_PARAMETERS = (".weight_scale", ".input_scale", ".weight_scale_2", ".pre_quant_scale")
QUANT_METADATA = "_quantization_metadata"
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")  # per-tensor scaled: read exactly


def is_scaled_fp8(infos: dict[str, TensorInfo]) -> bool:
    return any(key == MARKER or key.endswith("." + MARKER) for key in infos)


def is_fp8(dtype: torch.dtype) -> bool:
    return str(dtype).startswith("torch.float8")


def take_scales(
    infos: dict[str, TensorInfo],
    metadata: dict[str, str] | None = None,
    read: Callable[[str], torch.Tensor] | None = None,
    path=None,
    role: str = "model",
) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Remove the markers and the scale tensors of both layouts from ``infos`` (they are
    not layers, and no architecture should see them); return each scaled weight's raw
    key -> its scale's key, and the infos removed (both {} and ``infos`` untouched for
    other files). ``read`` reads a tensor (the ``comfy_quant`` markers hold the format).
    A layer in a format that cannot be dequantized exactly raises UserError.

    Old layout: scales apply where the file has the marker (ComfyUI then scales every such
    Linear), or where the weight itself is fp8 (a file that lost its marker still stores
    scaled values)."""
    marked = is_scaled_fp8(infos)
    scales, removed = {}, {}
    for key in [k for k in infos if k.endswith(SCALE_SUFFIXES)]:
        weight = key.rsplit(".", 1)[0] + ".weight"
        info = infos.get(weight)
        if info is None or not (marked or is_fp8(info.dtype)):
            continue
        if key.endswith(".scale_weight"):
            if infos[key].numel != 1:  # refused here, before any work, rather than at its read
                kind = str(info.dtype).replace("torch.", "") if is_fp8(info.dtype) else "float8_e4m3fn"
                raise UserError(_refusal(path, role, weight[: -len(".weight")], kind, info, infos[key]))
            scales[weight] = key
        removed[key] = infos.pop(key)
    if marked:
        for key in [k for k in infos if k == MARKER or k.endswith("." + MARKER)]:
            removed[key] = infos.pop(key)
    new_scales, new_removed = _take_quantized_layers(infos, metadata or {}, read, path, role)
    scales.update(new_scales)
    removed.update(new_removed)
    return scales, removed


def _take_quantized_layers(infos, metadata, read, path, role) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The new layout: every layer with a ``comfy_quant`` marker or a ``weight_scale``, in file order."""
    layers: dict[str, None] = {}
    for key in infos:
        for suffix in (QUANT_MARKER, ".weight_scale"):
            if key.endswith(suffix):
                layers.setdefault(key[: -len(suffix)])
    if not layers:
        return {}, {}
    listed = _metadata_layers(metadata, path, role)
    scales, removed = {}, {}
    for layer in layers:
        weight, scale = layer + ".weight", layer + ".weight_scale"
        info = infos.get(weight)
        if info is not None:
            fmt = _layer_format(layer, infos, listed, read)
            if fmt is not None:  # quantized: only a per-tensor fp8 scale is read exactly
                if not (fmt in FP8_FORMATS and is_fp8(info.dtype) and scale in infos and infos[scale].numel == 1):
                    raise UserError(_refusal(path, role, layer, fmt, info, infos.get(scale)))
                scales[weight] = scale
            # else: a scale beside a 16/32-bit weight and no format; ComfyUI loads the weight as is
        for suffix in (*QUANT_PARAMETERS, QUANT_MARKER):
            if layer + suffix in infos:
                removed[layer + suffix] = infos.pop(layer + suffix)
    return scales, removed


UNREADABLE, UNNAMED = "?unreadable", "?unnamed"  # no format to name: the refusal says what it saw


def _layer_format(layer: str, infos, listed: dict[str, object], read) -> str | None:
    """The layer's format: the header's entry (ComfyUI lets it win over the tensor), its
    ``comfy_quant`` tensor, or, with neither (a file that lost them), what the weight's
    dtype says; None for a 16/32-bit float weight with no format given."""
    conf = _listed_conf(listed, layer)
    if conf is None and layer + QUANT_MARKER in infos:
        conf = _decode(read(layer + QUANT_MARKER)) if read is not None else None
        if conf is None:
            return UNREADABLE
    if conf is not None:
        fmt = conf.get("format") if isinstance(conf, dict) else None
        return fmt if isinstance(fmt, str) and fmt else UNREADABLE
    dtype = infos[layer + ".weight"].dtype
    if is_fp8(dtype):
        return str(dtype).replace("torch.", "")
    return None if dtype.is_floating_point else UNNAMED


def _metadata_layers(metadata: dict[str, str], path, role) -> dict[str, object]:
    text = metadata.get(QUANT_METADATA)
    if not text:
        return {}
    try:
        layers = json.loads(text).get("layers")
    except (ValueError, AttributeError, RecursionError):
        layers = None
    if not isinstance(layers, dict):
        raise UserError(
            f"The {role} file {path} has a damaged {QUANT_METADATA} header entry (not ComfyUI's "
            f"JSON with a layers table); use the model's bf16/fp16 release as the {role}."
        )
    return layers


def _listed_conf(listed: dict[str, object], layer: str):
    """The header's entry for ``layer``: under its full name, or under the name without
    the file's prefix (``convert_old_quants`` runs on keys with or without it)."""
    parts = layer.split(".")
    for start in range(len(parts)):
        conf = listed.get(".".join(parts[start:]))
        if conf is not None:
            return {"format": conf} if isinstance(conf, str) else conf
    return None


def _decode(marker: torch.Tensor):
    """A ``comfy_quant`` tensor's JSON (ComfyUI: ``json.loads(t.numpy().tobytes())``)."""
    try:
        return json.loads(bytes(marker.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, RuntimeError):
        return None


def _refusal(path, role: str, layer: str, fmt: str, info: TensorInfo, scale: TensorInfo | None) -> str:
    stored = str(info.dtype).replace("torch.", "")
    if fmt == UNREADABLE:
        what = "with a comfy_quant format marker that is not ComfyUI's JSON"
    elif fmt == UNNAMED:
        what = f"as {stored} with a weight_scale but no format marker"
    elif fmt in FP8_FORMATS and not is_fp8(info.dtype):
        what = f"as {fmt} but stored in {stored}"
    elif fmt in FP8_FORMATS:
        shape = "no weight_scale" if scale is None else f"a scale of shape {list(scale.shape)}"
        what = f"as {fmt} with {shape}, not one scale per tensor"
    else:
        what = f"in ComfyUI's {fmt} quantized format"
    return (
        f"The {role} file {path} stores {layer} {what}, which this tool cannot read exactly; "
        f"use the model's bf16/fp16 (or per-tensor fp8) release as the {role}."
    )


def dequantize(stored: torch.Tensor, scale: torch.Tensor, key: str, path) -> torch.Tensor:
    """The real weight in float32: stored fp8 values times their per-tensor scale."""
    if scale.numel() != 1:
        raise UserError(
            f"{path} stores {key} with a scale of shape {list(scale.shape)}, not one number; "
            "this scaled-fp8 layout is not supported: use the bf16/fp16 release of the model."
        )
    return stored.float() * scale.float().reshape(())


def describe(file) -> str:
    """The detection line's note on a file (a TensorFile) whose weights are read dequantized ('' for others)."""
    scales = file.fp8_scales
    if not scales:
        return ""
    kinds = sorted({str(file.infos[key].dtype).replace("torch.", "") for key in scales})
    return f"; fp8 ({', '.join(kinds)}) with per-tensor scales: {len(scales)} weights read dequantized"


def rounding_warning(files) -> str | None:
    """The report's warning when a delta is taken between full models one of which is fp8
    (TensorFiles): its rounding, up to 1/16 of each weight for e4m3fn, is full-rank noise in
    every delta, about 2.6x a 1% fine-tune's change on tests/test_comfy_quant.py's realistic
    pair, where a rank-64 LoRA then keeps 26-29% of the delta's energy (90% from a bf16 base)."""
    names = [file.path.name for file in files if getattr(file, "fp8_scales", None)]
    if not names:
        return None
    return (
        f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} stored in fp8, whose rounding (a few percent of "
        "every weight) is part of each delta and often larger than a fine-tune's own change, so the LoRA spends "
        "rank on it and its energies read low; extract from the bf16/fp16 files where you have them."
    )

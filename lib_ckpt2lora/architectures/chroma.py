"""Chroma (lodestones' Chroma1 / Chroma1-HD): Flux.1-schnell's blocks without per-block
modulation; one ``distilled_guidance_layer`` approximator computes every modulation.

Layouts, canonical keys and formats are Flux.1's (flux.py): BFL names (``double_blocks``,
``single_blocks.N.linear1``, ``distilled_guidance_layer.layers.N.in_layer``, norms' ``.scale``)
or diffusers' (``ChromaTransformer2DModel``: ``...layers.N.linear_1``, ``norms.N.weight``),
bare or under ``model.diffusion_model.`` / ``diffusion_model.`` / ``transformer.``.

Evidence for the formats (issue 13): ``kohya`` (default, ``--format neo``) fuses qkv and
linear1 as Flux does, for ComfyUI and every Forge Neo era (one patch per weight). diffusers
0.42.1's ``ChromaPipeline`` uses ``FluxLoraLoaderMixin``, whose kohya converter knows no
``distilled_guidance_layer`` key and raises "Incompatible keys", so diffusers users take
``--format diffusers`` (peft names of ``ChromaTransformer2DModel``, loaded as is: proven
on a tiny real model in tests/test_loaders_dit.py).
"""

from __future__ import annotations

import re

from .base import Group
from .flux import Flux

TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
APPROXIMATOR = (("in_layer", "linear_1"), ("out_layer", "linear_2"))


class Chroma(Flux):
    name = "chroma"
    title = "Chroma"
    base_model_version = "chroma"
    modelspec_architecture = "chroma/lora"
    format_loaders = {
        "kohya": "fused qkv/linear1 modules, exact: ComfyUI, every Forge Neo era; not diffusers "
        "(its converter rejects the approximator's keys: use --format diffusers there)",
        "diffusers": "q/k/v split: diffusers, ComfyUI; a Forge Neo build keeping one patch per weight "
        "loses q and k (use the default format there)",
    }
    top = TOP
    markers_bfl = ("double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight")
    markers_diffusers = ("distilled_guidance_layer.in_proj.weight", "single_transformer_blocks.0.proj_mlp.weight")

    @classmethod
    def kind_of(cls, channels):
        return "" if channels == 64 else f" ({channels} input channels)"

    def to_diffusers(self, module):
        match = re.fullmatch(r"distilled_guidance_layer\.(layers|norms)\.(\d+)(?:\.(\w+))?", module)
        if match:
            kind, index, name = match.groups()
            if kind == "norms":
                return module if name is None else None
            renamed = dict(APPROXIMATOR).get(name)
            return None if renamed is None else f"distilled_guidance_layer.layers.{index}.{renamed}"
        return super().to_diffusers(module)

    def to_bfl(self, module):
        match = re.fullmatch(r"distilled_guidance_layer\.(layers|norms)\.(\d+)(?:\.(\w+))?", module)
        if match:
            kind, index, name = match.groups()
            if kind == "norms":
                return module, None
            original = {new: old for old, new in APPROXIMATOR}.get(name)
            return None if original is None else (f"distilled_guidance_layer.layers.{index}.{original}", None)
        return super().to_bfl(module)

    def group(self, canonical_key):
        if canonical_key.startswith("distilled_guidance_layer."):
            return Group("approximator", "Mod", auxiliary=True, order=90)
        return super().group(canonical_key)

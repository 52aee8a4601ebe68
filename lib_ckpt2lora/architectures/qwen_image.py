"""Qwen-Image (and Qwen-Image-Edit): the 20B MMDiT transformer, 60 dual-stream blocks.

Layout: ComfyUI's ``comfy/ldm/qwen_image/model.py`` names its modules exactly as diffusers'
``QwenImageTransformer2DModel`` does (``transformer_blocks.N.img_mod.1``, ``attn.to_q``,
``attn.add_q_proj``, ``img_mlp.net.0.proj``, ``norm_out.linear``, ``proj_out``), so there is
one layout, bare (diffusers' shards), under ``model.diffusion_model.`` / ``diffusion_model.``
(ComfyUI files) or ``transformer.``. No weight is fused: q, k and v are separate modules.

The text encoder (Qwen2.5-VL 7B) and the VAE of all-in-one files are skipped: they are
distributed separately and rarely fine-tuned (said in the detection line).

Formats, and their evidence (issue 13):

- ``diffusion_model`` (default, also ``--format neo``): ``diffusion_model.<name>`` with
  lora_A/lora_B and alpha = the module's rank. ComfyUI maps ``diffusion_model.<key>`` onto
  every weight of every model (and Forge Neo's loader is ComfyUI's); with nothing fused,
  each weight gets one module, so every Neo era applies it whole. diffusers 0.42.1's
  ``QwenImageLoraLoaderMixin.lora_state_dict`` sees the prefix/alphas, runs
  ``_convert_non_diffusers_qwen_lora_to_diffusers`` (strips the prefix, folds alpha/rank)
  and loads it: tiny real model and full-size key list in tests/test_lumina2_qwen.py.
- ``diffusers``: ``transformer.<name>`` lora_A/lora_B with a peft config, loaded as is by
  ``QwenImagePipeline``; ComfyUI also maps ``transformer.<key>`` for Qwen-Image.
"""

from __future__ import annotations

from .base import (
    DIT_PREFIXES,
    Architecture,
    Group,
    LoraStyle,
    RawRef,
    block_level_group,
    count_blocks,
    diffusion_key,
    skipped_parts,
    strip_weight_suffix,
)

MARKERS = ("transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.attn.add_q_proj.weight", "txt_norm.weight")
BLOCKS_PER_LEVEL = 10


class QwenImage(Architecture):
    name = "qwen_image"
    title = "Qwen-Image"
    base_model_version = "qwen_image"
    modelspec_architecture = "qwen-image/lora"
    formats = {
        "diffusion_model": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="own"),
        "diffusers": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none", adapter_config=True),
    }
    default_format = "diffusion_model"
    neo_format = "diffusion_model"
    format_loaders = {
        "diffusion_model": "nothing fused, exact: ComfyUI, every Forge Neo era, diffusers 0.42 (converted)",
        "diffusers": "diffusers 0.42 (QwenImagePipeline), ComfyUI",
    }

    def __init__(self, prefix: str):
        self.prefix = prefix

    @classmethod
    def detect(cls, infos):
        for prefix in DIT_PREFIXES:
            if all(prefix + marker in infos for marker in MARKERS):
                return cls(prefix)
        return None

    def describe(self, infos):
        blocks = count_blocks(infos, self.prefix + "transformer_blocks.")
        skipped = skipped_parts(self, infos, "text encoder Qwen2.5-VL/VAE")
        return f"{self.title}, {blocks} blocks{skipped}"

    def canonical(self, raw_key, info):
        key = diffusion_key(self.prefix, raw_key)
        if key is None:
            return []
        return [(key, RawRef(raw_key), info.shape)]

    def module_path(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        return module if param else None

    def format_prefix(self, fmt):
        return "transformer." if fmt == "diffusers" else "diffusion_model."

    def lora_aliases(self, canonical_key):
        module = self.module_path(canonical_key)
        return [] if module is None else sorted({"diffusion_model." + module, "transformer." + module, module})

    def group(self, canonical_key):
        parts = canonical_key.split(".")
        kind = _type(canonical_key)
        if parts[0] == "transformer_blocks":
            return block_level_group(int(parts[1]), kind, BLOCKS_PER_LEVEL)
        return Group(parts[0], kind, auxiliary=True, order=100)


def _type(key: str) -> str:
    if ".attn." in key:
        return "Attn"
    if "_mlp." in key or key.startswith("time_text_embed."):
        return "FF"
    if "_mod." in key or key.startswith("norm_out."):
        return "Mod"
    if key.startswith(("img_in", "txt_in", "proj_out")):
        return "Proj"
    return "Other"

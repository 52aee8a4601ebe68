"""Lumina-Image-2.0 (and its fine-tunes, e.g. Neta-Lumina): the 2.6B NextDiT, Z-Image's
cousin, in either layout.

Layouts read: the original (Alpha-VLLM / ComfyUI ``comfy/ldm/lumina/model.py``: fused
``attention.qkv``, ``feed_forward.w1/w2/w3``, ``attention_norm1``, ``cap_embedder``,
``final_layer``), bare or under ``model.diffusion_model.`` / ``diffusion_model.``, and
diffusers' ``Lumina2Transformer2DModel`` (``attn.to_q``, ``feed_forward.linear_1``,
``time_caption_embed``, ``norm_out``), bare or under ``transformer.``. The two may be mixed.

Shared with Z-Image: the original layout's key names (ComfyUI runs both with one model
class and tells them apart by width, 2304 vs 3840). Lumina 2 differs in grouped-query
attention: qkv = q (hidden rows) | k | v (kv_heads x head_dim rows each), so it is split
by the rows its own shape implies, not in thirds; detection tells them apart by that shape.

Canonical keys are the diffusers names (qkv split by rows). Formats, and their evidence:

- ``comfy`` (default, also ``--format neo``): ``diffusion_model.<original name>`` with
  lora_A/lora_B and no alpha (scale 1, factors carry the scale). ONE module per fused
  ``attention.qkv``, block-diagonal (block_lora.py), so every loader that patches that
  weight as a whole (ComfyUI's ``diffusion_model.<key>`` map, every Forge Neo era, one
  patch per weight) applies q, k and v exactly. diffusers 0.42.1 converts this format
  (``_convert_non_diffusers_lumina2_lora_to_diffusers``): down copied to to_q/to_k/to_v,
  up split by rows (exact for a block-diagonal module), but it hard-codes the full-size
  split 2304/768/768, wants no alpha keys, and raises on any module outside the blocks
  (x_embedder, t_embedder, cap_embedder, final_layer): proven on the full-size key list
  (tests/test_lumina2_qwen.py); diffusers users take ``--format diffusers``.
- ``diffusers``: ``transformer.<diffusers name>`` lora_A/lora_B with a peft config, q/k/v
  split: loaded as is by ``Lumina2Pipeline.load_lora_weights`` with every module injected
  (tiny real model, tests/test_lumina2_qwen.py). ComfyUI's Lumina2 key map
  (``z_image_to_diffusers``) uses Z-Image's diffusers names, not these, so ComfyUI and Neo
  get ``comfy``.
"""

from __future__ import annotations

import re

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

BLOCK_KINDS = ("noise_refiner", "context_refiner", "layers")
# original module inside a block -> diffusers module (norm1 differs in context_refiner)
BLOCK = {
    "attention.out": "attn.to_out.0",
    "attention.q_norm": "attn.norm_q",
    "attention.k_norm": "attn.norm_k",
    "feed_forward.w1": "feed_forward.linear_1",
    "feed_forward.w2": "feed_forward.linear_2",
    "feed_forward.w3": "feed_forward.linear_3",
    "attention_norm1": "norm1.norm",
    "attention_norm2": "norm2",
    "ffn_norm1": "ffn_norm1",
    "ffn_norm2": "ffn_norm2",
    "adaLN_modulation.1": "norm1.linear",
}
QKV_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v")
TOP = {
    "x_embedder": "x_embedder",
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder.0": "time_caption_embed.caption_embedder.0",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",
    "final_layer.linear": "norm_out.linear_2",
}
TOP_INVERSE = {new: old for old, new in TOP.items()}
BLOCKS_PER_LEVEL = 6


def _block_inverse(kind: str) -> dict[str, str]:
    table = {new: old for old, new in BLOCK.items()}
    if kind == "context_refiner":  # no modulation: its first norm is plain norm1
        del table["norm1.norm"]
        table["norm1"] = "attention_norm1"
    return table


class Lumina2(Architecture):
    name = "lumina2"
    title = "Lumina-Image-2.0"
    base_model_version = "lumina2"
    modelspec_architecture = "lumina-2/lora"
    formats = {
        "comfy": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none"),
        "diffusers": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none", adapter_config=True),
    }
    default_format = "comfy"
    neo_format = "comfy"
    format_loaders = {
        "comfy": "one fused block-diagonal q|k|v module per attention, exact: ComfyUI, every Forge Neo era; "
        "diffusers converts its blocks only at full size and rejects the embedders (use --format diffusers there)",
        "diffusers": "q/k/v split: diffusers 0.42 (Lumina2Pipeline); not ComfyUI/Forge Neo (use the default format there)",
    }

    def __init__(self, prefix: str, layout: str):
        self.prefix, self.layout = prefix, layout

    @classmethod
    def detect(cls, infos):
        for prefix in DIT_PREFIXES:
            qkv = infos.get(prefix + "layers.0.attention.qkv.weight")
            if prefix + "cap_embedder.1.weight" in infos and qkv is not None:
                # Z-Image shares these names but has as many kv heads as heads (qkv = 3 x hidden)
                if qkv.shape[0] != 3 * qkv.shape[1]:
                    return cls(prefix, "original layout")
            if prefix + "time_caption_embed.caption_embedder.1.weight" in infos and prefix + "layers.0.attn.to_q.weight" in infos:
                return cls(prefix, "diffusers layout")
        return None

    def describe(self, infos):
        blocks = count_blocks(infos, self.prefix + "layers.")
        skipped = skipped_parts(self, infos, "text encoder/VAE")
        return f"{self.title}, {self.layout}, {blocks} blocks{skipped}"

    # -- keys ----------------------------------------------------------------------------
    def canonical(self, raw_key, info):
        key = diffusion_key(self.prefix, raw_key)
        if key is None:
            return []
        if self.layout == "diffusers layout":
            return [(key, RawRef(raw_key), info.shape)]
        module, _, param = key.rpartition(".")
        match = re.fullmatch(r"(noise_refiner|context_refiner|layers)\.(\d+)\.(.+)", module)
        if match is None:
            target = TOP.get(module, module)
            return [(f"{target}.{param}" if param else key, RawRef(raw_key), info.shape)]
        kind, index, inner = match.groups()
        head = f"{kind}.{index}."
        if inner == "attention.qkv":
            rows_q = info.shape[1]  # q has the hidden width; k and v share the rest
            rows_kv = (info.shape[0] - rows_q) // 2
            out, start = [], 0
            for part, height in zip(QKV_PARTS, (rows_q, rows_kv, rows_kv)):
                out.append((f"{head}{part}.{param}", RawRef(raw_key, (start, start + height)), (height, *info.shape[1:])))
                start += height
            return out
        target = BLOCK.get(inner, inner)
        if kind == "context_refiner" and target == "norm1.norm":
            target = "norm1"
        return [(f"{head}{target}.{param}", RawRef(raw_key), info.shape)]

    def original_name(self, module: str) -> str:
        """A diffusers module in the original spelling (to_q/k/v -> the fused qkv)."""
        match = re.fullmatch(r"(noise_refiner|context_refiner|layers)\.(\d+)\.(.+)", module)
        if match is None:
            return TOP_INVERSE.get(module, module)
        kind, index, inner = match.groups()
        if inner in QKV_PARTS:
            return f"{kind}.{index}.attention.qkv"
        return f"{kind}.{index}." + _block_inverse(kind).get(inner, inner)

    def module_path(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        return module if param else None

    def lora_module(self, canonical_key, fmt):
        module, param = strip_weight_suffix(canonical_key)
        if not param:
            return None
        if fmt == "comfy":
            return "diffusion_model." + self.original_name(module)
        return "transformer." + module

    def fusion(self, canonical_key, fmt):
        module, param = strip_weight_suffix(canonical_key)
        if fmt != "comfy" or param != "weight" or not module.endswith(QKV_PARTS):
            return None
        if not module.endswith(".to_q"):
            return ()
        block = module[: -len("attn.to_q")]
        return tuple(f"{block}{part}.weight" for part in QKV_PARTS)

    def lora_aliases(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        if not param:
            return []
        names = {"transformer." + module, module}
        if not module.endswith(QKV_PARTS):
            original = self.original_name(module)
            names |= {"diffusion_model." + original, original}
        return sorted(names)

    def fused_aliases(self, canonical_keys):
        fused = {}
        for key in canonical_keys:
            if key.endswith(".attn.to_q.weight"):
                block = key[: -len("attn.to_q.weight")]
                parts = [f"{block}{part}.weight" for part in QKV_PARTS]
                original = self.original_name(key[: -len(".weight")])
                fused["diffusion_model." + original] = parts
                fused[original] = parts
        return fused

    # -- report --------------------------------------------------------------------------
    def group(self, canonical_key):
        parts = canonical_key.split(".")
        kind = _type(canonical_key)
        if parts[0] == "layers":
            return block_level_group(int(parts[1]), kind, BLOCKS_PER_LEVEL)
        if parts[0] in ("noise_refiner", "context_refiner"):
            return Group(parts[0], kind, auxiliary=True, order=90)
        return Group(parts[0], kind, auxiliary=True, order=100)


def _type(key: str) -> str:
    if ".attn." in key:
        return "Attn"
    if ".feed_forward." in key or key.startswith("time_caption_embed.timestep_embedder"):
        return "FF"
    if ".norm1.linear" in key or key.startswith("norm_out.linear_1"):
        return "Mod"
    if key.startswith(("x_embedder", "norm_out.linear_2", "time_caption_embed.caption_embedder")):
        return "Proj"
    return "Other"

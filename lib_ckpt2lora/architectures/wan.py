"""Wan 2.1 / 2.2 video DiTs (T2V and I2V 14B, TI2V 5B, T2V 1.3B), in every layout.

Layouts read (both may be mixed between base and variant):

- the original / ComfyUI layout (``comfy/ldm/wan/model.py``): ``blocks.N.self_attn.{q,k,v,o}``,
  ``blocks.N.cross_attn.{q,k,v,o}`` (+ ``k_img``/``v_img`` in Wan 2.1 I2V), ``blocks.N.ffn.0/2``,
  ``blocks.N.modulation`` [1,6,dim], ``text_embedding.0/2``, ``time_embedding.0/2``,
  ``time_projection.1``, ``head.head``, ``head.modulation`` [1,2,dim], ``patch_embedding``
  (a Conv3d, 5-D kernel [dim,in,1,2,2]) and Wan 2.1 I2V's CLIP projection ``img_emb.proj.*``;
  bare (Comfy-Org's repackaged files), under ``model.diffusion_model.`` (all-in-one files:
  the text encoder and VAE are skipped and said) or ``diffusion_model.``;
- diffusers' ``WanTransformer3DModel`` (``blocks.N.attn1.to_q``, ``attn2.add_k_proj``,
  ``ffn.net.0.proj``, ``condition_embedder.*``, ``proj_out``, ``scale_shift_table``), bare
  (its shards) or under ``transformer.``. The name table below is the inverse of diffusers'
  ``single_file_utils.convert_wan_transformer_to_diffusers`` (tests check it against it).

Canonical keys are the original names. Kinds (ComfyUI's ``model_detection.py`` reads the same
shapes): width 5120 = 14B, 3072 = 5B, 1536 = 1.3B; ``patch_embedding`` input channels 16 = T2V,
36 = I2V (Wan 2.1 I2V also has ``img_emb``, Wan 2.2 I2V does not), 48 = TI2V 5B. A kind pairs
only with itself: 5B against 14B, or T2V against I2V, is refused by name.

Wan 2.2 A14B is two files, a high-noise and a low-noise expert, each shaped exactly like Wan
2.1 14B: no key tells them (or 2.1 from 2.2) apart. Each expert's fine-tune needs its own
expert as base; ``--expert high|low`` (or ``--base-low/--variant-low`` for both at once)
records which expert a LoRA is for. A pair that mixes the experts changes by far more than a
fine-tune, which the run's "not derived from the base" warning names (``mixup_hint``).

Formats, and their evidence:

- ``diffusion_model`` (default, also ``--format neo``): ``diffusion_model.<original name>``
  with lora_A/lora_B and no alpha (diffusion-pipe's style). Nothing in Wan is fused, so each
  weight gets one module, which ComfyUI's generic map (``comfy/lora.py model_lora_keys_unet``:
  ``diffusion_model.<key>`` for every weight, ``<key>`` for weights without ``.weight``) and
  Forge Neo's copy of it (``modules_forge/packages/comfy/lora.py``, one patch per weight in
  ``backend/patcher/base.py add_patches``) apply whole. ``patch_embedding`` is a LoCon
  (down [r,in,1,2,2], up [dim,r,1,1,1]): ComfyUI's ``weight_adapter/lora.py`` multiplies the
  flattened factors and reshapes to the weight, Neo uses that code. With ``--full-layer`` the
  3-D ``modulation`` tables are written as exact rank-1 modules (they are [1, 6*dim] as a
  matrix) under their own names, which the same generic map addresses; by default they are
  vectors below ``--min-dim``, like the norms. diffusers 0.42.1 converts this format
  (``_convert_non_diffusers_wan_lora_to_diffusers``) except ``patch_embedding`` and
  ``modulation``, which make it raise: diffusers users take ``--format diffusers``.
- ``kohya``: musubi-tuner's names, ``lora_unet_<name with _>`` lora_down/lora_up + alpha = rank:
  ComfyUI's and Neo's generic ``lora_unet_`` map, musubi-tuner's own inference, and
  diffusers' ``_convert_musubi_wan_lora_to_diffusers`` when every block has all ten of its
  linear modules and nothing else is in the file (``--include blocks``).
- ``diffusers``: ``transformer.<diffusers name>`` lora_A/lora_B with a peft config, loaded as
  is by ``WanPipeline.load_lora_weights`` (``load_into_transformer_2=True`` for Wan 2.2's
  low-noise expert), ``patch_embedding`` as peft's Conv3d LoRA.
"""

from __future__ import annotations

import re

from .base import (
    DIT_PREFIXES,
    KOHYA_STYLE,
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

# original module inside a block -> diffusers module (norm2 and norm3 trade names; the
# original norm2 has no parameters)
BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
BLOCK_INVERSE = {new: old for old, new in BLOCK.items()}
TOP_INVERSE = {new: old for old, new in TOP.items()}
BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
# width -> model size; patch_embedding input channels -> task
SIZES = {5120: "14B", 3072: "5B", 1536: "1.3B"}
TASKS = {16: "T2V", 36: "I2V", 48: "TI2V"}
LEVELS = 5


class Wan(Architecture):
    name = "wan"
    title = "Wan 2.1/2.2"
    base_model_version = "wan"  # musubi-tuner's ss_base_model_version (ARCHITECTURE_WAN_FULL)
    modelspec_architecture = "wan2.1/lora"  # musubi-tuner's sai_model_spec ARCH_WAN + "/lora"
    formats = {
        "diffusion_model": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none"),
        "kohya": LoraStyle(KOHYA_STYLE.down, KOHYA_STYLE.up, alpha="own"),
        "diffusers": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none", adapter_config=True),
    }
    default_format = "diffusion_model"
    neo_format = "diffusion_model"
    format_loaders = {
        "diffusion_model": "nothing fused, one module per weight: ComfyUI, every Forge Neo era; diffusers 0.42 "
        "converts it unless patch_embedding or modulation changed (use --format diffusers there)",
        "kohya": "musubi-tuner's names: ComfyUI, every Forge Neo era, musubi-tuner; diffusers only for "
        "blocks-only files (--include blocks)",
        "diffusers": "diffusers 0.42 (WanPipeline; load_into_transformer_2=True for Wan 2.2's low-noise expert)",
    }
    mixup_hint = (
        "a Wan 2.2 high-noise expert and a low-noise one do not pair, so give each expert's fine-tune "
        "its own expert as the base (--base/--variant for high, --base-low/--variant-low for low)"
    )

    def __init__(self, prefix: str, layout: str, width: int, in_channels: int, clip_image: bool, blocks: int):
        self.prefix, self.layout, self.blocks = prefix, layout, blocks
        size = SIZES.get(width, f"{width}-wide")
        task = TASKS.get(in_channels, f"{in_channels}-channel")
        clip = " (CLIP image input)" if clip_image else ""
        # the title names the kind: a pair must share it (planning refuses two different titles)
        self.title = f"{type(self).title} {size} {task}{clip}"
        self.has_experts = size == "14B" and not clip_image  # Wan 2.2 A14B's experts have these shapes

    # -- detection ---------------------------------------------------------------------
    @classmethod
    def detect(cls, infos):
        for prefix in DIT_PREFIXES:
            for layout, markers, head, image in (
                ("original layout", ("head.modulation", "blocks.0.self_attn.q.weight"), "blocks.", "img_emb.proj.1.weight"),
                (
                    "diffusers layout",
                    ("condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight"),
                    "blocks.",
                    "condition_embedder.image_embedder.ff.net.0.proj.weight",
                ),
            ):
                embedding = infos.get(prefix + "patch_embedding.weight")
                if embedding is None or not all(prefix + marker in infos for marker in markers):
                    continue
                width, channels = embedding.shape[:2]
                blocks = count_blocks(infos, prefix + head)
                return cls(prefix, layout, width, channels, prefix + image in infos, blocks)
        return None

    def describe(self, infos):
        skipped = skipped_parts(self, infos, "text encoder/VAE")
        return f"{self.title}, {self.layout}, {self.blocks} blocks{skipped}"

    # -- keys ----------------------------------------------------------------------------
    def canonical(self, raw_key, info):
        key = diffusion_key(self.prefix, raw_key)
        if key is None:
            return []
        if self.layout == "diffusers layout":
            key = to_original(key)
        return [(key, RawRef(raw_key), info.shape)]

    def module_path(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        if param:
            return module
        return canonical_key if canonical_key.split(".")[-1] == "modulation" else None

    def lora_module(self, canonical_key, fmt):
        module, param = strip_weight_suffix(canonical_key)
        if fmt == "diffusion_model":
            path = self.module_path(canonical_key)
            return None if path is None else "diffusion_model." + path
        if not param:
            return None  # a parameter table: no module in diffusers, no lora_unet_ entry in ComfyUI
        if fmt == "kohya":
            return "lora_unet_" + module.replace(".", "_")
        return "transformer." + to_diffusers(module)

    def lora_aliases(self, canonical_key):
        path = self.module_path(canonical_key)
        if path is None:
            return []
        names = {path, "diffusion_model." + path}
        module, param = strip_weight_suffix(canonical_key)
        if param:
            names |= {"lora_unet_" + module.replace(".", "_"), "transformer." + to_diffusers(module), to_diffusers(module)}
        return sorted(names)

    def fused_aliases(self, canonical_keys):
        """The modulation tables (no .weight suffix, so not in the alias index): each is its
        own whole "fused" target, which lets a LoRA that patches them be read as a variant."""
        tables = [key for key in canonical_keys if key.split(".")[-1] == "modulation"]
        return {name: [key] for key in tables for name in (key, "diffusion_model." + key)}

    # -- report --------------------------------------------------------------------------
    def group(self, canonical_key):
        kind = _type(canonical_key)
        match = BLOCK_RE.match(canonical_key)
        if match:
            per_level = max(1, -(-self.blocks // LEVELS))
            return block_level_group(int(match.group(1)), kind, per_level)
        return Group(canonical_key.split(".")[0], kind, auxiliary=True, order=100)


def to_original(key: str) -> str:
    """A diffusers-layout key in the original spelling."""
    module, param = strip_weight_suffix(key)
    if not param:
        if key == "scale_shift_table":
            return "head.modulation"
        if key.endswith(".scale_shift_table"):
            return key[: -len("scale_shift_table")] + "modulation"
        if key == "condition_embedder.image_embedder.pos_embed":
            return "img_emb.emb_pos"
        return key
    match = BLOCK_RE.fullmatch(module)
    if match:
        inner = BLOCK_INVERSE.get(match.group(2), match.group(2))
        return f"blocks.{match.group(1)}.{inner}.{param}"
    return f"{TOP_INVERSE.get(module, module)}.{param}"


def to_diffusers(module: str) -> str:
    """An original module path in diffusers' spelling."""
    match = BLOCK_RE.fullmatch(module)
    if match:
        return f"blocks.{match.group(1)}." + BLOCK.get(match.group(2), match.group(2))
    return TOP.get(module, module)


def _type(key: str) -> str:
    if ".self_attn." in key:
        return "Attn"
    if ".cross_attn." in key:
        return "XAttn"
    if ".ffn." in key:
        return "FF"
    if key.endswith("modulation") or key.startswith("time_projection"):
        return "Mod"
    if key.startswith("head."):
        return "Head"
    if key.startswith(("patch_embedding", "text_embedding", "time_embedding", "img_emb")):
        return "Embed"
    return "Other"

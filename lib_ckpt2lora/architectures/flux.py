"""Flux.1 (dev, schnell, Krea, Kontext, Fill, Depth/Canny): the 12B MMDiT, in every layout.

Layouts read: BFL's original (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``
= q|k|v|mlp fused, ``final_layer.adaLN_modulation.1`` = shift|scale), bare, under ComfyUI's /
Forge's ``model.diffusion_model.`` or ``diffusion_model.``, and diffusers'
(``transformer_blocks.N.attn.to_q``, ``norm_out.linear`` = scale|shift), bare or under
``transformer.``. Base and variant may use different layouts.

Canonical keys are the diffusers names: the BFL fused weights are split by rows into the
diffusers parts, so both layouts meet on the same keys. ``norm_out.linear`` is split into
``norm_out.linear.scale`` / ``.shift`` halves because the two layouts store its halves in
opposite orders (a row range of one key cannot swap them).

Text encoders (CLIP-L, T5-XXL) and the VAE in all-in-one files are skipped: they are
distributed separately and rarely fine-tuned (said in the detection line).

Formats, and the evidence for each (issue 13):

- ``kohya`` (default, also ``--format neo``): ``lora_unet_<BFL name>`` with lora_down/up and
  alpha = the module's rank; each fused BFL weight (``img_attn.qkv``, ``txt_attn.qkv``,
  ``linear1``, ``final_layer.adaLN_modulation.1``) is ONE block-diagonal module
  (block_lora.py: each part keeps its own rank, so it equals the split LoRA). ComfyUI and
  Forge map ``lora_unet_<key with _>`` onto every ``diffusion_model.<key>`` weight (one patch
  per weight, so every Forge Neo era applies the whole module). diffusers 0.42.1 converts
  it (``lora_conversion_utils._convert_kohya_flux_lora_to_diffusers``): fused modules are
  split by rows of up with down copied (exact for any block-diagonal or dense module),
  ``final_layer.adaLN_modulation_1``'s up gets ``swap_scale_shift``; its final-layer path
  drops alphas ("TODO: alphas"), hence alpha = rank (scale 1) on every module. That
  converter hard-codes the full-size model (19/38 blocks, linear1 split 3072 x 3 + 12288),
  so it is proven on the full-size key list (tests/test_names_dit.py), and the tiny models
  check the kohya names by ComfyUI's mapping (tests/test_loaders_dit.py).
- ``diffusers``: ``transformer.<diffusers name>`` lora_A/B, q/k/v split, with a peft config
  in the header: loaded as is by diffusers' ``FluxPipeline.load_lora_weights``
  (tests/test_loaders_dit.py, tiny real model, every key injected, weights = variant).
  ComfyUI maps these names onto row ranges of the fused weights; a Forge Neo build keeping
  one patch per weight would lose q and k, so Neo gets ``kohya``.

Bad input: Fill (img_in takes 384 channels) and Depth/Canny (128) differ from dev/schnell/
Kontext (64) in img_in's shape; such a file is detected as its own kind, so pairing it with
a plain Flux.1 base is refused in one sentence naming both. Kontext has dev's shapes and
pairs with dev (its LoRA is then a Kontext LoRA on dev).
"""

from __future__ import annotations

import re

from .base import (
    DIT_PREFIXES,
    Architecture,
    Group,
    LoraStyle,
    RawRef,
    count_blocks,
    diffusion_key,
    skipped_parts,
    strip_weight_suffix,
)

# Parts of all-in-one files that are not the diffusion model (skipped when bare).

# BFL module (inside a block) -> diffusers module; a tuple = a fused weight's parts, in row order.
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": "attn.to_out.0",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": "attn.to_add_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "txt_mod.lin": "norm1_context.linear",
}
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": "proj_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "modulation.lin": "norm.linear",
}
FINAL_MODULATION = ("norm_out.linear.shift", "norm_out.linear.scale")  # BFL row order
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": FINAL_MODULATION,
}
BLOCKS = (("double_blocks", "transformer_blocks", DOUBLE_BLOCK), ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK))
# img_in input channels -> the Flux.1 kind (the packed 2x2 latent: 16 x 4 = 64 per image)
KINDS = {64: "", 128: " Depth/Canny", 384: " Fill"}
DOUBLE_PER_LEVEL, SINGLE_PER_LEVEL = 5, 10


def _invert(table: dict) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """diffusers module -> (BFL module, the fused group's parts or None)."""
    out = {}
    for bfl, target in table.items():
        if isinstance(target, tuple):
            for part in target:
                out[part] = (bfl, target)
        else:
            out[target] = (bfl, None)
    return out


class Flux(Architecture):
    name = "flux"
    title = "Flux.1"
    base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    formats = {
        # alpha = rank: diffusers' kohya converter ignores the final layer's alphas
        "kohya": LoraStyle(".lora_down.weight", ".lora_up.weight", alpha="own"),
        "diffusers": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none", adapter_config=True),
    }
    default_format = "kohya"
    neo_format = "kohya"
    format_loaders = {
        "kohya": "fused qkv/linear1 modules, exact: ComfyUI, Forge, every Forge Neo era, diffusers (converted)",
        "diffusers": "q/k/v split: diffusers, ComfyUI; a Forge Neo build keeping one patch per weight "
        "loses q and k (use the default format there)",
    }
    top = TOP
    blocks = BLOCKS
    markers_bfl = ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight")
    markers_diffusers = ("transformer_blocks.0.norm1.linear.weight", "single_transformer_blocks.0.proj_mlp.weight")

    def __init__(self, prefix: str, layout: str, hidden: int, kind: str = ""):
        self.prefix, self.layout, self.hidden = prefix, layout, hidden
        if kind:  # a Fill / Depth model is its own kind: it does not pair with a plain base
            self.name = type(self).name + "_" + kind.strip().split("/")[0].lower()
            self.title = type(self).title + kind

    # -- detection ---------------------------------------------------------------------
    @classmethod
    def detect(cls, infos):
        for prefix in DIT_PREFIXES:
            for layout, markers, embed in (
                ("BFL layout", cls.markers_bfl, "img_in.weight"),
                ("diffusers layout", cls.markers_diffusers, "x_embedder.weight"),
            ):
                if all(prefix + marker in infos for marker in markers) and prefix + embed in infos:
                    hidden, channels = infos[prefix + embed].shape[:2]
                    return cls(prefix, layout, hidden, cls.kind_of(channels))
        return None

    @classmethod
    def kind_of(cls, channels: int) -> str:
        return KINDS.get(channels, f" ({channels} input channels)")

    def describe(self, infos):
        block = "double_blocks." if self.layout == "BFL layout" else "transformer_blocks."
        single = "single_blocks." if self.layout == "BFL layout" else "single_transformer_blocks."
        doubles = count_blocks(infos, self.prefix + block)
        singles = count_blocks(infos, self.prefix + single)
        skipped = skipped_parts(self, infos, "text encoders/VAE")
        return f"{self.title}, {self.layout}, {doubles} double + {singles} single blocks{skipped}"

    # -- keys ----------------------------------------------------------------------------
    def canonical(self, raw_key, info):
        key = diffusion_key(self.prefix, raw_key)
        if key is None:
            return []
        if self.layout == "diffusers layout":
            if key.startswith("norm_out.linear."):  # diffusers rows: scale | shift
                return _split(raw_key, info, ("norm_out.linear.scale", "norm_out.linear.shift"), key.rsplit(".", 1)[1])
            return [(key, RawRef(raw_key), info.shape)]
        module, _, param = key.rpartition(".")
        if param == "scale":  # BFL's RMSNorm scale is diffusers' weight
            param = "weight"
        target = self.to_diffusers(module)
        if target is None:
            return [(key, RawRef(raw_key), info.shape)]
        if isinstance(target, str):
            return [(f"{target}.{param}", RawRef(raw_key), info.shape)]
        return _split(raw_key, info, target, param, self.part_rows(target, info.shape[0]))

    def part_rows(self, parts: tuple[str, ...], rows: int) -> list[int]:
        if parts[-1].endswith("proj_mlp"):  # linear1: q, k, v of the hidden width, then the MLP
            return [self.hidden] * 3 + [rows - 3 * self.hidden]
        return [rows // len(parts)] * len(parts)

    def to_diffusers(self, module: str):
        for bfl, diffusers, table in self.blocks:
            match = re.fullmatch(rf"{bfl}\.(\d+)\.(.+)", module)
            if match:
                target = table.get(match.group(2))
                if target is None:
                    return None
                head = f"{diffusers}.{match.group(1)}."
                return head + target if isinstance(target, str) else tuple(head + part for part in target)
        return self.top.get(module)

    def to_bfl(self, module: str) -> tuple[str, tuple[str, ...] | None] | None:
        """diffusers module -> (BFL module, the fused group's diffusers parts or None)."""
        for bfl, diffusers, table in self.blocks:
            match = re.fullmatch(rf"{diffusers}\.(\d+)\.(.+)", module)
            if match:
                found = _invert(table).get(match.group(2))
                if found is None:
                    return None
                head, bfl_head = f"{diffusers}.{match.group(1)}.", f"{bfl}.{match.group(1)}."
                name, parts = found
                return bfl_head + name, None if parts is None else tuple(head + part for part in parts)
        return _invert(self.top).get(module)

    def module_path(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        return module if param else None

    def lora_module(self, canonical_key, fmt):
        module, param = strip_weight_suffix(canonical_key)
        if not param:
            return None
        if fmt == "kohya":
            found = self.to_bfl(module)
            bfl = found[0] if found else module
            return "lora_unet_" + bfl.replace(".", "_")
        if module in FINAL_MODULATION:
            module = "norm_out.linear"
        return "transformer." + module

    def fused_group(self, module: str, fmt: str) -> tuple[str, ...] | None:
        if fmt == "kohya":
            found = self.to_bfl(module)
            return found[1] if found else None
        if module in FINAL_MODULATION:
            return ("norm_out.linear.scale", "norm_out.linear.shift")  # diffusers row order
        return None

    def fusion(self, canonical_key, fmt):
        module, param = strip_weight_suffix(canonical_key)
        group = self.fused_group(module, fmt) if param else None
        if group is None:
            return None
        if module != group[0]:
            return ()
        return tuple(f"{part}.{param}" for part in group)

    def lora_aliases(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        if not param:
            return []
        names = []
        for fmt in self.formats:
            if self.fused_group(module, fmt) is None:
                names.append(self.lora_module(canonical_key, fmt))
        found = self.to_bfl(module)
        if found and found[1] is None:
            names.append("diffusion_model." + found[0])
        return sorted(set(names))

    def fused_aliases(self, canonical_keys):
        fused = {}
        for key in canonical_keys:
            module, param = strip_weight_suffix(key)
            if param != "weight":
                continue
            for fmt in self.formats:
                group = self.fused_group(module, fmt)
                if group and module == group[0] and all(f"{part}.weight" in canonical_keys for part in group):
                    name = self.lora_module(key, fmt)
                    fused[name] = [f"{part}.weight" for part in group]
                    if fmt == "kohya":
                        fused["diffusion_model." + self.to_bfl(module)[0]] = fused[name]
        return fused

    # -- report --------------------------------------------------------------------------
    def group(self, canonical_key):
        parts = canonical_key.split(".")
        kind = _type(canonical_key)
        if parts[0] == "transformer_blocks":
            level = int(parts[1]) // DOUBLE_PER_LEVEL
            first = level * DOUBLE_PER_LEVEL
            return Group(f"D{level + 1} (dbl {first}-{first + DOUBLE_PER_LEVEL - 1})", kind, order=level)
        if parts[0] == "single_transformer_blocks":
            level = int(parts[1]) // SINGLE_PER_LEVEL
            first = level * SINGLE_PER_LEVEL
            return Group(f"S{level + 1} (sgl {first}-{first + SINGLE_PER_LEVEL - 1})", kind, order=50 + level)
        return Group(parts[0], kind, auxiliary=True, order=100)


def _split(raw_key, info, parts, param, rows=None):
    rows = rows or [info.shape[0] // len(parts)] * len(parts)
    out, start = [], 0
    for part, height in zip(parts, rows):
        out.append((f"{part}.{param}", RawRef(raw_key, (start, start + height)), (height, *info.shape[1:])))
        start += height
    return out


def _type(key: str) -> str:
    if ".attn." in key:
        return "Attn"
    if ".ff." in key or ".ff_context." in key or ".proj_mlp." in key or ".linear_" in key:
        return "FF"
    if ".norm1" in key or ".norm." in key or key.startswith("norm_out"):
        return "Mod"
    if key.startswith(("x_embedder", "context_embedder", "proj_out")) or ".proj_out." in key:
        return "Proj"
    return "Other"

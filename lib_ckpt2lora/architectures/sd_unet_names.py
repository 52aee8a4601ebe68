"""The SD1.5 / SDXL UNet's module paths: ldm/sgm (checkpoint) names to diffusers names.

LoRAs name UNet modules either way: kohya SD1.5 LoRAs by the diffusers path
(``down_blocks.0.attentions.0.proj_in``), kohya SDXL LoRAs by the sgm path
(``input_blocks.4.1.proj_in``), diffusers/peft LoRAs of both by the diffusers path; A1111,
ComfyUI and diffusers load both spellings for both models. The index arithmetic is the
same for both UNets (two res blocks per down level plus a downsampler slot, three per up
level); which levels hold attention does not matter, because an ldm path says itself
whether it is a res block (``.0``) or an attention (``.1``), and an up level's upsampler
is its only bare ``.conv`` (``.1.conv`` without attention, ``.2.conv`` with it).
"""

from __future__ import annotations

RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL only
    "label_emb.0.2": "add_embedding.linear_2",
}


def ldm_to_diffusers(path: str) -> str | None:
    """Map an ldm UNet module path (no ``model.diffusion_model.``) to diffusers, or None."""
    if path in TOP_LEVEL:
        return TOP_LEVEL[path]
    parts = path.split(".")
    if parts[0] == "input_blocks" and len(parts) >= 4:
        block, inner, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        level, slot = divmod(block - 1, 3)
        if slot == 2:
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
        if inner == "0":
            return _resnet(f"down_blocks.{level}.resnets.{slot}", rest)
        if inner == "1":
            return f"down_blocks.{level}.attentions.{slot}.{rest}"
        return None
    if parts[0] == "middle_block" and len(parts) >= 3:
        inner, rest = parts[1], ".".join(parts[2:])
        if inner == "1":
            return f"mid_block.attentions.0.{rest}"
        if inner in ("0", "2"):
            return _resnet(f"mid_block.resnets.{int(inner) // 2}", rest)
        return None
    if parts[0] == "output_blocks" and len(parts) >= 4:
        block, inner, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        level, slot = divmod(block, 3)
        if inner == "0":
            return _resnet(f"up_blocks.{level}.resnets.{slot}", rest)
        if rest == "conv" and inner in ("1", "2"):
            return f"up_blocks.{level}.upsamplers.0.conv"
        if inner == "1":
            return f"up_blocks.{level}.attentions.{slot}.{rest}"
        return None
    return None


def _resnet(prefix: str, rest: str) -> str | None:
    name = RESNET_PARTS.get(rest)
    return f"{prefix}.{name}" if name else None

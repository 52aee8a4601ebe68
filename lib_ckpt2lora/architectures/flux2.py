"""Flux.2 (Klein 4B, Klein 9B, base and distilled, and Flux.2 dev): BFL's second MMDiT, in every layout.

Not Flux.1 with new sizes (ComfyUI ``comfy/ldm/flux/model.py`` with ``global_modulation``,
diffusers ``transformer_flux2.py``): modulation is shared by all blocks of a stream
(``double_stream_modulation_img.lin``, ``double_stream_modulation_txt.lin``,
``single_stream_modulation.lin``; no per-block ``img_mod``), nothing has a bias, the MLPs are
SwiGLU (``img_mlp.0`` has 2 x mlp rows; ``single_blocks.N.linear1`` = q|k|v + 2 x mlp rows).
ComfyUI and Forge Neo tell it from Flux.1 by ``double_stream_modulation_img.lin.weight``
(``comfy/model_detection.py``, Neo ``huggingface_guess/detection.py``); so does this module.

Layouts read: BFL's original (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``,
``final_layer.adaLN_modulation.1`` = shift|scale), bare or under ComfyUI's
``model.diffusion_model.`` / ``diffusion_model.`` (all-in-one files: the Qwen3 / Mistral text
encoder and the VAE are skipped and said), and diffusers' ``Flux2Transformer2DModel``
(``transformer_blocks.N.attn.to_q``, ``single_transformer_blocks.N.attn.to_qkv_mlp_proj``,
``norm_out.linear`` = scale|shift), bare or under ``transformer.``. Canonical keys are the
diffusers names: double blocks' fused qkv is split by rows into to_q/to_k/to_v (diffusers
splits them), single blocks' linear1 stays one weight (diffusers keeps it fused too), the
final modulation is split into its scale and shift halves as for Flux.1 (flux.py).

The sizes (diffusers ``scripts/convert_flux2_to_diffusers.py`` and the configs Forge Neo ships
in ``backend/huggingface/black-forest-labs/FLUX.2-klein-{4B,9B}/transformer/config.json``):
Klein 4B 3072 wide (24 heads x 128), 5 double + 20 single blocks, text 7680 (Qwen3-4B);
Klein 9B 4096 wide (32 heads), 8 + 24 blocks, text 12288 (Qwen3-8B); dev 6144 wide (48
heads), 8 + 48 blocks, text 15360 (Mistral Small), with a guidance embedder. mlp_ratio 3
everywhere. The width alone tells them apart (Neo's ``Flux2K4B`` / ``Flux2K9B`` guesses
match on ``hidden_size`` alone); a Klein base and its distilled model share every shape and
pair like Z-Image Base and Turbo. Pairing two different kinds is refused in one sentence.

Formats, and their evidence (issue 17):

- ``kohya`` (default, also ``--format neo``): ``lora_unet_<BFL name>`` with lora_down/up and
  alpha = the module's rank; ONE block-diagonal module per fused BFL weight (``img_attn.qkv``,
  ``txt_attn.qkv``, ``final_layer.adaLN_modulation.1``; block_lora.py). ComfyUI
  (``comfy/lora.py model_lora_keys_unet``) and Forge Neo (same function in
  ``modules_forge/packages/comfy/lora.py``) map ``lora_unet_<key with _>`` onto the whole
  ``diffusion_model.<key>`` weight. Neo's Klein repos have "flux" in their names, so Neo
  also maps diffusers names onto ROW SLICES of the fused weights (``flux_to_diffusers``),
  and its ``add_patches`` keeps one patch per weight key: split q/k/v modules would lose q
  and k there; the fused module is that one patch, so every Neo era applies all of it.
  diffusers 0.42.1 converts this format (``_convert_kohya_flux2_lora_to_diffusers``: qkv
  split by rows of up, exact for a block-diagonal module) but knows no key for the shared
  modulations, the guidance embedder or the final modulation: it logs "Unsupported keys" and
  drops them, so diffusers users take ``--format diffusers``.
- ``diffusers``: ``transformer.<diffusers name>`` lora_A/B with a peft config in the header,
  q/k/v split, ``attn.to_qkv_mlp_proj`` whole: loaded as is by ``Flux2KleinPipeline`` /
  ``Flux2Pipeline.load_lora_weights`` (``Flux2LoraLoaderMixin``), every module injected.
  ComfyUI's and Neo's Flux key map know no diffusers name for the shared modulations or
  ``time_guidance_embed``, so ComfyUI and Neo get ``kohya``.
"""

from __future__ import annotations

from .base import DIT_PREFIXES, Group, LoraStyle, count_blocks, skipped_parts
from .flux import FINAL_MODULATION, Flux

# BFL module (inside a block) -> diffusers module; a tuple = a fused weight's parts, in row order.
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": "attn.to_out.0",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": "attn.to_add_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
SINGLE_BLOCK = {
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": FINAL_MODULATION,
}
BLOCKS = (("double_blocks", "transformer_blocks", DOUBLE_BLOCK), ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK))
# width -> (kind, ss_base_model_version as ai-toolkit writes it, modelspec.architecture as musubi-tuner writes it)
KINDS = {
    3072: ("Klein 4B", "flux2_klein_4b", "Flux.2-klein-4b"),
    4096: ("Klein 9B", "flux2_klein_9b", "Flux.2-klein-9b"),
    6144: ("dev", "flux2", "Flux.2-dev"),
}
# The report's levels: double blocks in two levels, single blocks in four, whatever the kind.
DOUBLE_LEVELS, SINGLE_LEVELS = 2, 4
AUX_LEVELS = {
    "double_stream_modulation_img": "modulation img",
    "double_stream_modulation_txt": "modulation txt",
    "single_stream_modulation": "modulation single",
}


class Flux2(Flux):
    name = "flux2"
    title = "Flux.2"
    base_model_version = "flux2"
    modelspec_architecture = "Flux.2/lora"
    formats = {
        "kohya": LoraStyle(".lora_down.weight", ".lora_up.weight", alpha="own"),
        "diffusers": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none", adapter_config=True),
    }
    default_format = "kohya"
    neo_format = "kohya"
    format_loaders = {
        "kohya": "one module per BFL weight, fused qkv block-diagonal, exact: ComfyUI, every Forge Neo era; "
        "diffusers converts it but drops the shared modulation, guidance and final modulation modules "
        "(use --format diffusers there)",
        "diffusers": "q/k/v split: diffusers 0.42 (Flux2KleinPipeline, Flux2Pipeline); not ComfyUI/Forge Neo "
        "(their key maps miss the shared modulations and time embedder; use the default format there)",
    }
    top = TOP
    blocks = BLOCKS
    markers_bfl = ("double_stream_modulation_img.lin.weight", "double_blocks.0.img_attn.qkv.weight")
    markers_diffusers = ("double_stream_modulation_img.linear.weight", "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight")

    def __init__(self, prefix: str, layout: str, hidden: int, doubles: int = 1, singles: int = 1):
        self.prefix, self.layout, self.hidden = prefix, layout, hidden
        self.doubles, self.singles = doubles, singles
        kind = KINDS.get(hidden)
        if kind:
            self.title = f"Flux.2 {kind[0]}"
            self.base_model_version, spec = kind[1], kind[2]
            self.modelspec_architecture = spec + "/lora"
        else:  # a pruned or test model: named by its width, pairs only with the same width
            self.title = f"Flux.2 ({hidden} wide)"

    @classmethod
    def detect(cls, infos):
        for prefix in DIT_PREFIXES:
            for layout, markers, embed, heads in (
                ("BFL layout", cls.markers_bfl, "img_in.weight", ("double_blocks.", "single_blocks.")),
                (
                    "diffusers layout",
                    cls.markers_diffusers,
                    "x_embedder.weight",
                    ("transformer_blocks.", "single_transformer_blocks."),
                ),
            ):
                if all(prefix + marker in infos for marker in markers) and prefix + embed in infos:
                    doubles, singles = (count_blocks(infos, prefix + head) for head in heads)
                    return cls(prefix, layout, infos[prefix + embed].shape[0], doubles, singles)
        return None

    def describe(self, infos):
        skipped = skipped_parts(self, infos, "text encoder/VAE")
        return f"{self.title}, {self.layout}, {self.doubles} double + {self.singles} single blocks{skipped}"

    # -- report --------------------------------------------------------------------------
    def group(self, canonical_key):
        parts = canonical_key.split(".")
        kind = _type(canonical_key)
        for head, letter, short, count, levels, order in (
            ("transformer_blocks", "D", "dbl", self.doubles, DOUBLE_LEVELS, 0),
            ("single_transformer_blocks", "S", "sgl", self.singles, SINGLE_LEVELS, 50),
        ):
            if parts[0] == head:
                per_level = max(1, -(-count // levels))
                level = int(parts[1]) // per_level
                first, last = level * per_level, min((level + 1) * per_level, count) - 1
                span = f"{first}-{last}" if last > first else f"{first}"
                return Group(f"{letter}{level + 1} ({short} {span})", kind, order=order + level)
        return Group(AUX_LEVELS.get(parts[0], parts[0]), kind, auxiliary=True, order=100)


def _type(key: str) -> str:
    if ".attn.to_out." in key and key.startswith("single_"):
        return "Proj"  # linear2: attention output and MLP output, fused
    if ".attn." in key:
        return "Attn"  # single blocks' to_qkv_mlp_proj (linear1) is q|k|v and the MLP input, fused
    if ".ff." in key or ".ff_context." in key:
        return "FF"
    if "modulation" in key or key.startswith("norm_out"):
        return "Mod"
    if key.startswith("time_guidance_embed"):
        return "Cond"
    if key.startswith(("x_embedder", "context_embedder", "proj_out")):
        return "Proj"
    return "Other"

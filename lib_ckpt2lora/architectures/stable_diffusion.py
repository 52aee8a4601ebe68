"""SD1.5 and SDXL single-file checkpoints (ldm / sgm key names).

LoRA names are kohya's: SD1.5 UNet modules by their diffusers path (the only form
diffusers loads), SDXL UNet modules by their sgm path (the form A1111 maps without its
upsampler bug), text encoders as ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` plus the
Hugging Face CLIP path. SDXL's OpenCLIP-G text encoder fuses q|k|v into ``in_proj``:
it is split here into three canonical weights, and its out_proj is always emitted
beside them, because A1111 applies a te2 attention LoRA only when all four exist.
"""

from __future__ import annotations

from ..errors import UserError
from ..reading import TensorInfo
from .base import Architecture, Group, RawRef, strip_weight_suffix
from .sd_unet_names import ldm_to_diffusers

UNET = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
VAE = "first_stage_model."
OPENCLIP_PARTS = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}


def _unet_prefix(infos: dict[str, TensorInfo]) -> str | None:
    if UNET + "input_blocks.0.0.weight" in infos:
        return UNET
    if "input_blocks.0.0.weight" in infos:  # a UNet-only file
        return ""
    return None


class StableDiffusion(Architecture):
    formats = dict(Architecture.formats)
    format_loaders = {"kohya": "A1111, Forge, Forge Classic, Forge Neo (every era), ComfyUI, diffusers and LyCORIS"}
    level_split = 6

    def __init__(self, unet_prefix: str):
        self.unet_prefix = unet_prefix

    def describe(self, infos: dict[str, TensorInfo]) -> str:
        parts = ["UNet"]
        if any(key.startswith((SD1_TE, SDXL_TE1)) for key in infos):
            parts.append("text encoder" if self.name == "sd15" else "CLIP-L")
        if any(key.startswith(SDXL_TE2) for key in infos):
            parts.append("OpenCLIP-G")
        if any(key.startswith(VAE) for key in infos):
            parts.append("VAE")
        layout = "single-file checkpoint" if self.unet_prefix else "UNet-only file"
        return f"{self.title} {layout} ({', '.join(parts)})"

    # -- keys --------------------------------------------------------------------------
    def canonical(self, raw_key, info):
        key = raw_key
        if not self.unet_prefix and key.startswith(
            ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
        ):
            key = UNET + key
        return [(key, RawRef(raw_key), info.shape)]

    def module_path(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        if not param:
            return None
        if module.startswith(UNET):
            return self.unet_module(module[len(UNET) :])
        return self.text_module(module)

    def unet_module(self, path: str) -> str | None:
        raise NotImplementedError

    def lora_aliases(self, canonical_key):
        """Every UNet spelling a loader accepts, whichever one we write: the ldm/sgm path
        (A1111's ``lora_unet`` -> ``diffusion_model`` fallback, ComfyUI, diffusers' sgm
        mapping), the diffusers path (kohya SD1.5, diffusers/peft ``unet.``), and diffusers'
        old attention-processor names (``attn1.processor.to_q``, ``processor.to_out``),
        which ComfyUI still maps. Text encoders need nothing more: the alias index folds
        ``lora_te_`` / ``lora_te1_`` / ``text_encoder.`` into one text-encoder part and
        ``lora_te2_`` / ``text_encoder_2.`` into the other."""
        names = set(super().lora_aliases(canonical_key))
        module, param = strip_weight_suffix(canonical_key)
        if param and module.startswith(UNET):
            path = module[len(UNET) :]
            names.add("lora_unet_" + path)
            diffusers_path = ldm_to_diffusers(path)
            if diffusers_path is not None:
                names.add("lora_unet_" + diffusers_path)
                names.add("unet." + _processor_path(diffusers_path))
        return sorted(names)

    def text_module(self, module: str) -> str | None:
        raise NotImplementedError

    # -- report ------------------------------------------------------------------------
    def group(self, canonical_key):
        if canonical_key.startswith(UNET):
            path = canonical_key[len(UNET) :]
            parts = path.split(".")
            kind = _sd_type(path)
            if parts[0] in ("time_embed", "label_emb"):
                return Group(parts[0], "Cond", auxiliary=True, order=90)
            if parts[0] == "input_blocks":
                first = int(parts[1]) < self.level_split
                return Group("IN-1" if first else "IN-2", kind, order=1 if first else 2)
            if parts[0] == "middle_block":
                return Group("MID", kind, order=3)
            if parts[0] == "output_blocks":
                first = int(parts[1]) < self.level_split
                return Group("OUT-1" if first else "OUT-2", kind, order=4 if first else 5)
            return Group("OTHER", kind, order=6)
        if canonical_key.startswith(VAE):
            return Group("vae", "Other", auxiliary=True, order=99)
        for prefix, name in self.text_encoders:
            if canonical_key.startswith(prefix):
                return Group(name, _sd_type(canonical_key), auxiliary=True, order=80)
        return Group("other", "Other", auxiliary=True, order=100)


def _sd_type(path: str) -> str:
    if ".attn1." in path or ".attn2." in path or "self_attn" in path or ".attn." in path:
        return "Attn"
    if ".ff." in path or ".mlp." in path:
        return "FF"
    if ".proj_in" in path or ".proj_out" in path:
        return "Proj"
    if path.startswith(("time_embed", "label_emb")):
        return "Cond"
    return "Other"


def _processor_path(diffusers_path: str) -> str:
    """diffusers' pre-peft attention-processor name of a module (``attn1.processor.to_q``,
    ``attn1.processor.to_out`` for ``to_out.0``); other modules keep their path."""
    for attn in (".attn1.", ".attn2."):
        head, found, tail = diffusers_path.partition(attn)
        if found and tail in ("to_q", "to_k", "to_v", "to_out.0"):
            return f"{head}{attn}processor.{tail.removesuffix('.0')}"
    return diffusers_path


def _clip_module(hf_path: str, lora_prefix: str) -> str | None:
    """A Hugging Face CLIP module path (``text_model.encoder...``) as a kohya name."""
    if not hf_path.startswith("text_model.") or ".embeddings" in hf_path:
        return None
    return lora_prefix + hf_path.replace(".", "_")


class SD15(StableDiffusion):
    name = "sd15"
    title = "SD1.5"
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    text_encoders = ((SD1_TE, "text_encoder"),)
    level_split = 6

    @classmethod
    def detect(cls, infos):
        prefix = _unet_prefix(infos)
        if prefix is None:
            return None
        if any(key.startswith((UNET + "label_emb.", "label_emb.")) for key in infos):
            return None
        cross = infos.get(prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        if any(key.startswith("cond_stage_model.model.") for key in infos) or (cross is not None and cross.shape[-1] == 1024):
            raise UserError("This is an SD2.x checkpoint (OpenCLIP-H text encoder); ckpt2lora supports SD1.5, SDXL and Z-Image.")
        return cls(prefix)

    def canonical(self, raw_key, info):
        # Older SD1 files lack the ``text_model.`` level of the CLIP text encoder.
        if raw_key.startswith(SD1_TE) and not raw_key.startswith(SD1_TE + "text_model."):
            return [(SD1_TE + "text_model." + raw_key[len(SD1_TE) :], RawRef(raw_key), info.shape)]
        return super().canonical(raw_key, info)

    def unet_module(self, path):
        diffusers_path = ldm_to_diffusers(path)
        return None if diffusers_path is None else "lora_unet_" + diffusers_path.replace(".", "_")

    def text_module(self, module):
        if module.startswith(SD1_TE):
            return _clip_module(module[len(SD1_TE) :], "lora_te_")
        return None


class SDXL(StableDiffusion):
    name = "sdxl"
    title = "SDXL"
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    text_encoders = ((SDXL_TE1, "text_encoder_1"), (SDXL_TE2, "text_encoder_2"))
    level_split = 5

    @classmethod
    def detect(cls, infos):
        prefix = _unet_prefix(infos)
        if prefix is None:
            return None
        if prefix + "label_emb.0.0.weight" in infos or any(k.startswith("conditioner.embedders.") for k in infos):
            return cls(prefix)
        return None

    def canonical(self, raw_key, info):
        if raw_key.startswith(SDXL_TE1) and not raw_key.startswith(SDXL_TE1 + "text_model."):
            return [(SDXL_TE1 + "text_model." + raw_key[len(SDXL_TE1) :], RawRef(raw_key), info.shape)]
        te2_attn = SDXL_TE2 + "transformer.resblocks."
        if raw_key.startswith(te2_attn) and raw_key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            block = raw_key[: raw_key.rindex(".attn.")]
            param = "weight" if raw_key.endswith("weight") else "bias"
            third = info.shape[0] // 3
            return [
                (f"{block}.attn.{name}_proj.{param}", RawRef(raw_key, (i * third, (i + 1) * third)), (third, *info.shape[1:]))
                for i, name in enumerate("qkv")
            ]
        return super().canonical(raw_key, info)

    def unet_module(self, path):
        return "lora_unet_" + path.replace(".", "_")

    def text_module(self, module):
        if module.startswith(SDXL_TE1):
            return _clip_module(module[len(SDXL_TE1) :], "lora_te1_")
        if module.startswith(SDXL_TE2 + "transformer.resblocks."):
            rest = module[len(SDXL_TE2 + "transformer.resblocks.") :]
            index, _, part = rest.partition(".")
            if part.startswith("attn.") and part.endswith(("q_proj", "k_proj", "v_proj")):
                hf_part = "self_attn." + part[len("attn.") :]
            else:
                hf_part = OPENCLIP_PARTS.get(part)
            if hf_part is None:
                return None
            return f"lora_te2_text_model_encoder_layers_{index}_" + hf_part.replace(".", "_")
        if module == SDXL_TE2 + "ln_final":
            return "lora_te2_text_model_final_layer_norm"
        return None

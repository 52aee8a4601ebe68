"""Name maps against the FULL-SIZE key lists of each architecture.

Full-size models are built on the meta device (no memory), converted to their
single-file layouts, and every 2-D/conv weight must map to a LoRA module name that
diffusers' own LoRA key conversion turns into a module of the full-size model.
"""

import pytest
import torch
from diffusers import (
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tiny_models import clip_checkpoint_name, te2_to_openclip, unet_to_ldm, zimage_to_original
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_ckpt2lora import architectures
from lib_ckpt2lora.architectures.base import FileView
from lib_ckpt2lora.reading import TensorInfo

# Weights no LoRA loader can address (embeddings, a raw projection matrix, buffers).
NOT_LORA = ("embedding", "text_projection", "logit_scale", "pad_token", "position_ids")


def meta(factory):
    with torch.device("meta"):
        return factory()


def clip(hidden, layers, heads, inner, projection=None):
    config = CLIPTextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inner,
        projection_dim=projection or hidden,
    )
    return meta(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(config))


def sd15_unet():
    return meta(lambda: UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8))


def sdxl_unet():
    return meta(
        lambda: UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    )


def infos_of(state):
    return {key: TensorInfo(tuple(value.shape), value.dtype) for key, value in state.items()}


def lora_entries(arch, fmt, infos):
    """Every weight's LoRA module, with a rank-1 factor pair a loader's converter can read."""
    view = FileView.build(type("F", (), {"infos": infos})(), arch)
    modules, missing = {}, []
    for key, shape in view.shapes.items():
        if len(shape) < 2 or not view.file.infos[view.refs[key].key].dtype.is_floating_point:
            continue
        fused = arch.fusion(key, fmt)
        if fused == ():
            continue
        module = arch.lora_module(key, fmt)
        if module is None:
            if not any(word in key for word in NOT_LORA):
                missing.append(key)
            continue
        modules[module] = key
    return modules, missing


def kohya_state(modules, style):
    state = {}
    for module in modules:
        state[module + style.down] = torch.zeros(1, 1)
        state[module + style.up] = torch.zeros(1, 1)
        if style.writes_alpha:
            state[module + ".alpha"] = torch.tensor(1.0)
    return state


# The spellings diffusers' kohya conversion produces before its final peft step.
CONVERTED_SUFFIXES = (".lora_A.weight", ".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight")
TEXT_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def converted_modules(state):
    """Module paths that diffusers' converted LoRA state dict addresses."""
    modules = set()
    for key in state:
        for suffix in CONVERTED_SUFFIXES:
            if key.endswith(suffix):
                module = key[: -len(suffix)].replace(".processor.", ".")
                if module.startswith("text_encoder"):
                    head, _, last = module.rpartition(".")
                    module = f"{head}.{TEXT_ATTENTION.get(last, last)}"
                elif module.endswith(".to_out"):
                    module += ".0"
                modules.add(module)
    return modules


def check_all_land(converted, model_modules_by_prefix):
    unknown = []
    for name in converted:
        prefix, _, path = name.partition(".")
        modules = model_modules_by_prefix[prefix]
        if path not in modules and "text_model." + path not in modules and path.removeprefix("text_model.") not in modules:
            unknown.append(name)
    return unknown


def module_names(model):
    return {name for name, _ in model.named_modules()}


def test_sd15_full_size_names_load_in_diffusers():
    unet, te = sd15_unet(), clip(768, 12, 12, 3072)
    names = unet_to_ldm(unet.state_dict(), unet.config)
    state = {"model.diffusion_model." + names[k]: v for k, v in unet.state_dict().items()}
    state.update({"cond_stage_model.transformer." + clip_checkpoint_name(k): v for k, v in te.state_dict().items()})
    infos = infos_of(state)
    arch = architectures.detect(infos)
    assert arch.name == "sd15"
    modules, missing = lora_entries(arch, "kohya", infos)
    assert missing == []
    assert len(modules) > 250  # every conv, linear and attention projection of UNet + CLIP
    converted, _ = StableDiffusionPipeline.lora_state_dict(kohya_state(modules, arch.formats["kohya"]))
    landed = converted_modules(converted)
    assert len(landed) == len(modules)
    assert check_all_land(landed, {"unet": module_names(unet), "text_encoder": module_names(te)}) == []


def test_sdxl_full_size_names_load_in_diffusers():
    unet, te1, te2 = sdxl_unet(), clip(768, 12, 12, 3072), clip(1280, 32, 20, 5120, projection=1280)
    names = unet_to_ldm(unet.state_dict(), unet.config)
    state = {"model.diffusion_model." + names[k]: v for k, v in unet.state_dict().items()}
    state.update({"conditioner.embedders.0.transformer." + clip_checkpoint_name(k): v for k, v in te1.state_dict().items()})
    te2_state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in te2.state_dict().items()}
    state.update({"conditioner.embedders.1.model." + k: v for k, v in te2_to_openclip(te2_state).items()})
    infos = infos_of(state)
    arch = architectures.detect(infos)
    assert arch.name == "sdxl"
    modules, missing = lora_entries(arch, "kohya", infos)
    assert missing == []
    te2_attention = [m for m in modules if m.startswith("lora_te2_") and "self_attn" in m]
    assert len(te2_attention) == 32 * 4  # q, k, v and out for every OpenCLIP-G layer
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(kohya_state(modules, arch.formats["kohya"]), unet_config=unet.config)
    landed = converted_modules(converted)
    assert len(landed) == len(modules)
    by_prefix = {"unet": module_names(unet), "text_encoder": module_names(te1), "text_encoder_2": module_names(te2)}
    assert check_all_land(landed, by_prefix) == []


@pytest.mark.parametrize("fmt", ["diffusion_model", "diffusers"])
@pytest.mark.parametrize("layout", ["original", "diffusers", "all-in-one"])
def test_zimage_full_size_names_load_in_diffusers(fmt, layout):
    model = meta(ZImageTransformer2DModel)
    state = model.state_dict()
    if layout != "diffusers":
        state = zimage_to_original({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()})
    if layout == "all-in-one":
        state = {"model.diffusion_model." + k: v for k, v in state.items()}
        state["text_encoders.qwen3_4b.transformer.model.embed_tokens.weight"] = torch.empty(10, 10, device="meta")
    infos = infos_of(state)
    arch = architectures.detect(infos)
    assert arch.name == "zimage"
    modules, missing = lora_entries(arch, fmt, infos)
    assert missing == []
    assert sum(".attention.to_q" in m for m in modules) == 30 + 2 + 2  # main blocks + both refiners
    converted = ZImagePipeline.lora_state_dict(kohya_state(modules, arch.formats[fmt]))
    landed = {name.removeprefix("transformer.") for name in converted_modules(converted)}
    assert len(landed) == len(modules)
    assert landed <= module_names(model)


def test_zimage_comfy_format_uses_original_fused_names():
    state = zimage_to_original(
        {k: torch.empty(v.shape, device="meta") for k, v in meta(ZImageTransformer2DModel).state_dict().items()}
    )
    infos = infos_of(state)
    arch = architectures.detect(infos)
    modules, missing = lora_entries(arch, "comfy", infos)
    assert missing == []
    # ComfyUI's own names: every module is a key of the original checkpoint
    assert {m.removeprefix("diffusion_model.") + ".weight" for m in modules} <= set(state)
    assert sum(m.endswith(".attention.qkv") for m in modules) == 34

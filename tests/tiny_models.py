"""Tiny, seeded models with the real architectures' module trees, and their checkpoint layouts.

Each builder returns real diffusers / transformers modules (so real LoRA loaders can be
pointed at them) with every parameter re-drawn from a seeded generator. The converters
turn their diffusers-layout state dicts into the single-file layouts people actually have
on disk (ldm / sgm UNet names, OpenCLIP text encoder, Z-Image's original fused-qkv
layout); ``tests/test_loaders_*.py`` check them against diffusers' own single-file
converters, which go the other way.

``make_variant`` adds a known low-rank delta to every weight of a state dict, so a LoRA
extracted from (variant - base) with enough rank reproduces the variant exactly.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# -- shared helpers -----------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every float parameter from a seeded generator (library inits vary by version).

    Weights get N(0, 1/fan_in); 1-D weights (norm scales) 1 + N(0, 0.1^2); biases N(0, 0.1^2).
    """
    gen = _generator(seed)
    for name, param in sorted(module.named_parameters()):
        if not param.dtype.is_floating_point:
            continue
        if param.ndim >= 2:
            fan_in = max(1, param[0].numel())
            values = torch.randn(param.shape, generator=gen) / fan_in**0.5
        elif name.endswith("bias"):
            values = 0.1 * torch.randn(param.shape, generator=gen)
        else:
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        param.copy_(values.to(param.dtype))
    return module


VARIANT_RANKS = (1, 2, 3, 4)


def make_variant(
    state_dict: dict[str, torch.Tensor],
    rank: int | tuple[int, ...] = VARIANT_RANKS,
    scale: float = 1e-2,
    seed: int = 1,
    include_1d: bool = False,
    skip: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """base + a known delta: low rank on every >=2-D float weight (conv kernels as
    [out, in*k*k]), optionally a dense one on 1-D tensors; ||delta|| = scale * ||W||.

    ``rank``: one rank for all, or ranks taken in turn over the sorted >=2-D keys (the
    default, 1-4), so that layers get different LoRA ranks and loaders' per-module
    alpha/rank handling is exercised. Keys containing any of ``skip`` are copied
    unchanged. Non-float tensors are copied.
    """
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    gen = _generator(seed)
    variant = {}
    matrices = 0
    for key in sorted(state_dict):
        weight = state_dict[key]
        if not weight.dtype.is_floating_point or any(part in key for part in skip) or (weight.ndim < 2 and not include_1d):
            variant[key] = weight.clone()
            continue
        base = weight.float()
        if weight.ndim >= 2:
            rows, cols = base.shape[0], base[0].numel()
            r = min(ranks[matrices % len(ranks)], rows, cols)
            matrices += 1
            delta = (torch.randn(rows, r, generator=gen) @ torch.randn(r, cols, generator=gen)).reshape(base.shape)
        else:
            delta = torch.randn(base.shape, generator=gen)
        norm = float(torch.linalg.vector_norm(base)) or 1.0
        delta = delta * (scale * norm / float(torch.linalg.vector_norm(delta)))
        variant[key] = (base + delta).to(weight.dtype)
    return variant


def save(state_dict: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = torch.float32) -> Path:
    """Save as safetensors; float tensors cast to ``dtype`` (fp32 keeps the deltas exact)."""
    from safetensors.torch import save_file

    tensors = {
        key: (value.to(dtype) if dtype is not None and value.dtype.is_floating_point else value).contiguous()
        for key, value in state_dict.items()
    }
    save_file(tensors, str(path))
    return path


@dataclass
class TinyModel:
    """A model family: its components, how to lay their state dicts out as a checkpoint,
    and where each canonical (engine) key lives among the components."""

    components: dict[str, torch.nn.Module]
    layout_name: str
    # canonical key -> (component, diffusers parameter name)
    canonical: dict[str, tuple[str, str]] = field(default_factory=dict)

    def states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name, module in self.components.items()}

    def copy_with(self, states: dict[str, dict[str, torch.Tensor]]) -> TinyModel:
        """Fresh components (deep copies) holding ``states``: a base or variant model to load into."""
        components = {}
        for name, module in self.components.items():
            clone = copy.deepcopy(module)
            clone.load_state_dict(states[name], strict=True)
            components[name] = clone.eval()
        return TinyModel(components, self.layout_name, self.canonical)


# -- Z-Image -------------------------------------------------------------------------------

ZIMAGE_CONFIG = dict(
    in_channels=16,
    dim=96,
    n_layers=2,
    n_refiner_layers=2,
    n_heads=3,
    n_kv_heads=3,
    cap_feat_dim=32,
    axes_dims=[8, 12, 12],
    axes_lens=[64, 32, 32],
)
ZIMAGE_ALL_IN_ONE = "model.diffusion_model."


def zimage_transformer(seed: int = 0, state_dict: dict[str, torch.Tensor] | None = None):
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**ZIMAGE_CONFIG)
    randomize_(model, seed)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def zimage_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers layout -> the original (ComfyUI) layout: fused qkv, original module names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state_dict[key.replace(".to_q.", f".to_{name}.")] for name in "qkv"]
            out[key.replace(".attention.to_q.", ".attention.qkv.")] = torch.cat(parts, dim=0)
            continue
        new = key
        if new.startswith("all_x_embedder.2-1."):
            new = "x_embedder." + new[len("all_x_embedder.2-1.") :]
        elif new.startswith("all_final_layer.2-1."):
            new = "final_layer." + new[len("all_final_layer.2-1.") :]
        new = new.replace(".attention.to_out.0.", ".attention.out.")
        new = new.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
        out[new] = value
    return out


def zimage_checkpoint(state_dict: dict[str, torch.Tensor], layout: str = "original", prefix: str = "") -> dict[str, torch.Tensor]:
    """A Z-Image file: ``layout`` "original" (fused qkv) or "diffusers"; ``prefix`` "" or
    "model.diffusion_model." (an all-in-one file, which then also holds stand-ins for
    the text encoder and VAE, as real all-in-one files do)."""
    tensors = zimage_to_original(state_dict) if layout == "original" else dict(state_dict)
    tensors = {prefix + key: value for key, value in tensors.items()}
    if prefix:
        gen = _generator(99)
        tensors["text_encoders.qwen3_4b.transformer.model.embed_tokens.weight"] = torch.randn(64, 32, generator=gen)
        tensors["vae.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3, generator=gen)
    return tensors


def zimage_model(seed: int = 0) -> TinyModel:
    model = zimage_transformer(seed)
    canonical = {key: ("transformer", key) for key in model.state_dict()}
    return TinyModel({"transformer": model}, "zimage", canonical)


# -- SD1.5 / SDXL UNets: diffusers -> ldm / sgm names ---------------------------------------

RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_module_map(config) -> dict[str, str]:
    """diffusers UNet module prefix -> ldm/sgm prefix, for a UNet2DConditionModel config."""
    lpb = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    mapping = dict(UNET_TOP_TO_LDM)
    resnets: list[tuple[str, str]] = []
    for level in range(levels):
        for j in range(lpb):
            index = 1 + level * (lpb + 1) + j
            resnets.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0"))
            if down_attn[level]:
                mapping[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
        if level < levels - 1:
            mapping[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{1 + level * (lpb + 1) + lpb}.0.op"
    resnets += [("mid_block.resnets.0", "middle_block.0"), ("mid_block.resnets.1", "middle_block.2")]
    mapping["mid_block.attentions.0"] = "middle_block.1"
    for level in range(levels):
        for j in range(lpb + 1):
            index = level * (lpb + 1) + j
            resnets.append((f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0"))
            if up_attn[level]:
                mapping[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
        if level < levels - 1:
            index = level * (lpb + 1) + lpb
            mapping[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if up_attn[level] else 1}.conv"
    for diffusers_prefix, ldm_prefix in resnets:
        for part, ldm_part in RESNET_TO_LDM.items():
            mapping[f"{diffusers_prefix}.{part}"] = f"{ldm_prefix}.{ldm_part}"
    return mapping


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, str]:
    """diffusers UNet parameter name -> ldm/sgm parameter name (no ``model.diffusion_model.``)."""
    mapping = unet_module_map(config)
    prefixes = sorted(mapping, key=len, reverse=True)
    names = {}
    for key in state_dict:
        for prefix in prefixes:
            if key.startswith(prefix + "."):
                names[key] = mapping[prefix] + key[len(prefix) :]
                break
        else:
            raise KeyError(f"no ldm name for UNet parameter {key}")
    if len(set(names.values())) != len(names):
        raise AssertionError("two UNet parameters map to one ldm name")
    return names


def clip_checkpoint_name(key: str) -> str:
    """An HF CLIP text model parameter under its single-file name (transformers 4 layout).

    Checkpoints hold ``text_model.encoder...`` (transformers 4's CLIPTextModel wraps a
    ``text_model``); transformers 5 dropped that level from CLIPTextModel's own names.
    """
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def clip_config(hidden: int = 32, layers: int = 2, heads: int = 4, projection: int = 32, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


# -- SD1.5 ---------------------------------------------------------------------------------

SD15_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=32,
)
SD_UNET = "model.diffusion_model."
SD15_TE = "cond_stage_model.transformer."
SD15_VAE_STANDIN = "first_stage_model.decoder.conv_out.weight"


def sd15_model(seed: int = 0) -> TinyModel:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = randomize_(UNet2DConditionModel(**SD15_UNET_CONFIG), seed).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te = randomize_(CLIPTextModel(clip_config()), seed + 1).eval()
    names = unet_to_ldm(unet.state_dict(), unet.config)
    canonical = {SD_UNET + ldm: ("unet", key) for key, ldm in names.items()}
    canonical.update({SD15_TE + clip_checkpoint_name(key): ("text_encoder", key) for key in te.state_dict()})
    return TinyModel({"unet": unet, "text_encoder": te}, "sd15", canonical)


def sd15_checkpoint(model: TinyModel, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The SD1.5 single-file layout (UNet ldm names, CLIP-L under cond_stage_model)."""
    unet = model.components["unet"]
    names = unet_to_ldm(states["unet"], unet.config)
    tensors = {SD_UNET + names[key]: value for key, value in states["unet"].items()}
    tensors.update({SD15_TE + clip_checkpoint_name(key): value for key, value in states["text_encoder"].items()})
    # What real files also hold: the int64 position ids and a VAE (one stand-in tensor).
    tensors[SD15_TE + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    tensors[SD15_VAE_STANDIN] = states.get("vae_standin", {}).get("w", torch.ones(3, 32, 3, 3))
    return tensors


# -- SDXL ----------------------------------------------------------------------------------

SDXL_TE1_HIDDEN = 32
SDXL_TE2_HIDDEN = 32
SDXL_TE2_PROJECTION = 24
SDXL_TIME_DIM = 8
SDXL_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=SDXL_TE1_HIDDEN + SDXL_TE2_HIDDEN,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_TIME_DIM,
    projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_TE2_PROJECTION,
    norm_num_groups=32,
)
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
OPENCLIP_PARTS = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
)


def sdxl_model(seed: int = 0) -> TinyModel:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = randomize_(UNet2DConditionModel(**SDXL_UNET_CONFIG), seed).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te1 = randomize_(CLIPTextModel(clip_config(hidden=SDXL_TE1_HIDDEN)), seed + 1).eval()
        te2_config = clip_config(hidden=SDXL_TE2_HIDDEN, projection=SDXL_TE2_PROJECTION, act="gelu")
        te2 = randomize_(CLIPTextModelWithProjection(te2_config), seed + 2).eval()
    names = unet_to_ldm(unet.state_dict(), unet.config)
    canonical = {SD_UNET + ldm: ("unet", key) for key, ldm in names.items()}
    canonical.update({SDXL_TE1 + clip_checkpoint_name(key): ("text_encoder", key) for key in te1.state_dict()})
    for key in te2.state_dict():
        openclip = openclip_name(key)
        for name in "qkv":
            # the engine's canonical names for the row thirds of in_proj (see SDXL in the engine)
            marker = f".self_attn.{name}_proj."
            if marker in key:
                layer = clip_checkpoint_name(key).split(".")[3]
                param = key.rsplit(".", 1)[1]
                canonical[f"{SDXL_TE2}transformer.resblocks.{layer}.attn.{name}_proj.{param}"] = ("text_encoder_2", key)
                break
        else:
            canonical[SDXL_TE2 + openclip] = ("text_encoder_2", key)
    return TinyModel({"unet": unet, "text_encoder": te1, "text_encoder_2": te2}, "sdxl", canonical)


def openclip_name(hf_key: str) -> str:
    """An HF CLIPTextModelWithProjection parameter's OpenCLIP name (q/k/v: their fused in_proj)."""
    hf_key = clip_checkpoint_name(hf_key)
    if hf_key == "text_projection.weight":
        return "text_projection"
    if hf_key == "text_model.embeddings.token_embedding.weight":
        return "token_embedding.weight"
    if hf_key == "text_model.embeddings.position_embedding.weight":
        return "positional_embedding"
    if hf_key.startswith("text_model.final_layer_norm."):
        return "ln_final." + hf_key.rsplit(".", 1)[1]
    prefix = "text_model.encoder.layers."
    if hf_key.startswith(prefix):
        layer, _, rest = hf_key[len(prefix) :].partition(".")
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            return f"transformer.resblocks.{layer}.attn.in_proj_" + rest.rsplit(".", 1)[1]
        for hf_part, oc_part in OPENCLIP_PARTS:
            if rest.startswith(hf_part):
                return f"transformer.resblocks.{layer}.{oc_part}{rest[len(hf_part) :]}"
    raise KeyError(f"no OpenCLIP name for {hf_key}")


def te2_to_openclip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModelWithProjection state dict -> OpenCLIP-G layout (fused in_proj q|k|v,
    ``text_projection`` as a raw [hidden, projection] matrix)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = openclip_name(key)
        if name.endswith(("in_proj_weight", "in_proj_bias")):
            if ".self_attn.q_proj." not in key:
                continue
            parts = [state_dict[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            out[name] = torch.cat(parts, dim=0)
        elif name == "text_projection":
            out[name] = value.T.contiguous()
        else:
            out[name] = value
    return out


def sdxl_checkpoint(model: TinyModel, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The SDXL single-file layout: sgm UNet, CLIP-L (HF names), OpenCLIP-G (fused)."""
    unet = model.components["unet"]
    names = unet_to_ldm(states["unet"], unet.config)
    tensors = {SD_UNET + names[key]: value for key, value in states["unet"].items()}
    tensors.update({SDXL_TE1 + clip_checkpoint_name(key): value for key, value in states["text_encoder"].items()})
    tensors.update({SDXL_TE2 + key: value for key, value in te2_to_openclip(states["text_encoder_2"]).items()})
    tensors[SDXL_TE1 + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    tensors[SD15_VAE_STANDIN] = states.get("vae_standin", {}).get("w", torch.ones(3, 32, 3, 3))
    return tensors


def checkpoint_for(model: TinyModel, states: dict[str, dict[str, torch.Tensor]], **kwargs) -> dict[str, torch.Tensor]:
    if model.layout_name == "zimage":
        return zimage_checkpoint(states["transformer"], **kwargs)
    if model.layout_name == "sd15":
        return sd15_checkpoint(model, states)
    return sdxl_checkpoint(model, states)


def variant_states(states: dict[str, dict[str, torch.Tensor]], seed: int = 1, **kwargs) -> dict[str, dict[str, torch.Tensor]]:
    """make_variant on every component (each its own seed), plus the VAE stand-in."""
    out = {name: make_variant(sd, seed=seed + 10 * i, **kwargs) for i, (name, sd) in enumerate(sorted(states.items()))}
    out["vae_standin"] = {"w": torch.ones(3, 32, 3, 3) * 1.01}
    return out


# -- an sgm-named module tree (kohya's SDXL UNet names), for LyCORIS ------------------------


class _Node(torch.nn.Module):
    pass


def ldm_module_tree(ldm_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """nn.Linear / nn.Conv2d modules at the ldm/sgm paths of a UNet state dict (no prefix).

    kohya's sd-scripts and A1111 hold the SDXL UNet under these original module names;
    LyCORIS matches ``lora_unet_<path with _>`` against module names, so it needs this tree
    (a diffusers UNet has other names). Norms are left out; only weights LoRA can target.
    """
    root = _Node()
    for key, weight in ldm_state.items():
        if not key.endswith(".weight") or weight.ndim < 2:
            continue
        path = key[: -len(".weight")].split(".")
        node = root
        for part in path[:-1]:
            if not hasattr(node, part):
                node.add_module(part, _Node())
            node = getattr(node, part)
        has_bias = key[: -len("weight")] + "bias" in ldm_state
        if weight.ndim == 2:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        else:
            layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=has_bias)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if has_bias:
                layer.bias.copy_(ldm_state[key[: -len("weight")] + "bias"])
        node.add_module(path[-1], layer)
    return root

"""Anima (circlestone-labs): Cosmos-Predict2's 2B DiT with an LLM adapter, in either layout.

ComfyUI runs it as ``comfy/ldm/anima/model.py`` (yzkee/ComfyUI @783545f6): a subclass of
Cosmos-Predict2's ``MiniTrainDIT`` (``comfy/ldm/cosmos/predict2.py``: ``blocks.N.self_attn``
/ ``cross_attn`` with ``q_proj/k_proj/v_proj/output_proj``, ``mlp.layer1/layer2``, three
``adaln_modulation_*`` per block, ``x_embedder.proj.1``, ``t_embedder.1``, ``final_layer``)
plus ``llm_adapter`` (6 blocks that turn Qwen3 hidden states into the cross-attention
context; ``llm_adapter.embed`` is an ``nn.Embedding`` of T5 token ids).
``comfy/model_detection.py`` calls a Cosmos-Predict2 file Anima when it has
``llm_adapter.blocks.0.cross_attn.q_proj.weight``; Forge Neo's ``huggingface_guess``
(nolanlane/sd-webui-forge-classic @6e1e0d5, ``detection.py``) does the same.

Layouts read: the original one under Cosmos' ``net.`` prefix (the released files), bare,
or under ``model.diffusion_model.`` / ``diffusion_model.`` (all-in-one files: text encoder
and VAE skipped and said); and diffusers' (``CosmosTransformer3DModel`` under
``transformer.`` + ``AnimaTextConditioner`` under ``text_conditioner.``). Canonical keys are
ComfyUI's module names without any prefix: ComfyUI and Neo both strip ``net.``
(``unet_prefix_from_state_dict``), so ``diffusion_model.net.<key>`` (what generic mode
wrote) matches nothing there. A Cosmos-Predict2 file (same DiT, no ``llm_adapter``) is
detected as its own kind, so an Anima base never pairs with it.

Formats, and their evidence:

- ``diffusion_model`` (default, also ``--format neo``): ``diffusion_model.<ComfyUI name>``
  lora_A/lora_B, no alpha. ComfyUI maps ``diffusion_model.<key>`` onto every weight
  (``comfy/lora.py model_lora_keys_unet``). Forge Neo (@3df257a..6e1e0d5) moves the
  llm_adapter into its text encoder (``backend/loader.py process_anima``) and renames a
  LoRA's ``diffusion_model.llm_adapter.*`` keys to ``text_encoders.qwen3_06b.llm_adapter.*``
  (``extensions-builtin/sd_forge_lora/networks.py process_anima``), which its text-encoder
  map takes; the DiT keys go through the generic ``diffusion_model.<key>`` map. Nothing is
  fused, so Neo's one patch per weight applies it whole (tests/test_anima.py emulates both).
  kohya's ``lora_unet_<key>`` would lose the llm_adapter in Neo (its rename only knows the
  ``diffusion_model.`` spelling), hence these names. ``llm_adapter.embed`` is a LoRA too:
  both WebUIs patch the weight matrix, whatever the layer. diffusers 0.42.1 converts this
  format (``_convert_non_diffusers_anima_lora_to_diffusers``) but peft's Embedding layer
  ignores lora_A/lora_B keys, so diffusers users take ``--format diffusers``.
- ``diffusers``: ``transformer.<CosmosTransformer3DModel name>`` and
  ``text_conditioner.<AnimaTextConditioner name>``, lora_A/lora_B with a peft config,
  for ``AnimaLoraLoaderMixin.load_lora_weights`` (``AnimaModularPipeline``).
  ``llm_adapter.embed`` is left out and reported: peft wants ``lora_embedding_A/B`` there
  and drops lora_A/lora_B silently.
"""

from __future__ import annotations

import re

from .base import Architecture, Group, LoraStyle, RawRef, block_level_group, count_blocks, strip_weight_suffix

# Where the DiT sits in a file, the released "net." first; the last is "net." inside an
# all-in-one file, which ComfyUI cannot load but a merge tool may still write.
PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.", "", "model.diffusion_model.net.")
DIFFUSERS_PREFIXES = ("transformer.", "")
TEXT_CONDITIONER = "text_conditioner."
ADAPTER = "llm_adapter."
EMBED = "llm_adapter.embed"
# Parts of all-in-one files and of Cosmos training checkpoints that are not the DiT.
NOT_DIT = ("text_encoders.", "vae.", "cond_stage_model.", "first_stage_model.", "conditioner.", "model.", "net.")
MARKER = "blocks.0.mlp.layer1.weight"
ADAPTER_MARKER = "llm_adapter.blocks.0.cross_attn.q_proj.weight"
DIFFUSERS_MARKER = "transformer_blocks.0.ff.net.0.proj.weight"

# ComfyUI module -> diffusers module, inside blocks.N (diffusers: transformer_blocks.N)
BLOCK = {
    "self_attn.q_proj": "attn1.to_q",
    "self_attn.k_proj": "attn1.to_k",
    "self_attn.v_proj": "attn1.to_v",
    "self_attn.output_proj": "attn1.to_out.0",
    "self_attn.q_norm": "attn1.norm_q",
    "self_attn.k_norm": "attn1.norm_k",
    "cross_attn.q_proj": "attn2.to_q",
    "cross_attn.k_proj": "attn2.to_k",
    "cross_attn.v_proj": "attn2.to_v",
    "cross_attn.output_proj": "attn2.to_out.0",
    "cross_attn.q_norm": "attn2.norm_q",
    "cross_attn.k_norm": "attn2.norm_k",
    "mlp.layer1": "ff.net.0.proj",
    "mlp.layer2": "ff.net.2",
    "adaln_modulation_self_attn.1": "norm1.linear_1",
    "adaln_modulation_self_attn.2": "norm1.linear_2",
    "adaln_modulation_cross_attn.1": "norm2.linear_1",
    "adaln_modulation_cross_attn.2": "norm2.linear_2",
    "adaln_modulation_mlp.1": "norm3.linear_1",
    "adaln_modulation_mlp.2": "norm3.linear_2",
}
TOP = {
    "x_embedder.proj.1": "patch_embed.proj",
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "t_embedding_norm": "time_embed.norm",
    "final_layer.adaln_modulation.1": "norm_out.linear_1",
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
    "final_layer.linear": "proj_out",
}
BLOCK_INVERSE = {new: old for old, new in BLOCK.items()}
TOP_INVERSE = {new: old for old, new in TOP.items()}
BLOCKS_PER_LEVEL = 7  # 28 blocks: four levels


def diffusers_name(module: str) -> str:
    """A ComfyUI module in diffusers' spelling (llm_adapter -> the text conditioner's)."""
    if module.startswith(ADAPTER):
        return TEXT_CONDITIONER + module[len(ADAPTER) :]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if match:
        return f"transformer.transformer_blocks.{match[1]}.{BLOCK.get(match[2], match[2])}"
    return "transformer." + TOP.get(module, module)


def comfy_name(module: str) -> str:
    """A diffusers module (no component prefix) of the transformer in ComfyUI's spelling."""
    match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if match:
        return f"blocks.{match[1]}.{BLOCK_INVERSE.get(match[2], match[2])}"
    return TOP_INVERSE.get(module, module)


class Anima(Architecture):
    name = "anima"
    title = "Anima"
    base_model_version = "anima"
    modelspec_architecture = "anima/lora"
    formats = {
        "diffusion_model": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none"),
        "diffusers": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none", adapter_config=True),
    }
    default_format = "diffusion_model"
    neo_format = "diffusion_model"
    format_loaders = {
        "diffusion_model": "nothing fused, exact: ComfyUI, every Forge Neo era (llm_adapter through its text encoder); "
        "diffusers drops llm_adapter.embed from it (use --format diffusers there)",
        "diffusers": "diffusers 0.42 (AnimaLoraLoaderMixin: transformer + text_conditioner), llm_adapter.embed left out; "
        "not ComfyUI/Forge Neo (use the default format there)",
    }

    def __init__(self, prefix: str, layout: str, adapter: bool = True):
        self.prefix, self.layout = prefix, layout
        if not adapter:  # the same DiT without Anima's text adapter: never paired with Anima
            self.name, self.title = "cosmos_predict2", "Cosmos-Predict2"
            self.base_model_version, self.modelspec_architecture = "cosmos_predict2", "cosmos-predict2/lora"

    @classmethod
    def detect(cls, infos):
        for prefix in PREFIXES:
            if prefix + MARKER in infos:
                return cls(prefix, "original layout", prefix + ADAPTER_MARKER in infos)
        for prefix in DIFFUSERS_PREFIXES:
            if prefix + DIFFUSERS_MARKER in infos and TEXT_CONDITIONER + "blocks.0.cross_attn.q_proj.weight" in infos:
                return cls(prefix, "diffusers layout")
        return None

    def describe(self, infos):
        head = self.prefix + ("blocks." if self.layout == "original layout" else "transformer_blocks.")
        others = sorted({k.split(".")[0] for k in infos if self._dit_key(k) is None})
        skipped = f"; {', '.join(others)} skipped (text encoder/VAE: not extracted)" if others else ""
        return f"{self.title}, {self.layout}, {count_blocks(infos, head)} blocks{skipped}"

    # -- keys ----------------------------------------------------------------------------
    def canonical(self, raw_key, info):
        key = self._dit_key(raw_key)
        if key is None:
            return []
        if key.startswith(("accum_", "pos_embedder.")) or key.endswith("._extra_state"):
            return []  # Cosmos training counters and RoPE tables: not weights
        return [(key, RawRef(raw_key), info.shape)]

    def _dit_key(self, raw_key: str) -> str | None:
        """``raw_key`` as a ComfyUI key, or None when it is not part of the DiT."""
        if self.layout == "diffusers layout":
            if raw_key.startswith(TEXT_CONDITIONER):
                return ADAPTER + raw_key[len(TEXT_CONDITIONER) :]
            if not raw_key.startswith(self.prefix) or (self.prefix == "" and raw_key.startswith(NOT_DIT)):
                return None
            module, param = strip_weight_suffix(raw_key[len(self.prefix) :])
            return f"{comfy_name(module)}.{param}" if param else module
        if not raw_key.startswith(self.prefix):
            return None
        key = raw_key[len(self.prefix) :]
        if self.prefix in ("", "diffusion_model.") and key.startswith(NOT_DIT):
            return None
        if self.prefix == "model.diffusion_model." and key.startswith("net."):
            return None
        return key

    def module_path(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        return module if param else None

    def lora_module(self, canonical_key, fmt):
        module, param = strip_weight_suffix(canonical_key)
        if not param:
            return None
        if fmt == "diffusers":
            return None if module == EMBED else diffusers_name(module)
        return "diffusion_model." + module

    def lora_aliases(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        if not param:
            return []
        names = {"diffusion_model." + module, module, "net." + module, diffusers_name(module)}
        if module.startswith(ADAPTER):  # Forge Neo's spelling of the adapter
            names.add("text_encoders.qwen3_06b." + module)
        return sorted(names)

    # -- report --------------------------------------------------------------------------
    def group(self, canonical_key):
        parts = canonical_key.split(".")
        kind = _type(canonical_key)
        if parts[0] == "blocks":
            return block_level_group(int(parts[1]), kind, BLOCKS_PER_LEVEL)
        if parts[0] == "llm_adapter":
            return Group("llm_adapter", kind, auxiliary=True, order=90)
        return Group(parts[0], kind, auxiliary=True, order=100)


def _type(key: str) -> str:
    if "_attn." in key:
        return "Attn"
    if ".mlp." in key or key.startswith("t_embedder."):
        return "FF"
    if "adaln_modulation" in key:
        return "Mod"
    if key.startswith(("x_embedder", "final_layer.linear", "llm_adapter.embed", "llm_adapter.in_proj", "llm_adapter.out_proj")):
        return "Proj"
    return "Other"

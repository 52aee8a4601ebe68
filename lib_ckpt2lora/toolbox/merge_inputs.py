"""The LoRAs a merge reads: ``FILE[:WEIGHT]`` arguments, the family of each file, and its
modules grouped across inputs by the weight they change, whatever their spelling.

A merge has no base model to match module names against, so modules are grouped by
``lora_input.normalise`` (one spelling for kohya underscores, peft/diffusers dots and
ComfyUI prefixes: ``lora_unet_a_b``, ``unet.a.b``, ``diffusion_model.a.b`` all become
``unet:a_b``); SD UNet modules spelled by their ldm/sgm path (``input_blocks_4_1_...``,
kohya SDXL) are also mapped to the diffusers path (``down_blocks_1_attentions_0_...``,
kohya SD1.5, peft) with the family's own table (architectures/sd_unet_names.py), so both
spellings of one weight meet. A family is read from the header (kohya's
``ss_base_model_version``, ``modelspec.architecture``, ours) or else from the module
names and shapes; a LoRA of another family than the first input is refused.

Not grouped: layouts that split a weight differently (Flux's fused BFL ``img_attn.qkv``
vs diffusers' separate ``to_q/to_k/to_v``); such inputs are refused in one sentence
rather than written as two modules for one weight.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..architectures import DETECTION_ORDER, Architecture
from ..architectures.generic import Generic
from ..architectures.sd_unet_names import RESNET_PARTS, TOP_LEVEL, ldm_to_diffusers
from ..architectures.zimage import RENAMES as ZIMAGE_RENAMES
from ..errors import UserError
from ..lora_input import PREFIXES, LoraModule, adapter_config_alphas, dense_delta, is_lora_file, normalise, parse_modules
from ..reading import TensorFile
from .merge import Term

FAMILIES: dict[str, type[Architecture]] = {cls.name: cls for cls in (*DETECTION_ORDER, Generic)}
# modelspec.architecture / ss_base_model_version fragments -> family (first match wins)
HEADER_HINTS = (
    ("stable-diffusion-xl", "sdxl"),
    ("sdxl", "sdxl"),
    ("stable-diffusion-v1", "sd15"),
    ("sd_v1", "sd15"),
    ("flux.2", "flux2"),
    ("flux2", "flux2"),
    ("flux", "flux"),
    ("chroma", "chroma"),
    ("z-image", "zimage"),
    ("z_image", "zimage"),
    ("qwen", "qwen_image"),
    ("lumina", "lumina2"),
    ("wan", "wan"),
)
SD_UNET_HEADS = ("down_blocks_", "up_blocks_", "mid_block_", "input_blocks_", "output_blocks_", "middle_block_", "conv_in")
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_LDM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class MergeInput:
    path: Path
    weight: float = 1.0


def parse_merge_input(text: str) -> MergeInput:
    """``FILE`` or ``FILE:WEIGHT``. Windows paths hold ':' (``C:\\x\\a.safetensors:0.5``), so
    the text splits on its last ':' only when what follows is a number."""
    text = str(text).strip()
    head, colon, tail = text.rpartition(":")
    if colon and _NUMBER.match(tail.strip()):
        weight = float(tail)
        if not math.isfinite(weight):
            raise UserError(f"The weight of {head} must be a finite number, not {tail!r}.")
        return MergeInput(Path(head), weight)
    if colon and head.lower().endswith(LORA_SUFFIXES) and not any(sep in tail for sep in "/\\"):
        raise UserError(f"The weight after {head}: must be a number such as 0.5 or -0.7, not {tail!r} (write FILE:WEIGHT).")
    return MergeInput(Path(text), 1.0)


@dataclass
class ModuleRows(LoraModule):
    """A row range of a fused module's up: one part of it (Z-Image's qkv -> to_q, to_k, to_v)."""

    rows: tuple[int, int] | None = None


@dataclass
class ModuleGroup:
    """One weight's modules across the inputs."""

    key: str  # normalise()'d name, SD UNet paths in diffusers form
    part: str  # unet / te / te2
    spellings: list[str] = field(default_factory=list)  # every input's module name for it
    members: list[tuple[int, LoraModule]] = field(default_factory=list)  # (input index, module)


class LoraInput:
    """One input LoRA: its file, weight, family and modules (headers only until read)."""

    def __init__(self, given: MergeInput):
        self.path, self.weight = given.path, given.weight
        self.file = TensorFile(given.path, role="LoRA")
        self.name = self.file.path.name
        if not is_lora_file(self.file.infos):
            raise UserError(f"{self.name} is not a LoRA (no lora_down/lora_A/LoHa/LoKr keys); --merge takes LoRA files only.")
        self.modules = parse_modules(self.file)
        for module in self.modules.values():
            if "dora" in module.tensors:
                raise UserError(
                    f"{self.name} is a DoRA (module {module.name} has dora_scale), whose effect is not a weight delta "
                    "that can be summed; merge it into a checkpoint instead."
                )
        self.config_alphas = adapter_config_alphas(self.file.metadata, self.modules)
        self.family = lora_family(self.file, self.modules)
        self.dtypes = {self.file.infos[key].dtype for m in self.modules.values() for r, key in m.tensors.items() if r != "alpha"}

    def header_shape(self, module: LoraModule) -> tuple[int, ...] | None:
        """The weight shape a plain up/down module changes, from the header alone (None otherwise)."""
        if set(module.tensors) - {"alpha"} != {"up", "down"}:
            return None
        up, down = self.file.infos[module.tensors["up"]].shape, self.file.infos[module.tensors["down"]].shape
        rows = getattr(module, "rows", None)
        return (rows[1] - rows[0] if rows else up[0], *down[1:])

    def terms(self, module: LoraModule) -> tuple[Term | None, torch.Tensor | None, tuple[int, ...]]:
        """The module's weight term (loader scale folded), its bias delta, and the weight's shape."""
        tensors = {role: self.file.get(key) for role, key in module.tensors.items()}
        if "alpha" not in tensors and module.name in self.config_alphas:
            tensors["alpha"] = torch.tensor(self.config_alphas[module.name])
        bias = tensors.pop("diff_b", None)
        bias = bias.float() * self.weight if bias is not None else None
        roles = set(tensors) - {"alpha"}
        if not roles:
            return None, bias, tuple(bias.shape)
        if roles == {"up", "down"}:
            up, down = tensors["up"].float(), tensors["down"].float()
            rank = down.shape[0]
            scale = float(tensors["alpha"]) / rank if "alpha" in tensors else 1.0
            up = up.flatten(1)
            rows = getattr(module, "rows", None)
            if rows:  # one part of a fused module: its rows of up, the whole down (exact)
                up = up[rows[0] : rows[1]]
                bias = bias[rows[0] : rows[1]] if bias is not None else None
            shape = (up.shape[0], *down.shape[1:])
            return Term(self.weight, up=up * scale, down=down.flatten(1)), bias, shape
        try:
            dense = dense_delta(module.name, {role: t.float() for role, t in tensors.items()})
        except RuntimeError as error:  # factors whose shapes do not chain
            raise UserError(f"Module {module.name} of {self.name} is damaged ({error}); check the file.") from None
        shape = tuple(dense.shape)
        return Term(self.weight, dense=dense.reshape(shape[0], -1) if dense.dim() > 1 else dense), bias, shape


def lora_family(file: TensorFile, modules: dict[str, LoraModule]) -> str:
    """The model family a LoRA is for: from its header, else from its module names and shapes."""
    meta = file.metadata
    if meta.get("ckpt2lora_architecture") in FAMILIES:
        return meta["ckpt2lora_architecture"]
    hint = f"{meta.get('modelspec.architecture', '')} {meta.get('ss_base_model_version', '')}".lower()
    for fragment, family in HEADER_HINTS:
        if fragment in hint:
            return family
    names = {normalise(name) for name in modules}
    parts = {name.partition(":")[0] for name in names}
    paths = [name.partition(":")[2] for name in names if name.startswith("unet:")]

    def width(pattern: str) -> int | None:  # a matching module's input width (down's columns)
        for module in modules.values():
            if re.search(pattern, normalise(module.name)) and "down" in module.tensors:
                return file.infos[module.tensors["down"]].shape[1]
        return None

    def rows(pattern: str) -> int | None:  # a matching module's output rows (up's rows)
        for module in modules.values():
            if re.search(pattern, normalise(module.name)) and "up" in module.tensors:
                return file.infos[module.tensors["up"]].shape[0]
        return None

    if any(p.startswith(("double_blocks_", "single_blocks_", "single_transformer_blocks_")) for p in paths):
        if any(p.startswith(("double_stream_modulation", "single_stream_modulation")) or "to_qkv_mlp_proj" in p for p in paths):
            return "flux2"
        # Flux.2 (architectures/flux2.py): 3072/4096/6144 wide, SwiGLU img_mlp.0 of 6 x width rows
        # (Flux.1: 3072 wide, 4 x width)
        hidden = width(r"(img_attn_proj|attn_to_out_0)$")
        mlp_rows = rows(r"(img_mlp_0|ff_net_0_proj)$")
        if hidden in (4096, 6144) or (hidden and mlp_rows == 6 * hidden):
            return "flux2"
        return "chroma" if any("distilled_guidance" in p for p in paths) else "flux"
    if any(re.match(r"transformer_blocks_\d+_(img|txt)_(mlp|mod)", p) for p in paths):
        return "qwen_image"
    if any(re.match(r"(noise_refiner|context_refiner|layers)_\d+_(attention|feed_forward|adaLN)", p) for p in paths):
        return "lumina2" if width(r"_attention_") == 2304 else "zimage"
    if any(re.match(r"blocks_\d+_(self_attn|cross_attn|ffn)_", p) for p in paths):  # Wan 2.1/2.2 (architectures/wan.py)
        return "wan"
    if "te2" in parts or any(p.startswith(("label_emb", "add_embedding")) for p in paths):
        return "sdxl"
    if any(p.startswith(SD_UNET_HEADS) for p in paths) or "te" in parts:
        cross = width(r"attn2_to_k$")
        deep = any(re.search(r"transformer_blocks_[1-9]", p) for p in paths)
        return "sdxl" if cross == 2048 or deep else "sd15"
    return "generic"


def family_title(family: str) -> str:
    return FAMILIES[family].title if family in FAMILIES else family


def group_modules(inputs: list[LoraInput]) -> list[ModuleGroup]:
    """Every weight any input changes, with the modules (one per input at most) that change it."""
    groups: dict[str, ModuleGroup] = {}
    for index, lora in enumerate(inputs):
        seen: dict[str, str] = {}
        for original in lora.modules.values():
            for module in _zimage_diffusers_parts(lora, original) if lora.family == "zimage" else [original]:
                part, _, path = normalise(module.name).partition(":")
                if part == "unet" and lora.family in ("sd15", "sdxl"):
                    path = ldm_path_as_diffusers(path) or path
                key = f"{part}:{path}"
                if key in seen:
                    raise UserError(
                        f"{lora.name} holds two modules for one weight ({seen[key]} and {module.name}); "
                        "the file mixes spellings, merge it from a clean copy."
                    )
                seen[key] = module.name
                group = groups.setdefault(key, ModuleGroup(key, part))
                group.spellings.append(module.name)
                group.members.append((index, module))
    flux_layout(inputs, list(groups.values()))
    for group in groups.values():  # from the headers, before any tensor is read
        shapes = [(inputs[i].name, inputs[i].header_shape(m)) for i, m in group.members]
        shapes = [(name, shape) for name, shape in shapes if shape is not None]
        for name, shape in shapes[1:]:
            if shape != shapes[0][1]:
                raise UserError(
                    f"Module {group.spellings[0]} changes a {_dims(shape)} weight in {name} but a {_dims(shapes[0][1])} one "
                    f"in {shapes[0][0]}; these LoRAs are for different models."
                )
    return list(groups.values())


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def _zimage_diffusers_parts(lora: LoraInput, module: LoraModule) -> list[LoraModule]:
    """A Z-Image module spelled in the original layout (ComfyUI: ``attention.qkv``, ``attention.out``,
    ``x_embedder``, ``final_layer``) under its diffusers name(s), so both layouts of one weight meet;
    a fused ``qkv`` becomes its three row thirds (exact: up split by rows, down shared). Only dotted
    spellings: a kohya ``lora_unet_`` name must keep the original path ComfyUI maps it by."""
    dotted = dotted_path(module.name)
    if dotted is None:
        return [module]
    renamed = dotted + "."
    for old, new in ZIMAGE_RENAMES:
        if old.startswith("."):
            renamed = renamed.replace(old, new)
        elif renamed.startswith(old):
            renamed = new + renamed[len(old) :]
    renamed = renamed[:-1]
    head = module.name[: len(module.name) - len(dotted)]
    if renamed.endswith(".attention.qkv") and set(module.tensors) - {"alpha"} == {"up", "down"}:
        third = lora.file.infos[module.tensors["up"]].shape[0] // 3
        block = renamed[: -len("qkv")]
        return [
            ModuleRows(f"{head}{block}to_{name}", module.tensors, (i * third, (i + 1) * third)) for i, name in enumerate("qkv")
        ]
    if renamed == dotted:
        return [module]
    return [LoraModule(head + renamed, module.tensors)]


def ldm_path_as_diffusers(path: str) -> str | None:
    """An SD UNet module path in ldm/sgm form, underscored (``input_blocks_4_1_proj_in``), as
    its diffusers path underscored (``down_blocks_1_attentions_0_proj_in``); None if not ldm."""
    for ldm, _ in TOP_LEVEL.items():
        if path == ldm.replace(".", "_"):
            return ldm_to_diffusers(ldm).replace(".", "_")
    match = _LDM_BLOCK.match(path)
    if match:
        head, rest = f"{match.group(1)}.{match.group(2)}.{match.group(3)}", match.group(4)
    else:
        match = _LDM_MIDDLE.match(path)
        if not match:
            return None
        head, rest = f"middle_block.{match.group(1)}", match.group(2)
    rest = next((part for part in RESNET_PARTS if part.replace(".", "_") == rest), rest)
    diffusers = ldm_to_diffusers(f"{head}.{rest}")
    return None if diffusers is None else diffusers.replace(".", "_")


def diffusers_path_as_ldm(path: str) -> str | None:
    """The inverse of ``ldm_path_as_diffusers`` (underscored paths), for SDXL's kohya names."""
    whole, prefixes = _ldm_inverse()
    if path in whole:
        return whole[path]
    for head in sorted(prefixes, key=len, reverse=True):
        if path.startswith(head):
            return prefixes[head] + path[len(head) :]
    return None


@functools.cache
def _ldm_inverse() -> tuple[dict[str, str], dict[str, str]]:
    """Every ldm UNet module the SD tables name, mapped back: whole paths (res blocks, samplers,
    top level) and attention-block prefixes (``down_blocks_1_attentions_0_`` -> ``input_blocks_4_1_``)."""
    whole, prefixes = {}, {}
    # inner 2 first: an SDXL up level with attention (all that have an upsampler) keeps it at .2.conv
    heads = [
        f"{kind}.{block}.{inner}" for kind in ("input_blocks", "output_blocks") for block in range(12) for inner in (2, 1, 0)
    ]
    heads += [f"middle_block.{inner}" for inner in range(3)]
    for head in heads:
        for rest in (*RESNET_PARTS, "op", "conv"):
            diffusers = ldm_to_diffusers(f"{head}.{rest}")
            if diffusers is not None:
                whole.setdefault(diffusers.replace(".", "_"), f"{head}.{rest}".replace(".", "_"))
        diffusers = ldm_to_diffusers(f"{head}.MARK")
        if diffusers is not None and diffusers.endswith(".MARK") and "attentions" in diffusers:
            prefixes[diffusers[: -len("MARK")].replace(".", "_")] = f"{head}.".replace(".", "_")
    for ldm in TOP_LEVEL:
        whole[ldm_to_diffusers(ldm).replace(".", "_")] = ldm.replace(".", "_")
    return whole, prefixes


def flux_layout(inputs: list[LoraInput], groups) -> str | None:
    """Flux-style families name one weight two ways that split it differently (BFL's fused
    ``double_blocks_N_img_attn_qkv``, kohya/ComfyUI, vs diffusers' ``transformer_blocks_N_attn_to_q``):
    the one layout the inputs use ("bfl" or "diffusers"), None for other families; two is refused."""
    if inputs[0].family not in ("flux", "flux2", "chroma"):
        return None
    layouts: dict[str, str] = {}
    for group in groups:
        path = group.key.partition(":")[2]
        for index, _ in group.members:
            if path.startswith(("double_blocks_", "single_blocks_")):
                layouts.setdefault("bfl", inputs[index].name)
            elif path.startswith(("transformer_blocks_", "single_transformer_blocks_")):
                layouts.setdefault("diffusers", inputs[index].name)
    if len(layouts) > 1:
        raise UserError(
            f"{layouts['bfl']} names Flux modules in the BFL layout (kohya/ComfyUI) and {layouts['diffusers']} in the "
            "diffusers layout, which split q/k/v differently; convert one of them to the other's layout first "
            "(ckpt2lora does not merge across layouts yet)."
        )
    return next(iter(layouts), None)


def dotted_path(name: str) -> str | None:
    """A module name's path without its prefix when it is spelled with dots (peft, diffusers,
    ComfyUI: ``diffusion_model.x_embedder`` too), which is what dotted output formats need;
    None for kohya underscore names."""
    dotted_prefix, changed = False, True
    while changed:
        changed = False
        for prefix, _ in PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
                dotted_prefix = dotted_prefix or prefix.endswith(".")
    return name if "." in name or dotted_prefix else None

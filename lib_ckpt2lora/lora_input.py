"""LoRA files given as a variant: every common format rebuilt as a dense delta per weight.

Module names are matched against the base's own weights: every name the base's weights
may carry in any LoRA style (kohya underscores, diffusers/peft dots, ComfyUI prefixes,
the original Z-Image spellings) is normalised to one form, so kohya underscore names
are looked up, never naively un-underscored. A LoRA module that lands on no weight of
the base is an error naming it: the LoRA is for another model.

Formulas (scale = alpha / rank, or 1 without alpha):
- LoRA (kohya/peft):  scale * up @ down; Tucker ``lora_mid``: up, mid, down contracted.
- LoHa:  scale * (w1a @ w1b) * (w2a @ w2b), with Tucker ``hada_t1/t2`` where present.
- LoKr:  scale * kron(w1, w2), either factor possibly itself a product; scale is 1 unless
  a factor is decomposed (then alpha / its rank).
- full:  ``.diff`` (weight) and ``.diff_b`` (bias) as they are.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .metadata import ADAPTER_METADATA_KEY
from .reading import TensorFile

# Suffix (after the module name) -> (role in the formula)
SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".hada_w1_a": "w1a",
    ".hada_w1_b": "w1b",
    ".hada_w2_a": "w2a",
    ".hada_w2_b": "w2b",
    ".hada_t1": "t1",
    ".hada_t2": "t2",
    ".lokr_w1": "k1",
    ".lokr_w1_a": "k1a",
    ".lokr_w1_b": "k1b",
    ".lokr_w2": "k2",
    ".lokr_w2_a": "k2a",
    ".lokr_w2_b": "k2b",
    ".lokr_t2": "kt2",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".alpha": "alpha",
    ".dora_scale": "dora",
}
# Longest first, so ".lora_down.weight" wins over ".diff" style shorter endings.
_ORDERED_SUFFIXES = sorted(SUFFIXES, key=len, reverse=True)
# Prefix -> the sub-model it addresses; "unet" covers diffusion models of every kind.
PREFIXES = (
    ("base_model.model.", None),
    ("lycoris_", "unet"),
    ("lora_unet_", "unet"),
    ("lora_te1_", "te"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
    ("diffusion_model.", "unet"),
    ("transformer.", "unet"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),
)
LORA_MARKERS = (
    ".lora_down.",
    ".lora_up.",
    ".lora_A.",
    ".lora_B.",
    ".hada_w1_",
    ".lokr_w",
    "_lora.up.",
    ".lora.up.",
    ".lora_linear_layer.up.",
)
# Where diffusers/peft keep alpha when a file has no ``.alpha`` tensors: a LoraConfig as
# JSON in the header, its keys optionally prefixed by the pipeline component.
COMPONENTS = {"unet": ("transformer.", "unet."), "te": ("text_encoder.",), "te2": ("text_encoder_2.",)}
LORA_ENDINGS = (".diff", ".diff_b")


def is_lora_file(infos) -> bool:
    return any(key.endswith(LORA_ENDINGS) or any(m in key for m in LORA_MARKERS) for key in infos)


def normalise(name: str) -> str:
    """One spelling for a module name: '<sub-model>:<path with underscores>'."""
    part = "unet"
    changed = True
    while changed:
        changed = False
        for prefix, kind in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                part = kind or part
                changed = True
    if part == "unet" and name.startswith(("cond_stage_model.", "conditioner.")):
        part = "te"
    return f"{part}:{name.replace('.', '_')}"


def split_key(key: str) -> tuple[str, str] | None:
    for suffix in _ORDERED_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], SUFFIXES[suffix]
    return None


@dataclass
class Target:
    """Where one LoRA module lands: canonical weight keys, each with a row range of the delta."""

    parts: list[tuple[str, tuple[int, int] | None]]
    bias_key: str | None = None


@dataclass
class LoraModule:
    name: str
    tensors: dict[str, str] = field(default_factory=dict)  # role -> key in the file


class LoraSource:
    """A LoRA file as a variant: dense deltas rebuilt for the base's canonical weights."""

    def __init__(self, file: TensorFile, arch, base):
        self.file = file
        self.name = file.path.name
        modules = parse_modules(file)
        self.config_alphas = adapter_config_alphas(file.metadata, modules)
        index = alias_index(arch, base)
        self.targets: dict[str, list[tuple[LoraModule, str, tuple[int, int] | None]]] = defaultdict(list)
        unmatched = []
        for module in modules.values():
            if "dora" in module.tensors:
                raise UserError(
                    f"{self.name} is a DoRA (module {module.name} has dora_scale), which is not a plain weight "
                    "delta; ckpt2lora cannot use it as a variant. Merge it into a checkpoint first."
                )
            target = index.get(normalise(module.name))
            if target is None:
                unmatched.append(module.name)
                continue
            roles = set(module.tensors) - {"alpha"}
            if roles == {"diff_b"}:
                if target.bias_key is None:
                    unmatched.append(module.name + ".diff_b")
                    continue
                self.targets[target.bias_key].append((module, "bias", None))
                continue
            for key, rows in target.parts:
                self.targets[key].append((module, "weight", rows))
            if "diff_b" in roles and target.bias_key is not None:
                self.targets[target.bias_key].append((module, "bias", None))
        if unmatched:
            sample = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
            raise UserError(
                f"{len(unmatched)} of the {len(modules)} modules of the LoRA {self.name} match no weight of the "
                f"base {base.file.path.name} ({sample}); is the LoRA for another model?"
            )
        if not self.targets:
            raise UserError(f"The LoRA {self.name} holds no module that ckpt2lora can read.")
        self.shapes = {key: base.shapes[key] for key in self.targets}

    def load(self, key: str):
        loaded = []
        for module, kind, rows in self.targets[key]:
            tensors = {role: self.file.get(k) for role, k in module.tensors.items()}
            if "alpha" not in tensors and module.name in self.config_alphas:
                tensors["alpha"] = torch.tensor(self.config_alphas[module.name])
            loaded.append((module, kind, rows, tensors))
        return loaded

    def delta(self, loaded, base: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(base)
        for module, kind, rows, tensors in loaded:
            tensors = {role: t.to(base.device).float() for role, t in tensors.items()}
            if kind == "bias":
                total += tensors["diff_b"].reshape(base.shape)
                continue
            dense = dense_delta(module.name, tensors)
            if rows is not None:
                dense = dense.flatten(1)[rows[0] : rows[1]]
            total += dense.reshape(base.shape)
        return total


def adapter_config_alphas(metadata: dict[str, str], modules: dict[str, LoraModule]) -> dict[str, float]:
    """Alphas that a diffusers/peft LoRA keeps in its header instead of ``.alpha`` tensors."""
    try:
        config = json.loads(metadata.get(ADAPTER_METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        return {}
    if not isinstance(config, dict) or not config:
        return {}
    alphas = {}
    for name in modules:
        part, _, path = normalise(name).partition(":")
        head = name.partition(".")[0] + "."
        own = head + "lora_alpha" in config  # a component of its own (Anima's text_conditioner.)
        for prefix in (head,) if own else ("", *COMPONENTS.get(part, ())):
            alpha = config.get(prefix + "lora_alpha")
            if alpha is None:
                continue
            module_path = name[len(head) :] if own else _peft_module_path(name)
            for pattern, value in (config.get(prefix + "alpha_pattern") or {}).items():
                if re.match(rf"(.*\.)?({pattern})$", module_path):
                    alpha = value
                    break
            alphas[name] = float(alpha)
            break
    return alphas


def _peft_module_path(name: str) -> str:
    for prefix, _ in PREFIXES:
        name = name.removeprefix(prefix)
    return name


def parse_modules(file: TensorFile) -> dict[str, LoraModule]:
    modules: dict[str, LoraModule] = {}
    ignored = []
    for key in file.infos:
        split = split_key(key)
        if split is None:
            ignored.append(key)
            continue
        name, role = split
        modules.setdefault(name, LoraModule(name)).tensors[role] = key
    if ignored and not modules:
        raise UserError(f"{file.path.name} does not look like a LoRA this tool can read (e.g. key {ignored[0]}).")
    return modules


def alias_index(arch, base) -> dict[str, Target]:
    """Normalised LoRA module name -> the base weights it addresses."""
    index: dict[str, Target] = {}
    for key in base.shapes:
        module, _, param = key.rpartition(".")
        if param not in ("weight", "bias"):
            continue
        for alias in arch.lora_aliases(key):
            entry = index.setdefault(normalise(alias), Target([]))
            if param == "weight":
                entry.parts = [(key, None)]
            else:
                entry.bias_key = key
    for name, parts in arch.fused_aliases(list(base.shapes)).items():
        start, ranges = 0, []
        for part in parts:
            rows = base.shapes[part][0]
            ranges.append((part, (start, start + rows)))
            start += rows
        index.setdefault(normalise(name), Target([])).parts = ranges
    return {name: target for name, target in index.items() if target.parts or target.bias_key}


def dense_delta(name: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full delta one LoRA module adds to its weight (flattened to 2-D for convs)."""
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "diff" in t:
        return t["diff"]
    if "up" in t and "down" in t:
        up, down = t["up"], t["down"]
        rank = down.shape[0]
        scale = alpha / rank if alpha is not None else 1.0
        if "mid" in t:  # Tucker: down [r,in,1,1], mid [r,r,k,k], up [out,r,1,1]
            dense = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), t["mid"], down.flatten(1))
            return scale * dense
        dense = up.flatten(1) @ down.flatten(1)
        return scale * (dense.reshape(dense.shape[0], *down.shape[1:]) if down.dim() > 2 else dense)
    if "w1a" in t:
        rank = t["w1b"].shape[0]
        scale = alpha / rank if alpha is not None else 1.0
        w1 = _tucker(t.get("t1"), t["w1a"], t["w1b"])
        w2 = _tucker(t.get("t2"), t["w2a"], t["w2b"])
        return scale * w1 * w2
    if "k1" in t or "k1a" in t:
        decomposed_rank = None
        if "k1" in t:
            w1 = t["k1"]
        else:
            w1, decomposed_rank = t["k1a"] @ t["k1b"], t["k1b"].shape[0]
        if "k2" in t:
            w2 = t["k2"]
        elif "kt2" in t:
            w2, decomposed_rank = _tucker(t["kt2"], t["k2a"], t["k2b"]), t["k2b"].shape[0]
        else:
            w2, decomposed_rank = t["k2a"] @ t["k2b"].flatten(1), t["k2b"].shape[0]
            if t["k2b"].dim() > 2:
                w2 = w2.reshape(t["k2a"].shape[0], *t["k2b"].shape[1:])
        scale = alpha / decomposed_rank if alpha is not None and decomposed_rank else 1.0
        if w2.dim() > 2:
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return scale * torch.kron(w1.contiguous(), w2.contiguous())
    roles = ", ".join(sorted(t))
    raise UserError(f"LoRA module {name} has an incomplete set of tensors ({roles}); the file may be damaged.")


def _tucker(core, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, or with a Tucker core [r, r, k, k]: LyCORIS's rebuild of a conv factor."""
    if core is None:
        product = a @ b.flatten(1)
        return product.reshape(a.shape[0], *b.shape[1:]) if b.dim() > 2 else product
    return torch.einsum("ijkl,jr,ip->prkl", core, b, a).contiguous()

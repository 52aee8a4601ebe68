"""Z-Image (Turbo and Base): the 6B single-stream DiT, in either of its two layouts.

Canonical keys are the diffusers names (``layers.0.attention.to_q.weight``): the
original layout's fused ``attention.qkv`` is split by rows into to_q/to_k/to_v, so a
LoRA addresses q, k and v separately, which is how every loader we checked applies it
(ComfyUI and Forge Neo map each of to_q/to_k/to_v onto a row range of qkv; diffusers has
no qkv module at all). Both layouts, bare or under ``model.diffusion_model.`` (all-in-one
files) or ``transformer.``, are accepted and can be mixed between base and variant.

Which format serves which loader (SPEC section 4, issue 11):

- default ``diffusion_model`` (and ``diffusers``): q/k/v split. Exact in ComfyUI,
  diffusers 0.36-0.42 and Forge Neo builds whose patcher keeps every patch of a weight.
  The Neo era of nolanlane/sd-webui-forge-classic @3df257a keeps ONE patch per weight
  key (``backend/patcher/base.py ModelPatcher.add_patches``): to_q/to_k/to_v all land on
  the fused ``attention.qkv.weight``, the last one wins, q and k are lost (error 1.0).
- ``comfy`` (= ``--format neo`` for Z-Image; the tab's default inside Forge Neo):
  ComfyUI's own names with ONE fused ``attention.qkv`` module, so every Neo era and
  ComfyUI apply all of it; diffusers drops fused qkv keys. The fused module is
  block-diagonal (block_lora.py): up = blockdiag(up_q, up_k, up_v), down = [down_q;
  down_k; down_v], each part with its own energy-rule rank, so its product equals the
  split LoRA's, part by part. ``--rank N`` means N per part: the qkv module has rank 3N
  (the cap likewise applies per part, so at most 3 x --rank-max).

Measured (tests/measure_fused_qkv.py 3840 0.3 / 0.05): q, k, v deltas
changing independently (full-rank noisy, norms 1 : 0.4 : 1.6, rounded through bf16),
per-part relative error q / k / v, and qkv bytes in 16 bits, 3840 wide:

    noise 30%, auto (0.95, cap 64)   split 0.344/0.451/0.324  2.95 MB
      one SVD, rank cap 64 (old comfy)     0.369/0.503/0.335  1.97 MB
      one SVD, energy rule, cap 192        0.344/0.469/0.305  5.90 MB
      block-diagonal                       0.344/0.451/0.324  5.90 MB
    noise 30%, --rank 16             split 0.381/0.477/0.363  0.74 MB
      one SVD, rank 16 (old comfy)         0.459/0.618/0.395  0.49 MB
      one SVD, rank 48                     0.380/0.519/0.343  1.47 MB
      block-diagonal                       0.381/0.477/0.363  1.47 MB
    noise 5%, auto                   split 0.222/0.360/0.221  (ranks 27/64/16) 1.64 MB
      one SVD, energy rule                 0.251/0.446/0.186  (rank 48)  1.47 MB
      one SVD, rank 107 (= 27+64+16)       0.208/0.396/0.149  3.29 MB
      block-diagonal                       0.222/0.360/0.221  3.29 MB

One SVD of the stacked q|k|v spends the budget on the part that changed most and loses
the quiet one (k: 0.45-0.52 against 0.36-0.48), at any rank; only the block-diagonal
module loses nothing against the split format. Its price is the zeros in up: twice the
split format's qkv bytes, about +26% for a whole Z-Image LoRA at rank 64 (5.67 M -> 7.14 M
values per block).
"""

from __future__ import annotations

from .base import KOHYA_STYLE, Architecture, Group, LoraStyle, RawRef, block_level_group, strip_weight_suffix

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
# original name piece -> diffusers name piece (str.replace on the key, in this order)
RENAMES = (
    ("x_embedder.", "all_x_embedder.2-1."),
    ("final_layer.", "all_final_layer.2-1."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
)
AUX_NAMES = {
    "all_x_embedder.2-1": "x_embedder",
    "all_final_layer.2-1": "final_layer",
}
BLOCKS_PER_LEVEL = 6
QKV_WEIGHTS = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")


def original_name(module: str) -> str:
    """A diffusers module path in the original layout's spelling (qkv stays split)."""
    dotted = module + "."
    for old, new in RENAMES:
        if new.startswith("."):
            dotted = dotted.replace(new, old)
        elif dotted.startswith(new):
            dotted = old + dotted[len(new) :]
    return dotted[:-1]


class ZImage(Architecture):
    name = "zimage"
    title = "Z-Image"
    base_model_version = "z_image"
    modelspec_architecture = "Z-Image/lora"
    formats = {
        # diffusers module names under ComfyUI's prefix with alpha = own rank, plus a peft
        # config in the header: loads exactly in ComfyUI, Forge Neo and diffusers 0.36,
        # 0.37 and 0.42 (0.37 needs the alphas, 0.36/0.37 the config when ranks differ).
        "diffusion_model": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="own", adapter_config=True),
        "diffusers": LoraStyle(".lora_A.weight", ".lora_B.weight", alpha="none", adapter_config=True),
        # fused block-diagonal qkv (see above): every Neo era and ComfyUI, not diffusers
        "comfy": KOHYA_STYLE,
    }
    default_format = "diffusion_model"
    neo_format = "comfy"
    _SPLIT_IN_OLD_NEO = (
        "; Forge Neo builds that keep one patch per weight (e.g. nolanlane/sd-webui-forge-classic "
        "@3df257a) apply only v of each attention q/k/v: use --format neo there"
    )
    format_loaders = {
        "diffusion_model": "q/k/v split: ComfyUI, diffusers 0.36-0.42, Forge Neo builds that keep every patch"
        + _SPLIT_IN_OLD_NEO,
        "diffusers": "q/k/v split: diffusers 0.36-0.42, ComfyUI, Forge Neo builds that keep every patch" + _SPLIT_IN_OLD_NEO,
        "comfy": "one fused q|k|v module per attention, as exact as the split one: ComfyUI and every Forge Neo era; "
        "diffusers drops its qkv modules (use the default format there)",
    }

    def __init__(self, prefix: str):
        self.prefix = prefix

    @classmethod
    def detect(cls, infos):
        for prefix in PREFIXES:
            if prefix + "cap_embedder.1.weight" in infos and (
                prefix + "layers.0.attention.qkv.weight" in infos or prefix + "layers.0.attention.to_q.weight" in infos
            ):
                return cls(prefix)
        return None

    def describe(self, infos):
        fused = self.prefix + "layers.0.attention.qkv.weight" in infos
        blocks = sum(1 for k in infos if k.startswith(self.prefix + "layers.") and k.endswith("attention_norm1.weight"))
        layout = "original layout" if fused else "diffusers layout"
        extra = ", all-in-one with text encoder and VAE" if any(k.startswith(("text_encoders.", "vae.")) for k in infos) else ""
        return f"Z-Image, {layout}, {blocks} blocks{extra}"

    def canonical(self, raw_key, info):
        if not raw_key.startswith(self.prefix):
            return []
        key = raw_key[len(self.prefix) :]
        if self.prefix == "" and key.startswith(("text_encoders.", "vae.", "model.")):
            return []
        for old, new in RENAMES:
            if old.startswith("."):
                key = key.replace(old, new)
            elif key.startswith(old):
                key = new + key[len(old) :]
        if key.endswith(".attention.qkv.weight"):
            third = info.shape[0] // 3
            block = key[: -len(".qkv.weight")]
            return [
                (f"{block}.to_{name}.weight", RawRef(raw_key, (i * third, (i + 1) * third)), (third, *info.shape[1:]))
                for i, name in enumerate("qkv")
            ]
        return [(key, RawRef(raw_key), info.shape)]

    def module_path(self, canonical_key):
        module, param = strip_weight_suffix(canonical_key)
        return module if param else None

    def lora_module(self, canonical_key, fmt):
        if fmt != "comfy":
            return super().lora_module(canonical_key, fmt)
        module, param = strip_weight_suffix(canonical_key)
        if not param:
            return None
        if module.endswith(".attention.to_q"):
            module = module[: -len("to_q")] + "qkv"
        return "diffusion_model." + original_name(module)

    def fusion(self, canonical_key, fmt):
        if fmt != "comfy" or not canonical_key.endswith(QKV_WEIGHTS):
            return None
        if not canonical_key.endswith(".to_q.weight"):
            return ()
        block = canonical_key[: -len("to_q.weight")]
        return tuple(f"{block}to_{name}.weight" for name in "qkv")

    def lora_aliases(self, canonical_key):
        names = set(super().lora_aliases(canonical_key))
        module, param = strip_weight_suffix(canonical_key)
        if param:
            names.add(original_name(module))
        return sorted(names)

    def fused_aliases(self, canonical_keys):
        fused = {}
        for key in canonical_keys:
            if key.endswith(".attention.to_q.weight"):
                block = key[: -len(".to_q.weight")]
                parts = [f"{block}.to_{name}.weight" for name in "qkv"]
                fused[block + ".qkv"] = parts
        return fused

    def format_prefix(self, fmt):
        return "transformer." if fmt == "diffusers" else "diffusion_model."

    def group(self, canonical_key):
        parts = canonical_key.split(".")
        kind = _zimage_type(canonical_key)
        if parts[0] == "layers":
            return block_level_group(int(parts[1]), kind, BLOCKS_PER_LEVEL)
        top = AUX_NAMES.get(".".join(parts[:2]), parts[0])
        return Group(top, kind, auxiliary=True, order=100)


def _zimage_type(key: str) -> str:
    if ".attention." in key:
        return "Attn"
    if ".feed_forward." in key or key.startswith("t_embedder."):
        return "FF"
    if "adaLN_modulation" in key:
        return "Mod"
    if key.startswith(("all_x_embedder", "all_final_layer.2-1.linear")):
        return "Proj"
    return "Other"

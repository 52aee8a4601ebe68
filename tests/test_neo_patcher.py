"""Z-Image LoRAs through Forge Neo's and ComfyUI's patching semantics (issue 11 section 1).

The Neo era of nolanlane/sd-webui-forge-classic @3df257a keeps ONE LoRA patch per weight
key: ``backend/patcher/base.py ModelPatcher.add_patches`` builds each LoRA's patches as
``current_patches = self.patches.get(key, [])`` + this patch, then
``lora_patches[key] = current_patches`` (``self.patches`` holds no LoRA patches, so a
second patch of the same weight replaces the first). Split to_q/to_k/to_v modules all
patch the fused ``attention.qkv.weight`` (each with its row offset), so only the last
survives. ComfyUI's ``ModelPatcher.add_patches`` (yzkee/ComfyUI @783545f6) appends.

Emulated here, from those sources, on a tiny real Z-Image model in the original layout
(the state dict Neo's and ComfyUI's ``NextDiT`` hold, under ``diffusion_model.``):

- the key map (Neo ``modules_forge/packages/comfy/lora.py model_lora_keys_unet`` and
  ``utils.z_image_to_diffusers``; ComfyUI's ``comfy/lora.py`` has the same rules for
  ``Lumina2``): every model key without ``.weight`` (and ``lora_unet_`` + underscores),
  and the diffusers names under ``diffusion_model.``, ``transformer.``, ``lycoris_``
  (underscores) or bare, with to_q/to_k/to_v mapped to a row range of qkv;
- ``load_lora``: lora_up/down, lora_A/B (+ ``.alpha``: scale alpha / rank, else 1),
  ``.diff``, ``.diff_b``;
- ``add_patches``: one patch per weight (Neo @3df257a) or every patch (ComfyUI, later Neo);
- the merge: weight[rows] += scale * up @ down.

This is an honest emulation, not the WebUIs' code: the issue's run of Neo's own code path
is what it reproduces (q and k lost, relative error exactly 1.0, with the split format).
"""

from __future__ import annotations

import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from safetensors.torch import load_file

from lib_ckpt2lora.options import FORMATS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM = tm.ZIMAGE_CONFIG["dim"]
PREFIX = "diffusion_model."
TOLERANCE = 1e-3
NOT_LORA = ("pad_token",)  # parameters, not layers: no LoRA module addresses them


# -- the loaders, emulated ---------------------------------------------------------------------


def z_image_to_diffusers(config: dict) -> dict[str, object]:
    """diffusers name -> original model key, or (qkv key, (dim, start, length)) for q/k/v."""
    key_map: dict[str, object] = {}

    def block(source: str, target: str, adaln: bool = True) -> None:
        for end in ("weight", "bias"):
            qkv = f"{target}.attention.qkv.{end}"
            for i, name in enumerate("qkv"):
                key_map[f"{source}.attention.to_{name}.{end}"] = (qkv, (0, i * DIM, DIM))
        names = {
            "attention.norm_q.weight": "attention.q_norm.weight",
            "attention.norm_k.weight": "attention.k_norm.weight",
            "attention.to_out.0.weight": "attention.out.weight",
            "attention.to_out.0.bias": "attention.out.bias",
        }
        for same in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            names[f"{same}.weight"] = f"{same}.weight"
        for w in ("w1", "w2", "w3"):
            names[f"feed_forward.{w}.weight"] = f"feed_forward.{w}.weight"
        if adaln:
            names["adaLN_modulation.0.weight"] = "adaLN_modulation.0.weight"
            names["adaLN_modulation.0.bias"] = "adaLN_modulation.0.bias"
        for source_name, target_name in names.items():
            key_map[f"{source}.{source_name}"] = f"{target}.{target_name}"

    for i in range(config["n_layers"]):
        block(f"layers.{i}", f"{PREFIX}layers.{i}")
    for i in range(config["n_refiner_layers"]):
        block(f"context_refiner.{i}", f"{PREFIX}context_refiner.{i}")
        block(f"noise_refiner.{i}", f"{PREFIX}noise_refiner.{i}")
    for original, diffusers in (
        ("final_layer.linear.weight", "all_final_layer.2-1.linear.weight"),
        ("final_layer.linear.bias", "all_final_layer.2-1.linear.bias"),
        ("final_layer.adaLN_modulation.1.weight", "all_final_layer.2-1.adaLN_modulation.1.weight"),
        ("final_layer.adaLN_modulation.1.bias", "all_final_layer.2-1.adaLN_modulation.1.bias"),
        ("x_embedder.weight", "all_x_embedder.2-1.weight"),
        ("x_embedder.bias", "all_x_embedder.2-1.bias"),
        ("cap_embedder.0.weight", "cap_embedder.0.weight"),
        ("cap_embedder.1.weight", "cap_embedder.1.weight"),
        ("cap_embedder.1.bias", "cap_embedder.1.bias"),
        ("t_embedder.mlp.0.weight", "t_embedder.mlp.0.weight"),
        ("t_embedder.mlp.0.bias", "t_embedder.mlp.0.bias"),
        ("t_embedder.mlp.2.weight", "t_embedder.mlp.2.weight"),
        ("t_embedder.mlp.2.bias", "t_embedder.mlp.2.bias"),
    ):
        key_map[diffusers] = PREFIX + original
    return key_map


def lora_key_map(model_state: dict[str, torch.Tensor]) -> dict[str, object]:
    """LoRA module name -> model key (or (key, offset)), as model_lora_keys_unet builds it."""
    key_map: dict[str, object] = {}
    for key in model_state:
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[len(PREFIX) : -len(".weight")].replace(".", "_")] = key
            key_map[key[: -len(".weight")]] = key  # the generic rule: original names
        else:
            key_map[key] = key
    for name, target in z_image_to_diffusers(tm.ZIMAGE_CONFIG).items():
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            for spelling in (PREFIX + module, "transformer." + module, "lycoris_" + module.replace(".", "_"), module):
                key_map[spelling] = target
    return key_map


def load_lora(lora: dict[str, torch.Tensor], key_map: dict[str, object]):
    """(patches as (target, kind, tensors, scale) in key-map order, keys nothing consumed)."""
    patches, consumed = [], set()
    for name, target in key_map.items():
        for up_name, down_name in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
            up, down = f"{name}.{up_name}", f"{name}.{down_name}"
            if up in lora and down in lora:
                alpha = f"{name}.alpha"
                rank = lora[down].shape[0]
                scale = float(lora[alpha]) / rank if alpha in lora else 1.0
                consumed.update({up, down} | ({alpha} if alpha in lora else set()))
                patches.append((target, "lora", (lora[up], lora[down]), scale))
                break
        for suffix, bias in ((".diff", False), (".diff_b", True)):
            if name + suffix in lora:
                where = target if not bias else (target if isinstance(target, tuple) else target[: -len(".weight")] + ".bias")
                consumed.add(name + suffix)
                patches.append((where, "diff", (lora[name + suffix],), 1.0))
    return patches, set(lora) - consumed


def add_patches(patches, model_state, one_per_key: bool) -> dict[str, list]:
    """weight key -> its patches: Neo @3df257a keeps the last one, ComfyUI all."""
    kept: dict[str, list] = {}
    for target, kind, tensors, scale in patches:
        key, offset = target if isinstance(target, tuple) else (target, None)
        if key not in model_state:
            continue
        entry = (offset, kind, tensors, scale)
        kept[key] = [entry] if one_per_key else kept.get(key, []) + [entry]
    return kept


def patched(model_state, kept) -> dict[str, torch.Tensor]:
    out = {key: value.clone() for key, value in model_state.items()}
    for key, entries in kept.items():
        for offset, kind, tensors, scale in entries:
            weight = out[key] if offset is None else out[key].narrow(offset[0], offset[1], offset[2])
            if kind == "lora":
                up, down = tensors
                change = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape) * scale
            else:
                change = tensors[0].float().reshape(weight.shape)
            weight += change
    return out


# -- the model, the LoRAs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(one_torch_thread, tmp_path_factory):
    return lc.make_pair(tm.zimage_model(seed=0), tmp_path_factory.mktemp("neo"), layout="original", prefix="")


def neo_state(states) -> dict[str, torch.Tensor]:
    """The state dict of Neo's / ComfyUI's NextDiT: original names under diffusion_model."""
    return {PREFIX + key: value.float() for key, value in tm.zimage_to_original(states["transformer"]).items()}


@pytest.fixture(scope="module")
def extracted(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("neo_loras")
    cache = {}

    def get(fmt: str, **options):
        key = (fmt, tuple(sorted(options.items())))
        if key not in cache:
            out = root / f"{fmt}_{len(cache)}.safetensors"
            cache[key] = (lc.run_extract(pair.base_path, pair.variant_path, out, format=fmt, **options), out)
        return cache[key]

    return get


def apply(pair, lora_path, one_per_key: bool):
    base = neo_state(pair.base)
    lora = load_file(str(lora_path))
    patches, unused = load_lora(lora, lora_key_map(base))
    return base, patched(base, add_patches(patches, base, one_per_key)), patches, unused


def errors(pair, base, result) -> dict[str, float]:
    """Relative error of every changed weight against the variant (q, k, v rows apart)."""
    variant = neo_state(pair.variant)
    out = {}
    for key, target in variant.items():
        if any(name in key for name in NOT_LORA) or torch.equal(target, base[key]):
            continue
        rows = [(key, slice(None))]
        if key.endswith(".attention.qkv.weight"):
            rows = [(f"{key}[{name}]", slice(i * DIM, (i + 1) * DIM)) for i, name in enumerate("qkv")]
        for name, part in rows:
            wanted = target[part] - base[key][part]
            out[name] = float((result[key][part] - target[part]).norm() / wanted.norm())
    return out


# -- the tests -------------------------------------------------------------------------------------


def test_neo_is_a_format_and_means_comfy_for_zimage(extracted):
    assert "neo" in FORMATS
    result, path = extracted("neo")
    lora = load_file(str(path))
    assert any(key.endswith(".attention.qkv.lora_down.weight") for key in lora)
    assert not any(".to_q." in key or ".to_k." in key for key in lora)


@pytest.mark.parametrize("one_per_key", [True, False], ids=["neo-3df257a-one-patch-per-key", "comfyui-appends"])
@pytest.mark.parametrize("full_layer", [False, True], ids=["lora", "full-layer"])
def test_neo_format_applies_every_weight_whole(pair, extracted, one_per_key, full_layer):
    result, path = extracted("neo", full_layer=full_layer)
    base, result_state, patches, unused = apply(pair, path, one_per_key)
    assert not unused, f"keys no weight takes: {sorted(unused)[:5]}"
    assert len({(t if isinstance(t, str) else t[0]) for t, *_ in patches}) == len(patches), "two patches on one weight"
    errs = errors(pair, base, result_state)
    variant = neo_state(pair.variant)
    checked = [name for name in errs if full_layer or variant[name.split("[")[0]].dim() >= 2]
    bad = {name: errs[name] for name in checked if errs[name] > TOLERANCE}
    assert not bad, f"weights not given their whole delta: {bad}"
    assert sum(1 for name in checked if name.endswith("qkv.weight[q]")) == 2 + 2 * 2  # layers + both refiners


@pytest.mark.parametrize("fmt", ["auto", "diffusers"])
def test_split_format_loses_q_and_k_with_one_patch_per_key(pair, extracted, fmt):
    """The loader semantics that broke: split q/k/v keep only their last patch. This is
    what the test above would see with the old format (so it can fail)."""
    result, path = extracted(fmt)
    base, result_state, patches, unused = apply(pair, path, one_per_key=True)
    assert not unused, f"keys no weight takes: {sorted(unused)[:5]}"
    errs = errors(pair, base, result_state)
    lost = {name: err for name, err in errs.items() if err > TOLERANCE}
    qkv_parts = [name for name in errs if ".attention.qkv.weight[" in name]
    assert qkv_parts and len(lost) == len(qkv_parts) * 2 // 3, lost
    assert all(".attention.qkv.weight[" in name and abs(err - 1.0) < 1e-6 for name, err in lost.items()), lost
    # and a loader that keeps every patch applies the same file whole
    _, appended, _, _ = apply(pair, path, one_per_key=False)
    assert max(errors(pair, base, appended)[name] for name in qkv_parts) < TOLERANCE


def test_fused_module_is_the_split_product_part_by_part(pair, extracted):
    """Same threshold, same ranks: the fused module's product equals the split LoRA's."""
    _, split_path = extracted("auto", rank_thresh=0.9, rank_max=2)
    _, fused_path = extracted("neo", rank_thresh=0.9, rank_max=2)
    base = neo_state(pair.base)
    split = patched(base, add_patches(load_lora(load_file(str(split_path)), lora_key_map(base))[0], base, False))
    fused = patched(base, add_patches(load_lora(load_file(str(fused_path)), lora_key_map(base))[0], base, True))
    for key in base:
        assert torch.allclose(split[key], fused[key], rtol=0, atol=1e-5), key
    split_errors = errors(pair, base, split)
    assert max(split_errors.values()) > 0.05  # the cap of 2 really truncated something


@pytest.mark.parametrize(
    "fmt, says",
    [
        ("auto", ["Format diffusion_model: q/k/v split", "apply only v", "use --format neo there"]),
        ("neo", ["Format comfy: one fused q|k|v module", "every Forge Neo era", "diffusers drops"]),
    ],
)
def test_cli_says_which_loaders_apply_the_format(pair, tmp_path, capsys, fmt, says):
    from lib_ckpt2lora.cli import main

    out = tmp_path / "lora.safetensors"
    code = main(["--base", str(pair.base_path), "--variant", str(pair.variant_path), "--out", str(out), "--format", fmt])
    printed = capsys.readouterr().out
    assert code == 0
    line = next(line for line in printed.splitlines() if line.startswith("Format "))
    assert all(text in line for text in says), line

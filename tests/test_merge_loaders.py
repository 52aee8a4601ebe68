"""Merged LoRAs applied by real loaders (issue 20): diffusers for SD1.5 and SDXL (kohya
output) and for Z-Image (a DiT family, its default ``diffusion_model.`` format), and
ComfyUI's / Forge Neo's key map for Z-Image as tests/test_neo_patcher.py emulates it.

Each input is written in one spelling (tests/test_lora_spellings.py's writer: kohya by
diffusers or ldm/sgm names, peft, ComfyUI ``diffusion_model.``), from known factors, so
the truth is base + sum_i w_i * delta_i, computed here. Every weight any input touches
must come out of the loader with that delta (a key the loader dropped would leave its
weight short), and the merged file holds exactly one module per touched weight.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from _feature_models import assert_reproduces, fused_sd, fused_zimage, save_lora, torch_threads
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_spellings import CASES, write_lora
from test_neo_patcher import add_patches, load_lora, lora_key_map, neo_state, patched

from lib_ckpt2lora.cli import main

WEIGHTS = (0.5, -0.7, 1.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def module_names(lora: dict[str, torch.Tensor]) -> set[str]:
    return {key.rsplit(".", 2)[0] for key in lora if key.endswith((".lora_down.weight", ".lora_A.weight"))}


def merged_sd(tmp_path, model, case_names):
    """Write one LoRA per spelling, merge them with WEIGHTS; (merged tensors, truth per weight)."""
    truth, args = {}, []
    for index, (case_name, weight) in enumerate(zip(case_names, WEIGHTS)):
        tensors, deltas = write_lora(model, CASES[case_name], seed=100 + index)
        path = save_lora(tensors, tmp_path / f"in{index}.safetensors")
        args.append(f"{path}:{weight}")
        for where, delta in deltas.items():
            truth[where] = truth.get(where, 0) + weight * delta
    out = tmp_path / "merged.safetensors"
    assert main(["--merge", *args, "--out", str(out), "--rank", "32", "--save-dtype", "fp32"]) == 0
    return load_file(str(out)), truth, out


def assert_sd_loads_exactly(model, lora, truth):
    states = model.states()
    got = fused_sd(model, lora)
    for component in model.components:
        keys = [param for (part, param) in truth if part == component]
        variant = {
            k: v + truth[(component, k)].reshape(v.shape) if (component, k) in truth else v for k, v in states[component].items()
        }
        assert_reproduces(got[component], variant, states[component], keys=keys)
    assert len(module_names(lora)) == len(truth), "one merged module per weight the inputs touch"
    # kohya SD files carry ONE alpha: diffusers reads a single one for every module
    assert len({float(v) for k, v in lora.items() if k.endswith(".alpha")}) == 1


def test_sd15_mixed_spellings_merge_and_load_in_diffusers(tmp_path):
    model = tm.sd15_model(0)
    names = ["sd15 kohya, UNet by ldm names", "sd15 peft", "sd15 kohya, diffusers names, lora_te1_"]
    lora, truth, out = merged_sd(tmp_path, model, names)
    modules = module_names(lora)
    assert all(m.startswith(("lora_unet_", "lora_te_")) for m in modules)
    assert not any("input_blocks" in m or "output_blocks" in m for m in modules), "SD1.5 kohya names are diffusers paths"
    assert_sd_loads_exactly(model, lora, truth)
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sd_v1"


def test_sdxl_sgm_and_peft_spellings_merge_and_load_in_diffusers(tmp_path):
    model = tm.sdxl_model(0)
    names = ["sdxl kohya, UNet by sgm names", "sdxl peft", "sdxl ComfyUI diffusion_model. + sgm, lora_te_"]
    lora, truth, _ = merged_sd(tmp_path, model, names)
    modules = module_names(lora)
    assert all(m.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for m in modules)
    assert any(m.startswith("lora_unet_input_blocks_") for m in modules), "SDXL kohya names keep the sgm path"
    assert_sd_loads_exactly(model, lora, truth)


# -- a DiT family: Z-Image -------------------------------------------------------------------------


def zimage_lora(model, prefix: str, seed: int, rank: int = 2):
    """A LoRA on every Linear of the tiny Z-Image transformer, spelled ``prefix`` + diffusers path
    (``diffusion_model.``: ComfyUI/ours, ``transformer.``: diffusers), peft suffixes, no alpha."""
    gen = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {}
    for path, layer in model.components["transformer"].named_modules():
        if isinstance(layer, torch.nn.Linear):
            down = 0.2 * torch.randn(rank, layer.in_features, generator=gen)
            up = 0.2 * torch.randn(layer.out_features, rank, generator=gen)
            tensors[f"{prefix}{path}.lora_A.weight"], tensors[f"{prefix}{path}.lora_B.weight"] = down, up
            truth[path + ".weight"] = up @ down
    return tensors, truth


@pytest.fixture(scope="module")
def zimage_merge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge_zimage")
    model = tm.zimage_model(0)
    truth, args = {}, []
    for index, (prefix, weight) in enumerate(zip(("diffusion_model.", "transformer."), (0.5, -0.7))):
        tensors, deltas = zimage_lora(model, prefix, seed=200 + index)
        args.append(f"{save_lora(tensors, folder / f'in{index}.safetensors')}:{weight}")
        for key, delta in deltas.items():
            truth[key] = truth.get(key, 0) + weight * delta
    out = folder / "merged.safetensors"
    assert main(["--merge", *args, "--out", str(out), "--rank", "8", "--save-dtype", "fp32"]) == 0
    base = model.states()["transformer"]
    variant = {k: v + truth[k] if k in truth else v for k, v in base.items()}
    return model, base, variant, truth, out


def test_zimage_merge_loads_in_diffusers(zimage_merge):
    _, base, variant, truth, out = zimage_merge
    lora = load_file(str(out))
    assert all(m.startswith("diffusion_model.") for m in module_names(lora)), "Z-Image's default format"
    assert len(module_names(lora)) == len(truth)
    got = fused_zimage(base, out)
    assert_reproduces(got, variant, base, keys=list(truth))


def test_zimage_merge_through_comfyui_key_map(zimage_merge):
    """ComfyUI's model_lora_keys_unet (emulated in test_neo_patcher.py): every key of the
    merged file is consumed, and the patched original-layout weights equal the truth."""
    _, base, variant, _, out = zimage_merge
    model_state = neo_state({"transformer": base})
    patches, unused = load_lora(load_file(str(out)), lora_key_map(model_state))
    assert not unused, f"keys ComfyUI would not use: {sorted(unused)[:5]}"
    got = patched(model_state, add_patches(patches, model_state, one_per_key=False))
    expected = neo_state({"transformer": variant})
    for key, value in expected.items():
        change = (value - model_state[key]).norm()
        error = (got[key] - value).norm()
        assert error <= 1e-3 * max(float(change), 1e-12) or (change == 0 and error == 0), key


def zimage_original_lora(model, seed: int, rank: int = 2):
    """A LoRA in Z-Image's original layout (ComfyUI): ``diffusion_model.<original name>``, q|k|v as
    ONE ``attention.qkv`` module (shared down, up stacked by rows), ``attention.out``, ``x_embedder``."""
    from lib_ckpt2lora.architectures.zimage import original_name

    gen = torch.Generator().manual_seed(seed)
    layers = dict(model.components["transformer"].named_modules())
    tensors, truth = {}, {}
    for path, layer in layers.items():
        if not isinstance(layer, torch.nn.Linear) or path.endswith((".attention.to_k", ".attention.to_v")):
            continue
        down = 0.2 * torch.randn(rank, layer.in_features, generator=gen)
        if path.endswith(".attention.to_q"):
            block = path[: -len("to_q")]
            parts = [0.2 * torch.randn(layers[block + f"to_{n}"].out_features, rank, generator=gen) for n in "qkv"]
            name, up = original_name(block[:-1]) + ".qkv", torch.cat(parts)
            for n, part in zip("qkv", parts):
                truth[f"{block}to_{n}.weight"] = part @ down
        else:
            up = 0.2 * torch.randn(layer.out_features, rank, generator=gen)
            name = original_name(path)
            truth[path + ".weight"] = up @ down
        tensors[f"diffusion_model.{name}.lora_A.weight"], tensors[f"diffusion_model.{name}.lora_B.weight"] = down, up
    return tensors, truth


def test_zimage_original_and_diffusers_layouts_meet(tmp_path):
    """ComfyUI's original names (fused qkv, attention.out, x_embedder) and diffusers' names of one
    weight are merged as one module, written in the default (diffusers-named) format, exact."""
    model = tm.zimage_model(0)
    original, truth_a = zimage_original_lora(model, seed=300)
    assert any(k.endswith("attention.qkv.lora_B.weight") for k in original)
    split, truth_b = zimage_lora(model, "transformer.", seed=301)
    a = save_lora(original, tmp_path / "original.safetensors")
    b = save_lora(split, tmp_path / "split.safetensors")
    out = tmp_path / "merged.safetensors"
    assert main(["--merge", f"{a}:0.5", f"{b}:-0.7", "--out", str(out), "--rank", "8", "--save-dtype", "fp32"]) == 0
    truth = {k: 0.5 * truth_a[k] - 0.7 * truth_b[k] for k in truth_b}
    assert set(truth_a) == set(truth_b)
    lora = load_file(str(out))
    assert len(module_names(lora)) == len(truth) and not any(".qkv" in k for k in lora)
    base = model.states()["transformer"]
    variant = {k: v + truth[k] if k in truth else v for k, v in base.items()}
    assert_reproduces(fused_zimage(base, out), variant, base, keys=list(truth))
    model_state = neo_state({"transformer": base})  # and ComfyUI's key map uses every key
    patches, unused = load_lora(lora, lora_key_map(model_state))
    assert not unused, sorted(unused)[:5]
    got, expected = (
        patched(model_state, add_patches(patches, model_state, one_per_key=False)),
        neo_state({"transformer": variant}),
    )
    assert all(float((got[k] - v).norm()) <= 1e-3 * max(float((v - model_state[k]).norm()), 1e-12) for k, v in expected.items())

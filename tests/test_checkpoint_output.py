"""Checkpoint outputs: ``--checkpoint`` (base + low-rank delta) and ``--checkpoint-full``
(base + full delta).

Every key of the base comes out with the base's own dtype and shape; keys the run does
not process keep the base's value; ``--checkpoint-full`` is base + delta to dtype
rounding; ``--checkpoint`` is the base with the LoRA the same options extract merged in;
the files load with diffusers' single-file loaders (offline, local configs); and the
peak memory of a ``--checkpoint-full`` run stays at a few tensors however large the model.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tiny_models as tm
import torch
from _feature_models import quiet_libraries, run_extract, torch_threads
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_IN_ONE = tm.ZIMAGE_ALL_IN_ONE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def header(path):
    """Key -> (dtype, shape) of a safetensors file, without reading the data."""
    with safe_open(str(path), "pt") as handle:
        return {key: (handle.get_slice(key).get_dtype(), tuple(handle.get_slice(key).get_shape())) for key in handle.keys()}


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint_zimage")
    state = {k: v.detach().clone() for k, v in tm.zimage_transformer(0).state_dict().items()}
    variant = tm.make_variant(state, rank=3, scale=0.02, seed=51, include_1d=True)
    return dict(folder=folder, state=state, variant=variant)


# -- keys, dtypes, shapes -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["checkpoint", "checkpoint_full"])
def test_every_base_key_keeps_its_dtype_and_shape(tmp_path, mode):
    """An SD1.5 file of mixed dtypes (fp16 UNet, fp32 text encoder, bf16 VAE, int64 ids);
    the variant is all fp32."""
    model = tm.sd15_model(0)
    states = model.states()
    base = tm.sd15_checkpoint(model, states)
    for key in base:
        if key.startswith(tm.SD_UNET):
            base[key] = base[key].half()
        elif key.startswith("first_stage_model."):
            base[key] = base[key].bfloat16()
    base_path = tmp_path / "base.safetensors"
    save_file(base, str(base_path))
    variant = tm.save(tm.sd15_checkpoint(model, tm.variant_states(states, seed=52)), tmp_path / "variant.safetensors")
    run_extract(tmp_path, base_path, variant, "out", save_dtype="auto", min_dim=32, rank_max=8, **{mode: True})
    written = header(tmp_path / "out.safetensors")
    assert written == header(base_path)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(
        out[tm.SD15_TE + "text_model.embeddings.position_ids"], base[tm.SD15_TE + "text_model.embeddings.position_ids"]
    )
    changed = [k for k in out if not torch.equal(out[k], base[k])]
    assert any(k.startswith(tm.SD_UNET) for k in changed) and any(k.startswith(tm.SD15_TE) for k in changed)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        assert handle.metadata()["ckpt2lora_kind"] == mode.replace("_", "-")


# -- --checkpoint-full = base + delta ----------------------------------------------------------------


def test_checkpoint_full_is_base_plus_delta(zimage):
    """bf16 all-in-one original-layout base, fp32 diffusers-layout bare variant."""
    folder, state, variant = zimage["folder"], zimage["state"], zimage["variant"]
    base = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tm.zimage_checkpoint(state, prefix=ALL_IN_ONE).items()}
    base_path = folder / "full_base.safetensors"
    save_file(base, str(base_path))
    variant_path = tm.save(tm.zimage_checkpoint(variant, layout="diffusers"), folder / "full_variant.safetensors")
    original_variant = tm.zimage_checkpoint(variant, prefix=ALL_IN_ONE)
    for full_layer in (False, True):
        _, out = run_extract(
            folder, base_path, variant_path, f"full_{full_layer}", checkpoint_full=True, min_dim=32, full_layer=full_layer
        )
        assert header(folder / f"full_{full_layer}.safetensors") == header(base_path)
        processed = 0
        for key, value in base.items():
            target = original_variant.get(key)
            eligible = target is not None and (full_layer or (value.dim() >= 2 and min(value.shape[0], value[0].numel()) >= 32))
            if not eligible:
                assert torch.equal(out[key], value), key  # text encoder, VAE, 1-D, pad tokens
                continue
            expected = (value.float() + (target.float() - value.float())).to(value.dtype)
            assert torch.equal(out[key], expected), key
            processed += 1
        assert processed > (50 if full_layer else 30)
        assert any(key.endswith(".attention.qkv.weight") for key in out)


def test_checkpoint_full_with_two_equal_variants_is_that_variant(zimage):
    folder, state, variant = zimage["folder"], zimage["state"], zimage["variant"]
    base_path = tm.save(tm.zimage_checkpoint(state), folder / "pair_base.safetensors")
    variant_path = tm.save(tm.zimage_checkpoint(variant), folder / "pair_variant.safetensors")
    _, out = run_extract(folder, base_path, variant_path, "pair_out", variant2=variant_path, checkpoint_full=True, min_dim=32)
    expected = tm.zimage_checkpoint(variant)
    base = tm.zimage_checkpoint(state)
    for key, value in out.items():
        if value.dim() == 2 and min(value.shape) >= 32:
            delta = expected[key] - base[key]
            assert float((value - expected[key]).norm()) <= 1e-4 * float(delta.norm()), key


# -- --checkpoint = base + the extracted LoRA ----------------------------------------------------------


def test_checkpoint_is_base_with_the_extracted_lora_merged(zimage):
    folder, state = zimage["folder"], zimage["state"]
    # deltas of rank 12 with a decaying spectrum: rank_max 4 keeps only part of each
    variant = tm.make_variant(state, rank=12, scale=0.02, seed=53)
    generator = torch.Generator().manual_seed(54)
    for key, value in variant.items():
        if value.dim() == 2 and min(value.shape) >= 32:
            extra = torch.randn(value.shape[0], 1, generator=generator) @ torch.randn(1, value.shape[1], generator=generator)
            variant[key] = value + extra * (0.03 * float(state[key].norm()) / float(extra.norm()))
    base_path = tm.save(tm.zimage_checkpoint(state), folder / "low_base.safetensors")
    variant_path = tm.save(tm.zimage_checkpoint(variant), folder / "low_variant.safetensors")
    options = dict(rank_max=4, min_dim=32, save_dtype="fp32")
    _, lora = run_extract(folder, base_path, variant_path, "low_lora", **options)
    _, out = run_extract(folder, base_path, variant_path, "low_checkpoint", checkpoint=True, **options)
    # merge the LoRA ourselves: diffusers-named deltas, fused into the original layout
    deltas = {key: torch.zeros_like(value) for key, value in state.items()}
    for key in lora:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            name = module[len("diffusion_model.") :] + ".weight"
            deltas[name] = lora[module + ".lora_B.weight"] @ lora[key]
    merged_delta = tm.zimage_to_original(deltas)
    base = tm.zimage_checkpoint(state)
    full = tm.zimage_checkpoint(variant)
    assert set(out) == set(base)
    checked = 0
    for key, value in out.items():
        expected = merged_delta[key]
        if not expected.any():
            assert torch.equal(value, base[key]), key
            continue
        got = value - base[key]
        assert float((got - expected).norm()) <= 1e-4 * float(expected.norm()), key
        # low rank, not the full delta
        assert float((value - full[key]).norm()) > 0.05 * float((full[key] - base[key]).norm()), key
        checked += 1
    assert checked > 30


# -- loading in diffusers ---------------------------------------------------------------------------


def test_zimage_checkpoint_loads_with_from_single_file(zimage):
    from diffusers import ZImageTransformer2DModel

    folder, state, variant = zimage["folder"], zimage["state"], zimage["variant"]
    base_path = tm.save(tm.zimage_checkpoint(state, prefix=ALL_IN_ONE), folder / "load_base.safetensors")
    variant_path = tm.save(tm.zimage_checkpoint(variant), folder / "load_variant.safetensors")
    run_extract(folder, base_path, variant_path, "load_out", checkpoint_full=True, min_dim=1, full_layer=True)
    config = folder / "config"
    tm.zimage_transformer(0).save_config(config / "transformer")
    with quiet_libraries():
        loaded = ZImageTransformer2DModel.from_single_file(
            str(folder / "load_out.safetensors"),
            config=str(config),
            subfolder="transformer",
            local_files_only=True,
            torch_dtype=torch.float32,
        )
    got = loaded.state_dict()
    assert set(got) == set(variant)
    for key, value in variant.items():
        assert torch.allclose(got[key], value, rtol=1e-6, atol=1e-7), key


def test_sd15_checkpoint_loads_with_from_single_file(tmp_path):
    from diffusers import UNet2DConditionModel

    model = tm.sd15_model(0)
    states = model.states()
    variant = tm.variant_states(states, seed=55)
    base_path = tm.save(tm.sd15_checkpoint(model, states), tmp_path / "base.safetensors")
    variant_path = tm.save(tm.sd15_checkpoint(model, variant), tmp_path / "variant.safetensors")
    run_extract(tmp_path, base_path, variant_path, "out", checkpoint_full=True, min_dim=1)
    model.components["unet"].save_config(tmp_path / "config" / "unet")
    with quiet_libraries():
        unet = UNet2DConditionModel.from_single_file(
            str(tmp_path / "out.safetensors"),
            config=str(tmp_path / "config"),
            subfolder="unet",
            local_files_only=True,
            torch_dtype=torch.float32,
        )
    got = unet.state_dict()
    for key, value in variant["unet"].items():
        expected = value if value.dim() >= 2 else states["unet"][key]  # 1-D untouched without --full-layer
        assert torch.allclose(got[key], expected, rtol=1e-6, atol=1e-7), key


# -- peak memory --------------------------------------------------------------------------------------

SHAPE = (1024, 2048)  # 8 MiB in fp32
TENSOR_MIB = SHAPE[0] * SHAPE[1] * 4 / 2**20
# The allowance, in tensors, above a process that has imported and warmed up the same code:
# the reader's next pair, the current pair, the fp32 sum, the delta and temporaries. Holding the
# model (or glibc keeping freed tensors) would cost one tensor per tensor of the model.
PEAK_TENSORS_ALLOWED = 10
# Growth allowed between a model of 10 tensors and one of 40: none beyond noise.
GROWTH_TENSORS_ALLOWED = 2
WARM_IMPORTS = (
    "import torch, lib_ckpt2lora.cli, lib_ckpt2lora.extract, lib_ckpt2lora.checkpoint; "
    "torch.linalg.svd(torch.randn(64, 64))"
)
_WRAPPER = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)"
)


def _peak_rss_mib(command: list[str]) -> float:
    """Peak RSS of ``command``, run as the only child of a fresh wrapper process."""
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1]) / 1024  # Linux: KiB


def _checkpoint_full_peak(folder, tensors: int) -> float:
    generator = torch.Generator().manual_seed(56)
    folder.mkdir()
    base = {f"blocks.{i}.proj.weight": 0.02 * torch.randn(SHAPE, generator=generator) for i in range(tensors)}
    save_file(base, str(folder / "base.safetensors"))
    for value in base.values():
        value.add_(1e-3 * torch.randn(SHAPE, generator=generator))
    save_file(base, str(folder / "variant.safetensors"))
    del base
    command = [
        sys.executable, "-m", "lib_ckpt2lora",
        "--base", str(folder / "base.safetensors"),
        "--variant", str(folder / "variant.safetensors"),
        "--out", str(folder / "out.safetensors"),
        "--checkpoint-full",
    ]  # fmt: skip
    peak = _peak_rss_mib(command)
    assert (folder / "out.safetensors").stat().st_size > tensors * TENSOR_MIB * 2**20
    return peak


def test_checkpoint_full_peak_memory_is_a_few_tensors(tmp_path):
    assert sys.platform.startswith("linux")
    bare = _peak_rss_mib([sys.executable, "-c", WARM_IMPORTS])
    small = _checkpoint_full_peak(tmp_path / "small", 10)
    large = _checkpoint_full_peak(tmp_path / "large", 40)
    print(
        f"\n--checkpoint-full peak RSS: {small:.0f} MiB (10 tensors of {TENSOR_MIB:.0f} MiB), {large:.0f} MiB "
        f"(40 tensors, {40 * TENSOR_MIB:.0f} MiB model); warm imports alone: {bare:.0f} MiB; "
        f"extra at 40 tensors: {(large - bare) / TENSOR_MIB:.1f} tensors"
    )
    assert large - small < GROWTH_TENSORS_ALLOWED * TENSOR_MIB, "peak memory grows with the model's size"
    assert large - bare < PEAK_TENSORS_ALLOWED * TENSOR_MIB, (
        f"peak {large - bare:.0f} MiB above warm imports = {(large - bare) / TENSOR_MIB:.1f} tensors "
        f"(allowed {PEAK_TENSORS_ALLOWED})"
    )

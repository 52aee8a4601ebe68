"""ComfyUI "scaled fp8" checkpoints are read as stored fp8 values x their scale.

A tiny real Flux.1 transformer (fp32) is the base; the variant is saved the way ComfyUI's
scaled-fp8 files are (bare BFL keys, a ``scaled_fp8`` marker, every 2-D weight as
float8_e4m3fn / ``scale_weight`` with scale = absmax / 448, biases and norms unquantized).
The LoRA, applied the ComfyUI way to the base, must reproduce the variant the file means
(fp8 values x scale) and the true fp32 variant within fp8 rounding. Reading the fp8
values raw (scale ignored) is off by the scale, ~1/1000 here, and fails both checks.
"""

from __future__ import annotations

import dit_layouts as dl
import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from safetensors.torch import load_file
from test_loaders_dit import comfy_apply

from lib_ckpt2lora import scaled_fp8
from lib_ckpt2lora.errors import UserError

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8_e4m3fn"),
]
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def to_scaled_fp8(state: dict[str, torch.Tensor], marker: str = "scaled_fp8") -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 layout: each 2-D weight stored as weight / scale in fp8."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().float() / FP8_MAX
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    out[marker] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def dequantized(fp8_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the scaled-fp8 file means: fp8 value x scale (ComfyUI ops.py convert_weight)."""
    out = {}
    for key, value in fp8_state.items():
        if key.endswith((".scale_weight", "scaled_fp8")):
            continue
        scale = fp8_state.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        out[key] = value.float() * scale if scale is not None else value
    return out


def tiny_flux_bfl_shapes(h=32, head=16, mlp=128, context=24, pooled=20, channels=64):
    """The BFL key list of dit_layouts' tiny Flux.1-dev, written out so this test needs no
    diffusers model (diffusers' Flux needs torch 2.4; scaled fp8 must read on torch 2.1 too).
    test_tiny_flux_shapes_are_the_real_models checks it against the real class."""
    shapes = {}

    def linear(name, rows, cols):
        shapes[name + ".weight"], shapes[name + ".bias"] = (rows, cols), (rows,)

    for i in range(2):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}_"
            linear(b + "attn.qkv", 3 * h, h)
            linear(b + "attn.proj", h, h)
            shapes[b + "attn.norm.query_norm.scale"] = shapes[b + "attn.norm.key_norm.scale"] = (head,)
            linear(b + "mlp.0", 4 * h, h)
            linear(b + "mlp.2", h, 4 * h)
            linear(b + "mod.lin", 6 * h, h)
        b = f"single_blocks.{i}."
        linear(b + "linear1", 3 * h + mlp, h)
        linear(b + "linear2", h, h + mlp)
        shapes[b + "norm.query_norm.scale"] = shapes[b + "norm.key_norm.scale"] = (head,)
        linear(b + "modulation.lin", 3 * h, h)
    linear("img_in", h, channels)
    linear("txt_in", h, context)
    for name, cols in (("time_in", 256), ("vector_in", pooled), ("guidance_in", 256)):
        linear(name + ".in_layer", h, cols)
        linear(name + ".out_layer", h, h)
    linear("final_layer.linear", channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def test_tiny_flux_shapes_are_the_real_models():
    try:
        model = dl.flux_transformer(seed=0)
    except AttributeError as error:  # torch < 2.4: no torch.nn.RMSNorm for diffusers' Flux
        pytest.skip(str(error))
    real = {k: tuple(v.shape) for k, v in dl.to_bfl(model.state_dict()).items()}
    assert real == tiny_flux_bfl_shapes()


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_torch_thread):
    folder = tmp_path_factory.mktemp("fp8")
    generator = torch.Generator().manual_seed(0)
    base_bfl = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in tiny_flux_bfl_shapes().items()}
    # a fine-tune whose change is large next to fp8's rounding (3 mantissa bits, ~3% per value)
    variant_bfl = tm.make_variant(base_bfl, seed=1)
    variant_bfl = {k: base_bfl[k] + 8 * (v - base_bfl[k]) for k, v in variant_bfl.items()}
    fp8 = to_scaled_fp8(variant_bfl)
    base_path = tm.save(base_bfl, folder / "flux1-dev.safetensors")
    variant_path = tm.save(fp8, folder / "flux1-dev-finetune-fp8-scaled.safetensors", dtype=None)
    return base_bfl, variant_bfl, fp8, base_path, variant_path


def relative_errors(patched, target, base):
    errors = {}
    for key, value in patched.items():
        delta = (target[key].double() - base[key].double()).norm()
        if base[key].ndim == 2 and delta > 0:
            errors[key] = float((value - target[key].double()).norm() / delta)
    return errors


def test_scaled_fp8_variant_gives_the_true_delta(files, tmp_path):
    base, true_variant, fp8, base_path, variant_path = files
    stored = load_file(str(variant_path))
    assert stored["scaled_fp8"].dtype == torch.float8_e4m3fn
    assert stored["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert float(stored["double_blocks.0.img_attn.qkv.scale_weight"]) < 0.01  # raw values are ~100x+ off
    out = tmp_path / "lora.safetensors"
    # every singular value kept: fp8's rounding makes the delta full-rank noise
    result = lc.run_extract(base_path, variant_path, out, rank_thresh=1.0, rank_max=512)
    assert result.architecture == "flux"
    lora = lc.check_report_matches_file(result, out)
    assert not any("scale_weight" in k or "scaled_fp8" in k for k in lora)
    patched, matched = comfy_apply(lora, base)
    assert matched == lc.lora_module_names(lora)
    assert {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k, v in base.items() if v.ndim == 2} == matched
    # exact against what the file means
    meant = dequantized(fp8)
    errors = relative_errors(patched, meant, base)
    assert len(errors) == sum(1 for v in base.values() if v.ndim == 2)
    assert max(errors.values()) < lc.DELTA_TOLERANCE, sorted(errors.items(), key=lambda e: -e[1])[:4]
    # and against the true fp32 variant: only fp8's rounding of the variant separates them
    true_errors = relative_errors(patched, true_variant, base)
    rounding = relative_errors({k: v.double() for k, v in meant.items()}, true_variant, base)
    for key, error in true_errors.items():
        assert error < rounding[key] + lc.DELTA_TOLERANCE, (key, error, rounding[key])
    assert max(rounding.values()) < 0.5  # fp8 keeps 3 mantissa bits: the delta is still seen
    # reading the fp8 values raw, as the scale-blind reader did, misses by orders of magnitude
    raw = relative_errors({k: v.double() for k, v in fp8.items() if k in base}, true_variant, base)
    assert min(raw.values()) > 10


def test_scaled_fp8_base_is_read_as_its_real_weights(files, tmp_path):
    base, true_variant, _, base_path, _ = files
    fp8_base = to_scaled_fp8(base)
    fp8_base_path = tm.save(fp8_base, tmp_path / "flux1-dev-fp8-scaled.safetensors", dtype=None)
    variant_path = tm.save(true_variant, tmp_path / "finetune.safetensors")
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(fp8_base_path, variant_path, out, rank_thresh=1.0, rank_max=512)
    lora = lc.check_report_matches_file(result, out)
    meant_base = dequantized(fp8_base)
    patched, _ = comfy_apply(lora, meant_base)
    errors = relative_errors(patched, true_variant, meant_base)
    assert len(errors) == sum(1 for v in base.values() if v.ndim == 2)
    assert max(errors.values()) < lc.DELTA_TOLERANCE, sorted(errors.items(), key=lambda e: -e[1])[:4]


def test_scale_keys_are_not_layers_and_marker_is_any_prefix(files, tmp_path):
    from lib_ckpt2lora import architectures
    from lib_ckpt2lora.architectures.base import FileView
    from lib_ckpt2lora.reading import TensorFile

    fp8 = {dl.ALL_IN_ONE + k: v for k, v in files[2].items() if k != "scaled_fp8"}
    fp8[dl.ALL_IN_ONE + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tm.save(fp8, tmp_path / "all-in-one-fp8.safetensors", dtype=None)
    with TensorFile(path) as file:
        assert not any("scale_weight" in k or "scaled_fp8" in k for k in file.infos)
        arch = architectures.detect(file.infos)
        assert arch.describe(file.infos).startswith("Flux.1, BFL layout, 2 double + 2 single blocks")
        view = FileView.build(file, arch)
        assert len(view.scales) == sum(1 for k in fp8 if k.endswith(".scale_weight"))
        key = "transformer_blocks.0.attn.to_k.weight"  # a row range of the fused qkv
        raw = view.refs[key].key
        assert view.read(key).dtype == torch.float32
        whole = fp8[raw].float() * fp8[raw.replace(".weight", ".scale_weight")]
        rows = view.refs[key].rows
        assert torch.equal(view.read(key), whole[rows[0] : rows[1]])


def test_checkpoint_output_over_a_scaled_fp8_base_is_refused(files, tmp_path):
    _, _, _, base_path, variant_path = files
    out = tmp_path / "merged.safetensors"
    with pytest.raises(UserError, match="scaled-fp8 checkpoint") as error:
        lc.run_extract(variant_path, base_path, out, checkpoint=True)
    assert str(error.value).count(". ") == 0 and not out.exists()


def test_a_scale_that_is_not_one_number_is_named(tmp_path):
    with pytest.raises(UserError, match=r"stores blocks\.0\.weight with a scale of shape \[4\]"):
        scaled_fp8.dequantize(torch.ones(4, 4), torch.ones(4), "blocks.0.weight", tmp_path / "x.safetensors")

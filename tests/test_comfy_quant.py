"""ComfyUI's new quantized layout ("comfy_quant"), as the fp8 releases of Flux.2 Klein, Z-Image,
Wan and Qwen-Image ship: per quantized layer ``<layer>.weight`` in float8 holding W / scale,
``<layer>.weight_scale`` (float32 scalar), maybe ``<layer>.input_scale``, and the format as a
``<layer>.comfy_quant`` uint8 JSON tensor and/or the header's ``_quantization_metadata``
(ComfyUI ``QUANTIZATION.md``; ``comfy/ops.py _load_quantized_module``; ``comfy/utils.py
convert_old_quants``). Files are quantized here as comfy-kitchen's ``TensorCoreFP8Layout.quantize``
does (``comfy_kitchen/tensor/fp8.py``, eager ``quantize_per_tensor_fp8``): scale = amax|W| / the
fp8 maximum, value = clamp(W x (1 / scale)) rounded to fp8; the block weights quantized, the
embedders and final layer left in bf16, as ComfyUI's mixed-precision files do.

- Tiny real Flux.2 Klein (test_flux2's model) with an fp8 base, an fp8 variant, an fp8 second
  variant, in the BFL layout (bare, markers), all-in-one (header metadata only, e5m2, text
  encoder quantized too) and the diffusers layout: the default LoRA, applied through ComfyUI's
  and Forge Neo's key maps (emulated as test_flux2 does), gives every weight = variant - the
  dequantized base (the file's real weights); the detection line names Flux.2 and says fp8,
  with no "generic" warning; no scale or marker is a layer or a key of the LoRA.
- Tiny real Z-Image (original layout, bare and all-in-one) with an fp8 base, through
  test_neo_patcher's emulation of Neo's and ComfyUI's patching.
- A row range of a scaled weight reads as that range of the dequantized weight.
- nvfp4, mxfp8, int8, an unknown format, a broken marker, an fp8 weight with per-row scales:
  refused in one sentence naming the file, the layer and the format (CLI exit 2, nothing written).
- Realistic width (1024, bf16 variant with a noisy full-rank delta, fp8 base): the written
  factors keep >= 0.999 of the optimal energy at their rank, against an exact SVD of
  variant - dequantized base; fp8's rounding of the base is larger than the fine-tune's change
  there, and the report warns of it.
Before this, a Flux.1/Flux.2 file in this layout crashed in detection (IndexError: the 0-d
weight_scale reached the fused-weight splitter) and Z-Image/generic files were read as raw fp8
values (deltas off by about 1e5).
"""

from __future__ import annotations

import json

import loader_checks as lc
import pytest
import realistic as rl
import torch
from _bad_inputs import assert_clean_failure, run_cli_inprocess
from safetensors.torch import load_file, save_file
from test_two_variants import dense

import lib_ckpt2lora
from lib_ckpt2lora import ExtractOptions
from lib_ckpt2lora.errors import UserError
from lib_ckpt2lora.reading import TensorFile

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not hasattr(torch, "float8_e5m2"), reason="this torch has no float8 dtypes"),
]
ALL_IN_ONE = "model.diffusion_model."
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}  # torch.finfo(...).max, written out for torch 2.1
QUANT_SUFFIXES = (".weight_scale", ".input_scale", ".comfy_quant", ".weight_scale_2")


def marker(conf: dict) -> torch.Tensor:
    """``<layer>.comfy_quant`` as ComfyUI writes it (comfy/ops.py _quantized_weight_state_dict)."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def quantize_fp8(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """comfy-kitchen TensorCoreFP8Layout.quantize with the eager quantize_per_tensor_fp8."""
    dtype, top = getattr(torch, fmt), FP8_MAX[fmt]
    scale = (weight.abs().amax() / top).to(torch.float32)
    scaled = torch.clamp(weight * (1.0 / scale).to(weight.dtype), -top, top)
    return scaled.to(dtype), scale


def comfy_quantize(state, quantized=lambda key: True, fmt="float8_e4m3fn", markers=True, metadata_prefix=None):
    """(tensors, header metadata or None): every 2-D ``.weight`` that ``quantized`` picks stored
    per tensor in ``fmt``, with its marker (``markers``) and/or listed in ``_quantization_metadata``
    under its name without ``metadata_prefix`` (None: no header entry)."""
    out, layers = {}, {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2 and quantized(key):
            layer = key[: -len(".weight")]
            out[key], out[layer + ".weight_scale"] = quantize_fp8(value, fmt)
            if markers:
                out[layer + ".comfy_quant"] = marker({"format": fmt})
            if len(layers) % 3 == 0:  # some layers carry an fp8-matmul input scale
                out[layer + ".input_scale"] = torch.tensor(1.0)
            name = layer[len(metadata_prefix) :] if metadata_prefix and layer.startswith(metadata_prefix) else layer
            layers[name] = {"format": fmt}
        else:
            out[key] = value
    if metadata_prefix is None:
        return out, None
    return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the file means: weight (float) x weight_scale, the scales and markers dropped."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(QUANT_SUFFIXES):
            continue
        scale = tensors.get(key[: -len("weight")] + "weight_scale") if key.endswith(".weight") else None
        out[key] = value.float() * scale if scale is not None else value.float()
    return out


def save(tensors, path, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def in_blocks(key: str) -> bool:
    return "blocks." in key or "layers." in key or key.startswith("text_encoders.")


def extract_logged(base, variant, out, **options):
    """lc.run_extract's settings, with every log line kept."""
    lines: list[str] = []
    settings = dict(min_dim=1, save_dtype="fp32", rank=0, rank_thresh=1.0, rank_max=512, overwrite=True)
    settings.update(options)
    result = lib_ckpt2lora.extract(ExtractOptions(base=base, variant=variant, out=out, **settings), log=lines.append)
    return result, lines


def check_no_quant_keys(result, lora):
    assert not any(s.strip(".") in k for k in lora for s in QUANT_SUFFIXES), sorted(lora)[:5]
    reported = [layer.key for layer in result.report.layers] + [k for keys in result.report.skipped.values() for k in keys]
    assert not any(s.strip(".") in k for k in reported for s in QUANT_SUFFIXES), reported


def relative_errors(patched, target, base, not_layers=()) -> dict[str, float]:
    """Every 2-D weight: |patched - target| / |target - base|; every other tensor must stay the base's."""
    errors = {}
    for key, value in patched.items():
        if base[key].ndim >= 2 and not any(name in key for name in not_layers):
            delta = (target[key].double() - base[key].double()).norm()
            errors[key] = float((value.double() - target[key].double()).norm() / delta)
        else:
            assert torch.equal(value.double(), base[key].double()), key
    return errors


# -- Flux.2 Klein ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein():
    """The tiny Klein's diffusers-named states: base (bf16, as released) and a fine-tune."""
    import test_flux2 as f2
    import tiny_models as tm

    base = {k: v.to(torch.bfloat16) for k, v in f2.transformer(seed=0).state_dict().items()}
    variant = {k: v.to(torch.bfloat16) for k, v in tm.make_variant(base, seed=1).items()}
    return base, variant


def klein_file(state, layout="bfl", prefix=""):
    import test_flux2 as f2

    tensors = f2.checkpoint(state, layout, prefix)
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in tensors.items()}


def webui(tensors: dict[str, torch.Tensor], layout="bfl", prefix="") -> dict[str, torch.Tensor]:
    """The file's real weights as ComfyUI's / Neo's Flux.2 holds them: BFL names under diffusion_model."""
    import dit_layouts as dl
    import test_flux2 as f2

    real = {k[len(prefix) :]: v for k, v in dequantized(tensors).items() if k.startswith(prefix) and not k.startswith("text_")}
    real = real if layout == "bfl" else dl.to_bfl(real, "flux2")
    return {f2.PREFIX + k: v for k, v in real.items()}


def apply_default_lora(lora, base_state, one_per_key):
    import test_flux2 as f2

    key_map = f2.lora_key_map(base_state, 32, f2.TINY["num_layers"], f2.TINY["num_single_layers"])
    patches, unused = f2.load_lora(lora, key_map)
    assert not unused, sorted(unused)[:5]
    return f2.apply_patches(base_state, patches, one_per_key)


def check_detection(result, lines, family="Flux.2", role="Base", kind="float8_e4m3fn"):
    line = next(line for line in lines if line.startswith(role + ":"))
    assert f": {family}" in line and f"; fp8 ({kind}) with per-tensor scales:" in line, line
    assert line.endswith("weights read dequantized."), line
    assert not any("not an SD1.5" in w for w in result.report.warnings), result.report.warnings
    assert not any("does not look derived" in w for w in result.report.warnings), result.report.warnings
    assert sum("stored in fp8, whose rounding" in w for w in result.report.warnings) == 1, result.report.warnings


KLEIN_CASES = {
    # layout, prefix, fp8 format, markers, header metadata (names without this prefix)
    "bfl-markers": ("bfl", "", "float8_e4m3fn", True, None),
    "all-in-one-metadata-e5m2": ("bfl", ALL_IN_ONE, "float8_e5m2", False, ALL_IN_ONE),
    "all-in-one-both-full-names": ("bfl", ALL_IN_ONE, "float8_e4m3fn", True, ""),
    "diffusers-markers": ("diffusers", "", "float8_e4m3fn", True, None),
}


@pytest.mark.parametrize("case", list(KLEIN_CASES))
def test_klein_fp8_base_gives_variant_minus_its_real_weights(klein, case, tmp_path):
    layout, prefix, fmt, markers, metadata_prefix = KLEIN_CASES[case]
    base, variant = klein
    base_file, header = comfy_quantize(klein_file(base, layout, prefix), in_blocks, fmt, markers, metadata_prefix)
    assert any(v.dtype == getattr(torch, fmt) for v in base_file.values())
    base_path = save(base_file, tmp_path / "flux-2-klein-4b-fp8.safetensors", header)
    variant_path = save(klein_file(variant), tmp_path / "klein-finetune.safetensors")
    out = tmp_path / "lora.safetensors"
    result, lines = extract_logged(base_path, variant_path, out)
    assert result.architecture == "flux2"
    check_detection(result, lines, kind=fmt)
    lora = lc.check_report_matches_file(result, out)
    check_no_quant_keys(result, lora)
    real_base, target = webui(base_file, layout, prefix), webui(klein_file(variant))
    for webui_name, one_per_key in (("forge_neo", True), ("comfyui", False)):
        errors = relative_errors(apply_default_lora(lora, real_base, one_per_key), target, real_base)
        assert len(errors) == sum(v.ndim >= 2 for v in real_base.values())
        bad = {k: e for k, e in errors.items() if not e < lc.DELTA_TOLERANCE}
        assert not bad, (webui_name, sorted(bad.items())[:5])


def test_klein_fp8_variant_and_second_variant(klein, tmp_path):
    """An fp8 variant and the same fp8 file as --variant2: their common part is that delta."""
    base, variant = klein
    variant_file, _ = comfy_quantize(klein_file(variant), in_blocks)
    base_path = save(klein_file(base), tmp_path / "flux-2-klein-base-4b.safetensors")
    variant_path = save(variant_file, tmp_path / "klein-finetune-fp8.safetensors")
    second_path = save(variant_file, tmp_path / "klein-finetune-fp8-copy.safetensors")
    for options in ({}, {"variant2": second_path}):
        out = tmp_path / f"lora{len(options)}.safetensors"
        result, lines = extract_logged(base_path, variant_path, out, **options)
        check_detection(result, lines, role="Variant")
        if options:
            check_detection(result, lines, role="Variant2")
        lora = lc.check_report_matches_file(result, out)
        check_no_quant_keys(result, lora)
        real_base = webui(klein_file(base))
        errors = relative_errors(apply_default_lora(lora, real_base, True), webui(variant_file), real_base)
        assert max(errors.values()) < lc.DELTA_TOLERANCE, sorted(errors.items(), key=lambda e: -e[1])[:4]
        # the raw fp8 values (scale ignored) are nowhere near the variant's weights
        stored, meant = klein_file(variant), {k: v for k, v in variant_file.items() if v.dtype == torch.float8_e4m3fn}
        misses = [float((meant[k].float() - stored[k].float()).norm() / stored[k].float().norm()) for k in meant]
        assert len(misses) > 10 and min(misses) > 10


def test_klein_fp8_file_lists_the_keys_of_its_bf16_release(klein, tmp_path):
    """The family detection sees exactly the bf16 file's keys; a row range of a fused weight
    reads as those rows of the dequantized weight; the scales are kept apart."""
    from lib_ckpt2lora import architectures
    from lib_ckpt2lora.architectures.base import FileView

    base, _ = klein
    plain = klein_file(base, "bfl", ALL_IN_ONE)
    quantized, header = comfy_quantize(plain, in_blocks, metadata_prefix=ALL_IN_ONE)
    path = save(quantized, tmp_path / "klein-fp8-aio.safetensors", header)
    with TensorFile(path) as file:
        assert set(file.infos) == set(plain)
        arch = architectures.detect(file.infos)
        assert arch.describe(file.infos).startswith("Flux.2 (32 wide), BFL layout, 2 double + 2 single blocks")
        assert "text_encoders, vae skipped" in arch.describe(file.infos)
        assert len(file.fp8_scales) == sum(k.endswith(".weight_scale") for k in quantized)
        view = FileView.build(file, arch)
        key = "transformer_blocks.1.attn.to_k.weight"  # rows of the fused img qkv
        ref = view.refs[key]
        whole = dequantized(quantized)[ref.key]
        assert ref.rows and torch.equal(view.read(key), whole[ref.rows[0] : ref.rows[1]])
        assert torch.equal(file.get(ref.key, (3, 17)), whole[3:17]) and file.get(ref.key).dtype == torch.float32
        assert file.get_stored(ref.key).dtype == torch.float8_e4m3fn


# -- Z-Image -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", ALL_IN_ONE], ids=["bare", "all-in-one"])
def test_zimage_fp8_base_applies_exactly_in_neo_and_comfyui(prefix, tmp_path):
    import test_neo_patcher as neo
    import tiny_models as tm

    states = tm.zimage_model(seed=0).states()
    base = {k: v.to(torch.bfloat16) for k, v in tm.zimage_to_original(states["transformer"]).items()}
    variant = {k: v.to(torch.bfloat16) for k, v in tm.make_variant(base, seed=1).items()}
    base_file, _ = comfy_quantize({prefix + k: v for k, v in base.items()}, in_blocks)
    base_path = save(base_file, tmp_path / "z_image_turbo_fp8_e4m3fn.safetensors")
    variant_path = save(variant, tmp_path / "zimage-finetune.safetensors")
    out = tmp_path / "lora.safetensors"
    result, lines = extract_logged(base_path, variant_path, out, format="neo")
    assert result.architecture == "zimage"
    check_detection(result, lines, family="Z-Image")
    lora = lc.check_report_matches_file(result, out)
    check_no_quant_keys(result, lora)
    real_base = {neo.PREFIX + k[len(prefix) :]: v for k, v in dequantized(base_file).items()}
    target = {neo.PREFIX + k: v.float() for k, v in variant.items()}
    patches, unused = neo.load_lora(lora, neo.lora_key_map(real_base))
    assert not unused, sorted(unused)[:5]
    for one_per_key in (True, False):
        patched = neo.patched(real_base, neo.add_patches(patches, real_base, one_per_key))
        errors = relative_errors(patched, target, real_base, neo.NOT_LORA)
        assert len(errors) == sum(v.ndim >= 2 and "pad_token" not in k for k, v in real_base.items())
        bad = {k: e for k, e in errors.items() if not e < lc.DELTA_TOLERANCE}
        assert not bad, (one_per_key, sorted(bad.items())[:5])


# -- formats it refuses ------------------------------------------------------------------------------

LAYER = "blocks.0.attn"


def small_state():
    generator = torch.Generator().manual_seed(0)
    return {
        f"blocks.{i}.{name}.weight": (0.02 * torch.randn(64, 64, generator=generator)).to(torch.bfloat16)
        for i in range(2)
        for name in ("attn", "mlp")
    }


def nvfp4(weight):
    """nvfp4's tensors (comfy/quant_ops.py QUANT_ALGOS, _load_quantized_module): packed uint8 pairs,
    fp8 block scales per 16 values, a float32 global scale."""
    rows, cols = weight.shape
    return {
        ".weight": torch.randint(0, 255, (rows, cols // 2), dtype=torch.uint8),
        ".weight_scale": torch.ones(rows, cols // 16).to(torch.float8_e4m3fn),
        ".weight_scale_2": torch.tensor(1e-3),
    }


def mxfp8(weight):
    """mxfp8: fp8 values with one e8m0 (uint8) scale per 32."""
    rows, cols = weight.shape
    return {".weight": weight.to(torch.float8_e4m3fn), ".weight_scale": torch.full((rows, cols // 32), 127, dtype=torch.uint8)}


def int8_tensorwise(weight):
    return {".weight": torch.randint(-127, 127, weight.shape, dtype=torch.int8), ".weight_scale": torch.tensor(1e-4)}


def fp8_per_row(weight):
    q, _ = quantize_fp8(weight, "float8_e4m3fn")
    return {".weight": q, ".weight_scale": torch.full((weight.shape[0], 1), 1e-4)}


REFUSED = {
    # case: (tensors of LAYER, its marker (None: none), header format (None: none), words of the sentence)
    "nvfp4": (nvfp4, {"format": "nvfp4"}, None, "ComfyUI's nvfp4 quantized format"),
    "nvfp4-metadata-only": (nvfp4, None, "nvfp4", "ComfyUI's nvfp4 quantized format"),
    "mxfp8": (mxfp8, {"format": "mxfp8"}, None, "ComfyUI's mxfp8 quantized format"),
    "int8_tensorwise": (int8_tensorwise, {"format": "int8_tensorwise"}, None, "ComfyUI's int8_tensorwise quantized format"),
    "unknown": (int8_tensorwise, {"format": "svdquant_w4a4_future"}, None, "svdquant_w4a4_future"),
    "no-format-marker": (int8_tensorwise, None, None, "as int8 with a weight_scale but no format marker"),
    "broken-marker": (fp8_per_row, "not json", None, "comfy_quant format marker that is not ComfyUI's JSON"),
    "fp8-per-row-scale": (fp8_per_row, {"format": "float8_e4m3fn"}, None, "a scale of shape [64, 1], not one scale per tensor"),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("role", ["base", "variant"])
def test_other_formats_are_refused_by_name(case, role, tmp_path):
    make, conf, listed, words = REFUSED[case]
    state = small_state()
    bad = {k: v for k, v in state.items() if not k.startswith(LAYER + ".")}
    bad.update({LAYER + suffix: t for suffix, t in make(state[LAYER + ".weight"]).items()})
    if conf is not None:
        broken = torch.tensor(list(b"\xff" + str(conf).encode()), dtype=torch.uint8)
        bad[LAYER + ".comfy_quant"] = marker(conf) if isinstance(conf, dict) else broken
    header = {"_quantization_metadata": json.dumps({"layers": {LAYER: {"format": listed}}})} if listed else None
    bad_path = save(bad, tmp_path / f"model-{case}.safetensors", header)
    good_path = save(state, tmp_path / "model-bf16.safetensors")
    base, variant = (bad_path, good_path) if role == "base" else (good_path, bad_path)
    out = tmp_path / "out" / "lora.safetensors"
    out.parent.mkdir()
    proc = run_cli_inprocess(["--base", base, "--variant", variant, "--out", out])
    message = assert_clean_failure(proc, str(bad_path), LAYER + " ", words, f"as the {role}")
    assert "bf16/fp16" in message and not any(out.parent.iterdir())
    with pytest.raises(UserError, match="cannot read exactly"):
        TensorFile(bad_path, role)


def test_a_scale_beside_a_bf16_weight_without_a_format_is_not_applied(tmp_path):
    """ComfyUI loads a weight with no format marker as stored, whatever sits beside it."""
    state = small_state()
    odd = dict(state, **{LAYER + ".weight_scale": torch.tensor(1e-3)})
    with TensorFile(save(odd, tmp_path / "odd.safetensors")) as file:
        assert set(file.infos) == set(state) and not file.fp8_scales
        assert torch.equal(file.get(LAYER + ".weight"), state[LAYER + ".weight"])


def test_old_scaled_fp8_with_per_row_scales_is_refused_on_opening(tmp_path):
    state = small_state()
    q, _ = quantize_fp8(state[LAYER + ".weight"], "float8_e4m3fn")
    old = dict(state, **{LAYER + ".weight": q, LAYER + ".scale_weight": torch.full((64, 1), 1e-4)})
    old["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    with pytest.raises(UserError, match=r"stores blocks\.0\.attn as float8_e4m3fn with a scale of shape \[64, 1\]"):
        TensorFile(save(old, tmp_path / "old-per-row.safetensors"), "variant")


def test_damaged_metadata_is_named(tmp_path):
    quantized, _ = comfy_quantize(small_state())
    path = save(quantized, tmp_path / "damaged.safetensors", {"_quantization_metadata": "{not json"})
    with pytest.raises(UserError, match=r"damaged _quantization_metadata header entry") as error:
        TensorFile(path, "base")
    assert str(error.value).count(". ") == 0


# -- realistic width ------------------------------------------------------------------------------


def test_realistic_bf16_variant_against_fp8_base_keeps_the_optimal_energy(tmp_path):
    from lib_ckpt2lora.svd import EXACT_FRACTION, OVERSAMPLE

    shapes = {"blocks.0.attn.weight": (1024, 1024), "blocks.0.mlp.weight": (1536, 1024)}
    true_base = rl.base_weights(shapes, seed=0)  # bf16, as released
    variant = rl.apply_delta(true_base, {k: rl.noisy_delta(*s, seed=10 + i) for i, (k, s) in enumerate(shapes.items())})
    base_file, header = comfy_quantize(true_base, metadata_prefix="")
    base_path = save(base_file, tmp_path / "base-fp8.safetensors", header)
    variant_path = rl.save(variant, tmp_path / "variant-bf16.safetensors")
    out = tmp_path / "lora.safetensors"
    cap = 64
    result, lines = extract_logged(base_path, variant_path, out, rank_thresh=0.9, rank_max=cap, min_dim=16)
    check_lines = [line for line in lines if line.startswith("Base:")]
    assert "fp8 (float8_e4m3fn) with per-tensor scales: 2 weights read dequantized" in check_lines[0]
    assert any(w.startswith("base-fp8.safetensors is stored in fp8, whose rounding") for w in result.report.warnings)
    written = dense(load_file(str(out)))
    real_base = dequantized(base_file)
    assert len(result.report.layers) == len(shapes)
    for layer in result.report.layers:
        delta = (variant[layer.key].float() - real_base[layer.key]).double()
        assert cap + OVERSAMPLE < EXACT_FRACTION * min(delta.shape), "this layer would take the exact path"
        values = torch.linalg.svdvals(delta)
        optimum = float((values[: layer.rank] ** 2).sum() / (values**2).sum())
        product = written["diffusion_model." + layer.key[: -len(".weight")]].double()
        captured = 1 - float((delta - product).norm() ** 2 / delta.norm() ** 2)
        assert captured >= 0.999 * optimum, (layer.key, layer.rank, captured, optimum)
        assert layer.energy == pytest.approx(captured, abs=1e-4)
        # what fp8 does to such a pair: its rounding of the base is a full-rank part of the delta,
        # larger than the fine-tune's own change (a LoRA cannot tell them apart)
        rounding = (true_base[layer.key].double() - real_base[layer.key].double()).norm()
        fine_tune = (variant[layer.key].double() - true_base[layer.key].double()).norm()
        assert rounding > fine_tune

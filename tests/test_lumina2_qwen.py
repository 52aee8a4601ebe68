"""Lumina-Image-2.0 name maps at full size and its LoRAs in real loaders on a tiny model.

Full size (meta device, Lumina-Image-2.0's config): every weight of the real
``Lumina2Transformer2DModel``, original layout (bare and all-in-one) and diffusers layout,
maps to a LoRA module; diffusers' own Lumina2 LoRA conversion turns the modules into
modules of the model. Tiny real model: the test original layout equals what diffusers'
single-file converter expects; ``--format diffusers`` loads in ``Lumina2Pipeline`` with
every module injected and fused weights = variant; the default ``comfy`` format applied
the ComfyUI / Forge Neo way (``diffusion_model.<key>``, one patch per weight) makes every
weight, fused qkv included, equal the variant's.
"""

from __future__ import annotations

import inspect
import textwrap

import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel
from test_names import converted_modules, infos_of, lora_entries, meta, module_names

from lib_ckpt2lora import architectures
from lib_ckpt2lora.architectures.base import FileView
from lib_ckpt2lora.architectures.lumina2 import Lumina2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LUMINA2_FULL = dict(
    hidden_size=2304, num_layers=26, num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, cap_feat_dim=2304
)
LUMINA2_TINY = dict(
    hidden_size=64,
    num_layers=2,
    num_refiner_layers=1,
    num_attention_heads=4,
    num_kv_heads=2,
    multiple_of=16,
    cap_feat_dim=32,
    axes_dim_rope=(4, 6, 6),
    axes_lens=(32, 16, 16),
)
ALL_IN_ONE = "model.diffusion_model."


def lumina2_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers layout -> the original (ComfyUI) layout, q|k|v concatenated into qkv."""
    arch = Lumina2("", "original layout")
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        name = arch.original_name(module)
        if module.endswith("attn.to_q"):
            head = module[: -len("to_q")]
            value = torch.cat([state[f"{head}to_{part}.{param}"] for part in "qkv"])
        elif module.endswith(("attn.to_k", "attn.to_v")):
            continue
        out[f"{name}.{param}"] = value
    return out


def lumina2_single_file_converter(hidden: int, kv: int):
    """diffusers' ``convert_lumina2_to_diffusers`` with its hard-coded full-size q/k/v rows
    replaced by the tiny model's; the rest of its code runs unchanged."""
    from diffusers.loaders import single_file_utils

    source = textwrap.dedent(inspect.getsource(single_file_utils.convert_lumina2_to_diffusers))
    assert "q_dim = 2304" in source and "k_dim = v_dim = 768" in source, "converter changed: update this helper"
    source = source.replace("q_dim = 2304", f"q_dim = {hidden}").replace("k_dim = v_dim = 768", f"k_dim = v_dim = {kv}")
    namespace = dict(vars(single_file_utils))
    exec(compile(source, single_file_utils.__file__, "exec"), namespace)
    return namespace["convert_lumina2_to_diffusers"]


# -- full size ------------------------------------------------------------------------------


def full_size_lumina2(layout):
    model = meta(lambda: Lumina2Transformer2DModel(**LUMINA2_FULL))
    state = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
    if layout != "diffusers":
        state = lumina2_to_original(state)
        state["norm_final.weight"] = torch.empty(2304, device="meta")  # in the original files, unused
    if layout == "all-in-one":
        state = {ALL_IN_ONE + k: v for k, v in state.items()}
        state["text_encoders.gemma2_2b.model.embed_tokens.weight"] = torch.empty(256000, 2304, device="meta")
        state["vae.decoder.conv_in.weight"] = torch.empty(512, 16, 3, 3, device="meta")
    return model, state


def sized_lora(arch, fmt, infos):
    """Rank-1 zero factors with each module's real row/column counts (a fused module's rows
    are its parts' sum: diffusers' converter splits them 2304/768/768)."""
    view = FileView.build(type("F", (), {"infos": infos})(), arch)
    modules, missing = lora_entries(arch, fmt, infos)
    style, state = arch.formats[fmt], {}
    for module, key in modules.items():
        parts = arch.fusion(key, fmt) or (key,)
        state[module + style.down] = torch.zeros(1, view.shapes[key][1])
        state[module + style.up] = torch.zeros(sum(view.shapes[p][0] for p in parts), 1)
    return state, missing, view


@pytest.mark.parametrize("fmt", ["comfy", "diffusers"])
@pytest.mark.parametrize("layout", ["original", "diffusers", "all-in-one"])
def test_lumina2_full_size_names_load_in_diffusers(layout, fmt):
    model, state = full_size_lumina2(layout)
    infos = infos_of(state)
    arch = architectures.detect(infos)
    assert arch.name == "lumina2"
    described = arch.describe(infos)
    kind = "diffusers" if layout == "diffusers" else "original"
    assert described.startswith(f"Lumina-Image-2.0, {kind} layout, 26 blocks")
    if layout == "all-in-one":
        assert "text_encoders, vae skipped" in described
    lora, missing, view = sized_lora(arch, fmt, infos)
    assert missing == []
    expected = {key.rpartition(".")[0] for key, shape in view.shapes.items() if len(shape) >= 2}
    assert expected <= module_names(model)
    if fmt == "comfy":
        qkv = [k for k in lora if k.endswith("attention.qkv.lora_B.weight")]
        assert len(qkv) == 26 + 2 + 2 and all(lora[k].shape[0] == 2304 + 768 + 768 for k in qkv)
        # diffusers' converter takes the blocks only; the embedders make it raise
        with pytest.raises(ValueError, match="should be empty"):
            Lumina2Pipeline.lora_state_dict(dict(lora))
        top = ("x_embedder", "t_embedder", "cap_embedder", "final_layer")
        lora = {k: v for k, v in lora.items() if not k.startswith(tuple("diffusion_model." + t for t in top))}
        expected = {m for m in expected if m.startswith(("layers.", "noise_refiner.", "context_refiner."))}
    converted = Lumina2Pipeline.lora_state_dict(lora)
    landed = {name.removeprefix("transformer.") for name in converted_modules(converted)}
    assert landed == expected


def test_zimage_original_layout_is_still_zimage():
    from diffusers import ZImageTransformer2DModel
    from tiny_models import zimage_to_original

    full = meta(ZImageTransformer2DModel).state_dict()
    state = zimage_to_original({k: torch.empty(v.shape, device="meta") for k, v in full.items()})
    assert architectures.detect(infos_of(state)).name == "zimage"


# -- tiny real model ----------------------------------------------------------------------------


def lumina2_transformer(seed=0):
    return tm.randomize_(Lumina2Transformer2DModel(**LUMINA2_TINY), seed).eval()


def lumina2_checkpoint(state, layout, prefix=""):
    tensors = lumina2_to_original(state) if layout == "original" else dict(state)
    tensors = {prefix + k: v for k, v in tensors.items()}
    if prefix:
        tensors["text_encoders.gemma2_2b.model.embed_tokens.weight"] = torch.randn(64, 32)
        tensors["vae.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3)
    return tensors


def make_lumina2_pair(folder, base_layout="original", variant_layout="original", prefix=""):
    model = lumina2_transformer(seed=0)
    tiny = tm.TinyModel({"transformer": model}, "lumina2", {k: ("transformer", k) for k in model.state_dict()})
    base = tiny.states()
    variant = {"transformer": tm.make_variant(base["transformer"], seed=1)}
    folder.mkdir(parents=True, exist_ok=True)
    base_path = tm.save(lumina2_checkpoint(base["transformer"], base_layout, prefix), folder / "base.safetensors")
    variant_path = tm.save(lumina2_checkpoint(variant["transformer"], variant_layout, prefix), folder / "variant.safetensors")
    return lc.Pair(tiny, base, variant, base_path, variant_path)


@pytest.fixture(scope="module")
def lumina2_pair(tmp_path_factory, one_torch_thread):
    return make_lumina2_pair(tmp_path_factory.mktemp("lumina2"))


def test_lumina2_original_layout_matches_diffusers_single_file_converter():
    state = lumina2_transformer().state_dict()
    original = lumina2_to_original(state)
    assert "layers.0.attention.qkv.weight" in original and "layers.0.feed_forward.w1.weight" in original
    assert original["layers.0.attention.qkv.weight"].shape == (64 + 2 * 32, 64)
    converted = lumina2_single_file_converter(64, 32)(dict(original))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_lumina2_diffusers_format_loads_exactly_in_diffusers(lumina2_pair, tmp_path):
    pair = lumina2_pair
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out, format="diffusers")
    assert result.architecture == "lumina2"
    lora = lc.check_report_matches_file(result, out)
    assert all(k.startswith("transformer.") for k in lora)
    assert any(".attn.to_k." in k for k in lora) and not any(".qkv." in k for k in lora)
    written = lc.written_params(pair.model, result)
    lc.assert_coverage(pair, written, ())
    transformer = pair.model.copy_with(pair.base).components["transformer"]
    pipeline = Lumina2Pipeline(transformer, None, None, None, None)
    messages, injected = lc.diffusers_load(pipeline, out, {"transformer": transformer})
    complaints = [m for m in lc.key_complaints(messages) if "prefix='text_encoder'" not in m]
    assert not complaints, messages
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
    pipeline.fuse_lora()
    checked = lc.assert_weights(pair, {"transformer": lc.clean_state(transformer)}, written, "diffusers")
    assert checked == len(result.report.layers)


def comfy_apply(lora, checkpoint):
    """ComfyUI's / Forge Neo's application of ``diffusion_model.<key>`` LoRA modules to an
    original-layout model: each module patches its weight whole, scale alpha/rank (1 when
    the file has no alpha). Returns the patched weights and the modules that matched."""
    patched = {k: v.clone().double() for k, v in checkpoint.items()}
    matched = set()
    for module in lc.lora_module_names(lora):
        key = module.removeprefix("diffusion_model.") + ".weight"
        if not module.startswith("diffusion_model.") or key not in checkpoint:
            continue
        up, down = lora[module + ".lora_B.weight"].double(), lora[module + ".lora_A.weight"].double()
        alpha = lora.get(module + ".alpha")
        patched[key] += (1.0 if alpha is None else float(alpha) / down.shape[0]) * (up @ down)
        matched.add(module)
    return patched, matched


def assert_comfy_exact(lora, base, variant):
    patched, matched = comfy_apply(lora, base)
    modules = lc.lora_module_names(lora)
    assert matched == modules, f"unmatched: {sorted(modules - matched)[:5]}"
    assert {"diffusion_model." + k[: -len(".weight")] for k, v in base.items() if v.ndim == 2} == modules
    errors = []
    for key, value in patched.items():
        delta = (variant[key].double() - base[key].double()).norm()
        if delta == 0:
            assert torch.equal(value, base[key].double()), key
            continue
        error = float((value - variant[key].double()).norm() / delta)
        if not error < lc.DELTA_TOLERANCE:
            errors.append(f"{key}: {error:.3g}")
    assert not errors, errors[:6]


def test_lumina2_default_format_applies_exactly_the_comfyui_way(lumina2_pair, tmp_path):
    pair = lumina2_pair
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out)
    assert result.architecture == "lumina2"
    lora = lc.check_report_matches_file(result, out)
    modules = lc.lora_module_names(lora)
    assert all(m.startswith("diffusion_model.") for m in modules)
    assert sum(m.endswith(".attention.qkv") for m in modules) == 2 + 1 + 1
    assert not any(".to_q" in m for m in modules) and not any(k.endswith(".alpha") for k in lora)
    base = lumina2_checkpoint(pair.base["transformer"], "original")
    variant = lumina2_checkpoint(pair.variant["transformer"], "original")
    assert_comfy_exact(lora, base, variant)


def test_lumina2_layouts_give_the_same_lora(lumina2_pair, tmp_path):
    from safetensors.torch import load_file

    mixed = make_lumina2_pair(tmp_path / "mixed", base_layout="diffusers", variant_layout="original", prefix=ALL_IN_ONE)
    lc.run_extract(lumina2_pair.base_path, lumina2_pair.variant_path, tmp_path / "a.safetensors")
    lc.run_extract(mixed.base_path, mixed.variant_path, tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# == Qwen-Image ==================================================================================
# One layout (ComfyUI's names are diffusers'), nothing fused: both formats must load in
# diffusers' QwenImagePipeline with every module and, the default, apply the ComfyUI way.

QWEN_FULL = dict(
    num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584, in_channels=64, out_channels=16
)
QWEN_TINY = dict(
    num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, in_channels=16, out_channels=4,
    axes_dims_rope=(4, 6, 6),
)


@pytest.mark.parametrize("fmt", ["diffusion_model", "diffusers"])
@pytest.mark.parametrize("prefix", ["", ALL_IN_ONE])
def test_qwen_image_full_size_names_load_in_diffusers(prefix, fmt):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    model = meta(lambda: QwenImageTransformer2DModel(**QWEN_FULL))
    state = {prefix + k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
    if prefix:
        state["text_encoders.qwen25_7b.transformer.model.embed_tokens.weight"] = torch.empty(152064, 3584, device="meta")
        state["vae.decoder.conv_in.weight"] = torch.empty(384, 16, 3, 3, 3, device="meta")
    infos = infos_of(state)
    arch = architectures.detect(infos)
    assert arch.name == "qwen_image"
    described = arch.describe(infos)
    assert described.startswith("Qwen-Image, 60 blocks")
    assert ("text_encoders, vae skipped (text encoder Qwen2.5-VL" in described) == bool(prefix)
    lora, missing, view = sized_lora(arch, fmt, infos)
    if arch.formats[fmt].writes_alpha:
        downs = [k for k in lora if k.endswith(".lora_A.weight")]
        lora.update({k.replace(".lora_A.weight", ".alpha"): torch.tensor(1.0) for k in downs})
    assert missing == []
    expected = {key.rpartition(".")[0] for key, shape in view.shapes.items() if len(shape) >= 2}
    assert len(expected) == 60 * 14 + 6 and expected <= module_names(model)
    converted = QwenImagePipeline.lora_state_dict(lora)
    landed = {name.removeprefix("transformer.") for name in converted_modules(converted)}
    assert landed == expected


def qwen_transformer(seed=0):
    from diffusers import QwenImageTransformer2DModel

    return tm.randomize_(QwenImageTransformer2DModel(**QWEN_TINY), seed).eval()


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory, one_torch_thread):
    folder = tmp_path_factory.mktemp("qwen")
    model = qwen_transformer(seed=0)
    tiny = tm.TinyModel({"transformer": model}, "qwen_image", {k: ("transformer", k) for k in model.state_dict()})
    base = tiny.states()
    variant = {"transformer": tm.make_variant(base["transformer"], seed=1)}
    # ComfyUI's all-in-one layout for the base, diffusers' bare shard for the variant
    base_path = tm.save({ALL_IN_ONE + k: v for k, v in base["transformer"].items()}, folder / "base.safetensors")
    variant_path = tm.save(variant["transformer"], folder / "variant.safetensors")
    return lc.Pair(tiny, base, variant, base_path, variant_path)


@pytest.mark.parametrize("fmt", ["diffusion_model", "diffusers"])
def test_qwen_image_loads_exactly_in_diffusers(qwen_pair, tmp_path, fmt):
    from diffusers import QwenImagePipeline

    pair = qwen_pair
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out, format=fmt)
    assert result.architecture == "qwen_image"
    lora = lc.check_report_matches_file(result, out)
    head = "diffusion_model." if fmt == "diffusion_model" else "transformer."
    assert all(k.startswith(head) for k in lora)
    assert any(k.endswith(".alpha") for k in lora) == (fmt == "diffusion_model")
    written = lc.written_params(pair.model, result)
    lc.assert_coverage(pair, written, ())
    transformer = pair.model.copy_with(pair.base).components["transformer"]
    pipeline = QwenImagePipeline(None, None, None, None, transformer)
    messages, injected = lc.diffusers_load(pipeline, out, {"transformer": transformer})
    complaints = [m for m in lc.key_complaints(messages) if "prefix='text_encoder'" not in m]
    assert not complaints, messages
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
    pipeline.fuse_lora()
    checked = lc.assert_weights(pair, {"transformer": lc.clean_state(transformer)}, written, "diffusers")
    assert checked == len(result.report.layers)


def test_qwen_image_default_format_applies_exactly_the_comfyui_way(qwen_pair, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(qwen_pair.base_path, qwen_pair.variant_path, out)
    lora = lc.check_report_matches_file(result, out)
    assert_comfy_exact(lora, qwen_pair.base["transformer"], qwen_pair.variant["transformer"])

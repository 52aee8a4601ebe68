"""Flux.1 and Chroma LoRAs from the engine, applied by real loaders to tiny real models.

Tiny real ``FluxTransformer2DModel`` (dev-like: guidance embedder) and
``ChromaTransformer2DModel`` with a known rank-1..4 delta on every weight, saved in BFL
layout (the layout of the hub files and of ComfyUI all-in-one files):

- the test BFL layout equals what diffusers' own single-file converters expect;
- ``--format diffusers``: ``FluxPipeline`` / ``ChromaPipeline.load_lora_weights`` inject
  every module in the file, and after ``fuse_lora`` every weight equals the variant's;
- ``--format kohya`` (the default): applied the way ComfyUI and Forge do
  (``lora_unet_<key with _>`` -> ``diffusion_model.<key>``, scale alpha/rank, one patch per
  weight), every fused BFL weight (qkv, linear1, final modulation) equals the variant's.
  diffusers' kohya converter only takes the full-size model: tests/test_names_dit.py;
- base and variant in different layouts give the same LoRA;
- a Flux.1 Fill variant against a plain Flux.1 base is refused in one sentence.
"""

from __future__ import annotations

import dit_layouts as dl
import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from safetensors.torch import load_file

from lib_ckpt2lora.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {
    "flux": (dl.flux_transformer, "convert_flux_transformer_checkpoint_to_diffusers"),
    "chroma": (dl.chroma_transformer, "convert_chroma_transformer_checkpoint_to_diffusers"),
}


def make_pair(family, folder, base_layout="bfl", variant_layout="bfl", prefix=""):
    factory, _ = FAMILIES[family]
    model = factory(seed=0)
    tiny = tm.TinyModel({"transformer": model}, family, dl.canonical_map(model))
    base = tiny.states()
    variant = {"transformer": tm.make_variant(base["transformer"], seed=1)}
    folder.mkdir(parents=True, exist_ok=True)
    base_path = tm.save(dl.checkpoint(base["transformer"], base_layout, family, prefix), folder / "base.safetensors")
    variant_path = tm.save(dl.checkpoint(variant["transformer"], variant_layout, family, prefix), folder / "variant.safetensors")
    return lc.Pair(tiny, base, variant, base_path, variant_path)


@pytest.fixture(scope="module", params=["flux", "chroma"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pair(family, tmp_path_factory, one_torch_thread):
    return make_pair(family, tmp_path_factory.mktemp(family))


@pytest.mark.parametrize("name", ["flux", "chroma"])
def test_bfl_layout_matches_diffusers_single_file_converter(name):
    factory, converter = FAMILIES[name]
    state = factory(seed=0).state_dict()
    bfl = dl.to_bfl(state, name)
    assert any(k.endswith(".linear1.weight") for k in bfl) and any(k.endswith(".img_attn.qkv.weight") for k in bfl)
    converted = dl.single_file_converter(converter, state["x_embedder.weight"].shape[0])(dict(bfl))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


def load_into_diffusers(family, pair, lora_path):
    from diffusers import ChromaPipeline, FluxPipeline

    transformer = pair.model.copy_with(pair.base).components["transformer"]
    if family == "flux":
        pipeline = FluxPipeline(None, None, None, None, None, None, transformer)
    else:
        pipeline = ChromaPipeline(None, None, None, None, transformer)
    messages, injected = lc.diffusers_load(pipeline, lora_path, {"transformer": transformer})
    return pipeline, transformer, messages, injected


def test_diffusers_format_loads_exactly_in_diffusers(family, pair, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out, format="diffusers")
    assert result.architecture == family
    lora = lc.check_report_matches_file(result, out)
    assert all(k.startswith("transformer.") for k in lora)
    assert any(".attn.to_q." in k for k in lora) and not any(".qkv." in k for k in lora)
    written = lc.written_params(pair.model, result)
    lc.assert_coverage(pair, written, ())
    pipeline, transformer, messages, injected = load_into_diffusers(family, pair, out)
    # (the pipelines also look for text-encoder keys; there are none, by design)
    complaints = [m for m in lc.key_complaints(messages) if "prefix='text_encoder'" not in m]
    assert not complaints, messages
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
    pipeline.fuse_lora()
    checked = lc.assert_weights(pair, {"transformer": lc.clean_state(transformer)}, written, "diffusers")
    assert checked == len(result.report.layers)


def comfy_apply(lora: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor]):
    """ComfyUI's / Forge's LoRA application to a BFL diffusion model: ``lora_unet_<key
    without .weight, dots as _>`` names ``diffusion_model.<key>``; the weight gets
    alpha/rank * up @ down. Returns the patched weights and the modules that matched."""
    names = {"lora_unet_" + key[: -len(".weight")].replace(".", "_"): key for key in checkpoint if key.endswith(".weight")}
    patched = {k: v.clone().double() for k, v in checkpoint.items()}
    matched = set()
    for module in lc.lora_module_names(lora):
        key = names.get(module)
        if key is None:
            continue
        up, down = lora[module + ".lora_up.weight"].double(), lora[module + ".lora_down.weight"].double()
        scale = float(lora[module + ".alpha"]) / down.shape[0]
        patched[key] += scale * (up @ down)
        matched.add(module)
    return patched, matched


def test_default_kohya_format_applies_exactly_the_comfyui_way(family, pair, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out)
    assert result.architecture == family
    lora = lc.check_report_matches_file(result, out)
    modules = lc.lora_module_names(lora)
    assert all(m.startswith("lora_unet_") for m in modules)
    fused = ("_img_attn_qkv", "_txt_attn_qkv", "_linear1") + (("_final_layer_adaLN_modulation_1",) if family == "flux" else ())
    assert all(any(m.endswith(f) for m in modules) for f in fused)
    assert not any("_to_q" in m for m in modules)
    base = dl.checkpoint(pair.base["transformer"], "bfl", family)
    variant = dl.checkpoint(pair.variant["transformer"], "bfl", family)
    patched, matched = comfy_apply(lora, base)
    assert matched == modules, f"unmatched: {sorted(modules - matched)[:5]}"
    errors = []
    for key, value in patched.items():
        delta = (variant[key].double() - base[key].double()).norm()
        if delta == 0:
            continue
        error = float((value - variant[key].double()).norm() / delta)
        if not error < lc.DELTA_TOLERANCE:
            errors.append(f"{key}: {error:.3g}")
    assert not errors, errors[:6]
    # every >=2-D weight got a module, every fused one whole
    assert {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k, v in base.items() if v.ndim == 2} == modules


def test_layouts_give_the_same_lora(family, pair, tmp_path):
    mixed = make_pair(family, tmp_path / "mixed", base_layout="diffusers", variant_layout="bfl", prefix=dl.ALL_IN_ONE)
    first = lc.run_extract(pair.base_path, pair.variant_path, tmp_path / "a.safetensors")
    second = lc.run_extract(mixed.base_path, mixed.variant_path, tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert len(first.report.layers) == len(second.report.layers)


def test_fill_variant_against_plain_flux_is_refused(tmp_path):
    base_model = dl.flux_transformer(seed=0)
    fill_model = dl.flux_transformer(seed=0, in_channels=384, out_channels=64)
    base = tm.save(dl.checkpoint(base_model.state_dict(), "bfl"), tmp_path / "flux1-dev.safetensors")
    fill = tm.save(dl.checkpoint(fill_model.state_dict(), "bfl"), tmp_path / "flux1-fill-dev.safetensors")
    out = tmp_path / "lora.safetensors"
    with pytest.raises(UserError) as error:
        lc.run_extract(base, fill, out)
    message = str(error.value)
    assert "flux1-dev.safetensors is Flux.1" in message and "flux1-fill-dev.safetensors is Flux.1 Fill" in message
    assert message.count(". ") == 0 and not out.exists()

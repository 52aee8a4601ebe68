"""Anima: name maps at full size, its LoRAs in real and emulated loaders on a tiny model.

Full size (meta device, Anima's config: 28 blocks of 2048, the 6-block LLM adapter):
every >=2-D weight of diffusers' real ``CosmosTransformer3DModel`` + ``AnimaTextConditioner``,
in the original layout (``net.``, bare, all-in-one) and the diffusers layout, maps to a LoRA
module; the original names are checked against diffusers' own Cosmos-Predict2 single-file
converter (written independently of ours), and diffusers' Anima LoRA loader turns each module
of either format into a module of the model.

Tiny real model (``CosmosTransformer3DModel`` + ``AnimaTextConditioner``): the default format
applied the ComfyUI way (``net.`` stripped, ``diffusion_model.<key>``, every patch kept) and
the Forge Neo way (llm_adapter moved into the text encoder and the LoRA's keys renamed to it,
one patch per weight; nolanlane/sd-webui-forge-classic @6e1e0d5 ``backend/loader.py`` and
``extensions-builtin/sd_forge_lora/networks.py process_anima``) makes every weight equal the
variant's with every key used; ``--format diffusers`` loads in ``AnimaModularPipeline`` with
every module injected. Detection names Anima in every layout, with no generic warning, and a
Cosmos-Predict2 or other-family variant is refused in one sentence.
"""

from __future__ import annotations

import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from safetensors.torch import load_file
from test_names import converted_modules, infos_of, lora_entries, meta, module_names
from test_neo_patcher import add_patches, load_lora, patched

from lib_ckpt2lora import architectures
from lib_ckpt2lora.architectures.anima import comfy_name
from lib_ckpt2lora.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Anima as ComfyUI builds it (comfy/model_detection.py, "anima": 2048 wide, 16 heads, 28
# blocks, adaLN-LoRA 256, 16+1 input channels, RoPE 4x on h/w) in diffusers' terms.
ANIMA_FULL = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=16,
    attention_head_dim=128,
    num_layers=28,
    mlp_ratio=4.0,
    text_embed_dim=1024,
    adaln_lora_dim=256,
    max_size=(128, 240, 240),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 4.0, 4.0),
    concat_padding_mask=True,
    extra_pos_embed_type=None,
)
TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=24,
    num_layers=2,
    text_embed_dim=16,
    adaln_lora_dim=8,
    max_size=(4, 16, 16),
    rope_scale=(1.0, 4.0, 4.0),
    extra_pos_embed_type=None,
)
TINY_ADAPTER = dict(source_dim=12, target_dim=16, model_dim=16, num_layers=2, num_attention_heads=2, target_vocab_size=40)
ALL_IN_ONE = "model.diffusion_model."
# What the released files hold beside the weights (diffusers' converter drops them by name).
COSMOS_EXTRAS = {
    "pos_embedder.dim_spatial_range": torch.arange(4, dtype=torch.float32),
    "pos_embedder.dim_temporal_range": torch.arange(4, dtype=torch.float32),
    "pos_embedder.seq": torch.arange(8, dtype=torch.float32),
    "accum_video_sample_counter": torch.tensor(3, dtype=torch.int64),
}


def to_original(transformer: dict, conditioner: dict | None) -> dict:
    """diffusers components -> ComfyUI's Anima keys (no prefix)."""
    out = {}
    for key, value in transformer.items():
        module, _, param = key.rpartition(".")
        out[f"{comfy_name(module)}.{param}"] = value
    for key, value in (conditioner or {}).items():
        out["llm_adapter." + key] = value
    return out


def checkpoint(states: dict, layout: str, prefix: str = "net.", adapter: bool = True) -> dict:
    """A file: "original" (under ``prefix``, with Cosmos' extra tensors) or "diffusers"
    (``transformer.`` + ``text_conditioner.``); an all-in-one prefix adds a text encoder and VAE."""
    conditioner = states["text_conditioner"] if adapter else None
    if layout == "diffusers":
        tensors = {"transformer." + k: v for k, v in states["transformer"].items()}
        tensors |= {"text_conditioner." + k: v for k, v in (conditioner or {}).items()}
    else:
        tensors = {prefix + k: v for k, v in (to_original(states["transformer"], conditioner) | COSMOS_EXTRAS).items()}
    if prefix == ALL_IN_ONE:
        tensors["text_encoders.qwen3_06b.transformer.model.embed_tokens.weight"] = torch.randn(64, 12)
        tensors["vae.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3, 3)
    return tensors


# -- full size ------------------------------------------------------------------------------------


def full_size_states():
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    models = {"transformer": meta(lambda: CosmosTransformer3DModel(**ANIMA_FULL)), "text_conditioner": meta(AnimaTextConditioner)}
    states = {
        name: {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
        for name, model in models.items()
    }
    return models, states


def sized_lora(arch, fmt, infos):
    from lib_ckpt2lora.architectures.base import FileView

    view = FileView.build(type("F", (), {"infos": infos})(), arch)
    modules, missing = lora_entries(arch, fmt, infos)
    style = arch.formats[fmt]
    state = {}
    for module, key in modules.items():
        state[module + style.down] = torch.zeros(1, view.shapes[key][1])
        state[module + style.up] = torch.zeros(view.shapes[key][0], 1)
    return state, missing, view


def test_full_size_original_names_are_diffusers_converters():
    """Our ComfyUI names for the DiT, turned back by diffusers' own Cosmos-Predict2 converter
    (``convert_cosmos_transformer_checkpoint_to_diffusers``), are exactly the real model's keys."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    _, states = full_size_states()
    original = {"net." + k: v for k, v in (to_original(states["transformer"], None) | COSMOS_EXTRAS).items()}
    converted = convert_cosmos_transformer_checkpoint_to_diffusers(dict(original))
    assert set(converted) == set(states["transformer"])
    assert all(converted[k].shape == states["transformer"][k].shape for k in converted)


@pytest.mark.parametrize("fmt", ["diffusion_model", "diffusers"])
@pytest.mark.parametrize("layout", ["net", "bare", "all-in-one", "diffusers"])
def test_full_size_names_load_in_diffusers(layout, fmt):
    from diffusers.modular_pipelines import AnimaModularPipeline

    models, states = full_size_states()
    prefix = {"net": "net.", "bare": "", "all-in-one": ALL_IN_ONE, "diffusers": ""}[layout]
    infos = infos_of(checkpoint(states, "diffusers" if layout == "diffusers" else "original", prefix))
    arch = architectures.detect(infos)
    assert arch.name == "anima"
    described = arch.describe(infos)
    kind = "diffusers" if layout == "diffusers" else "original"
    assert described.startswith(f"Anima, {kind} layout, 28 blocks")
    assert ("skipped" in described) == (layout == "all-in-one")
    assert ("; text_encoders, vae skipped (text encoder/VAE" in described) == (layout == "all-in-one")
    lora, missing, view = sized_lora(arch, fmt, infos)
    assert missing == (["llm_adapter.embed.weight"] if fmt == "diffusers" else [])
    matrices = {key.rpartition(".")[0] for key, shape in view.shapes.items() if len(shape) >= 2}
    assert len(matrices) == 28 * 16 + 6 + 6 * 10 + 2  # blocks, DiT embedders + final layer, adapter blocks, embed + out_proj
    converted = converted_modules(AnimaModularPipeline.lora_state_dict(lora))
    expected = {name: {f"{name}.{module}" for module in module_names(model) if module} for name, model in models.items()}
    wanted = {m for m in expected["transformer"] | expected["text_conditioner"]}
    landed = {m for m in converted if m in wanted}
    assert landed == converted, f"modules not in the model: {sorted(converted - landed)[:5]}"
    assert len(converted) == len(matrices) - (fmt == "diffusers")


# -- tiny real model --------------------------------------------------------------------------------


def tiny_model(seed=0) -> tm.TinyModel:
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    transformer = tm.randomize_(CosmosTransformer3DModel(**TINY), seed).eval()
    conditioner = tm.randomize_(AnimaTextConditioner(**TINY_ADAPTER), seed + 1).eval()
    canonical = {}
    for key in transformer.state_dict():
        module, _, param = key.rpartition(".")
        canonical[f"{comfy_name(module)}.{param}"] = ("transformer", key)
    for key in conditioner.state_dict():
        canonical["llm_adapter." + key] = ("text_conditioner", key)
    return tm.TinyModel({"transformer": transformer, "text_conditioner": conditioner}, "anima", canonical)


def make_pair(folder, base_layout="original", variant_layout="original", prefix="net.", variant_adapter=True):
    model = tiny_model()
    base = model.states()
    variant = tm.variant_states(base, include_1d=True)
    folder.mkdir(parents=True, exist_ok=True)
    base_path = tm.save(checkpoint(base, base_layout, prefix), folder / "anima-base.safetensors")
    variant_path = tm.save(checkpoint(variant, variant_layout, prefix, variant_adapter), folder / "anima-variant.safetensors")
    return lc.Pair(model, base, variant, base_path, variant_path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_torch_thread):
    return make_pair(tmp_path_factory.mktemp("anima"))


def test_tiny_original_layout_matches_diffusers_converter(pair):
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    dit = {k: v for k, v in load_file(str(pair.base_path)).items() if not k.startswith("net.llm_adapter.")}
    converted = convert_cosmos_transformer_checkpoint_to_diffusers(dit)
    assert set(converted) == set(pair.base["transformer"])
    assert all(torch.equal(converted[k], pair.base["transformer"][k]) for k in converted)


def comfy_model(path) -> dict[str, torch.Tensor]:
    """What ComfyUI's Anima holds after loading ``path``: ``unet_prefix_from_state_dict``
    finds "net.", the keys lose it, the model stores them under ``diffusion_model.``."""
    file = load_file(str(path))
    return {"diffusion_model." + k[len("net.") :]: v.float() for k, v in file.items() if k.startswith("net.")}


def neo_model(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forge Neo's (DiT state, text encoder state) after loading ``path``: "net." stripped
    (huggingface_guess ``unet_prefix_from_state_dict``), the llm_adapter moved into the
    text encoder (``process_anima``), held by ``JointTextEncoder({"qwen3_06b": ...})``."""
    dit = {k[len("net.") :]: v.float() for k, v in load_file(str(path)).items() if k.startswith("net.")}
    unet = {"diffusion_model." + k: v for k, v in dit.items() if not k.startswith("llm_adapter.")}
    text = {"qwen3_06b." + k: v for k, v in dit.items() if k.startswith("llm_adapter.")}
    return unet, text


def generic_key_map(state: dict, head: str, kohya: bool) -> dict[str, str]:
    """``model_lora_keys_unet`` / ``model_lora_keys_clip``'s generic rules (ComfyUI and Neo)."""
    key_map = {}
    for key in state:
        if key.endswith(".weight"):
            key_map[head + key[: -len(".weight")]] = key
            if kohya:
                key_map["lora_unet_" + key[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = key
        elif not head:
            key_map[key] = key
    return key_map


def neo_apply(lora: dict, unet: dict, text: dict):
    """Neo's ``load_lora_for_models`` for Anima: rename, unet keys, then text-encoder keys,
    one patch per weight. Returns the patched states and the keys nothing took."""
    lora = dict(lora)
    for key in list(lora):  # networks.py process_anima
        if key.startswith("diffusion_model.llm_adapter"):
            lora[key.replace("diffusion_model", "text_encoders.qwen3_06b")] = lora.pop(key)
    unet_patches, not_unet = load_lora(lora, generic_key_map(unet, "", kohya=True))
    text_patches, not_text = load_lora(lora, generic_key_map(text, "text_encoders.", kohya=False))
    unused = not_unet & not_text
    return patched(unet, add_patches(unet_patches, unet, True)), patched(text, add_patches(text_patches, text, True)), unused


def assert_equals_variant(result: dict, base: dict, variant: dict, full_layer: bool) -> int:
    errors, checked = [], 0
    for key, value in result.items():
        delta = (variant[key] - base[key]).norm()
        if not full_layer and base[key].ndim < 2 or delta == 0:
            assert torch.equal(value, base[key]) or delta == 0, key
            continue
        error = float((value - variant[key]).norm() / delta)
        checked += 1
        if not error < lc.DELTA_TOLERANCE:
            errors.append(f"{key}: {error:.3g}")
    assert not errors, errors[:6]
    return checked


@pytest.fixture(scope="module")
def extracted(pair, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("anima_loras"), {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in cache:
            out = root / f"lora_{len(cache)}.safetensors"
            cache[key] = (lc.run_extract(pair.base_path, pair.variant_path, out, **options), out)
        return cache[key]

    return get


@pytest.mark.parametrize("full_layer", [False, True], ids=["lora", "full-layer"])
def test_default_format_applies_whole_the_comfyui_way(pair, extracted, full_layer):
    result, path = extracted(full_layer=full_layer)
    assert result.architecture == "anima" and result.report.format == "diffusion_model"
    # with --full-layer the 1-D weights ride along as .diff keys, outside the report's layers
    lora = load_file(str(path)) if full_layer else lc.check_report_matches_file(result, path)
    assert all(k.startswith("diffusion_model.") and ".net." not in k for k in lora)
    assert not any(k.endswith(".alpha") for k in lora)
    base, variant = comfy_model(pair.base_path), comfy_model(pair.variant_path)
    patches, unused = load_lora(lora, generic_key_map(base, "", kohya=True))
    assert not unused, f"keys ComfyUI does not load: {sorted(unused)[:5]}"
    result_state = patched(base, add_patches(patches, base, one_per_key=False))
    checked = assert_equals_variant(result_state, base, variant, full_layer)
    assert "diffusion_model.llm_adapter.embed.lora_A.weight" in lora  # the embedding too
    changed = [k for k, v in base.items() if not torch.equal(v, variant[k])]
    assert checked == sum(1 for k in changed if full_layer or base[k].ndim >= 2)
    assert {k for k in changed if base[k].ndim >= 2} == {k for k in base if base[k].ndim >= 2}  # a delta on every matrix


@pytest.mark.parametrize("full_layer", [False, True], ids=["lora", "full-layer"])
def test_default_format_applies_whole_in_every_neo_era(pair, extracted, full_layer):
    result, path = extracted(full_layer=full_layer)
    lora = load_file(str(path))
    unet, text = neo_model(pair.base_path)
    unet_variant, text_variant = neo_model(pair.variant_path)
    new_unet, new_text, unused = neo_apply(lora, unet, text)
    assert not unused, f"keys Neo does not load: {sorted(unused)[:5]}"
    assert assert_equals_variant(new_unet, unet, unet_variant, full_layer) > 0
    assert assert_equals_variant(new_text, text, text_variant, full_layer) > 0
    assert not torch.equal(new_text["qwen3_06b.llm_adapter.embed.weight"], text["qwen3_06b.llm_adapter.embed.weight"])


def test_kohya_names_would_lose_the_adapter_in_neo(pair, extracted):
    """Why the default is not kohya's lora_unet_ form: Neo's rename only knows diffusion_model."""
    _, path = extracted()
    lora = {}
    for key, value in load_file(str(path)).items():
        module, _, suffix = key.removeprefix("diffusion_model.").partition(".lora_")
        lora["lora_unet_" + module.replace(".", "_") + ".lora_" + suffix] = value
    unet, text = neo_model(pair.base_path)
    _, _, unused = neo_apply(lora, unet, text)
    assert unused and all(k.startswith("lora_unet_llm_adapter_") for k in unused)


def anima_pipeline(model: tm.TinyModel):
    from diffusers.modular_pipelines import AnimaModularPipeline

    pipeline = AnimaModularPipeline()
    pipeline.update_components(**model.components)
    return pipeline


def test_diffusers_format_loads_exactly_in_diffusers(pair, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = lc.run_extract(pair.base_path, pair.variant_path, out, format="diffusers")
    lora = lc.check_report_matches_file(result, out)
    assert all(k.startswith(("transformer.", "text_conditioner.")) for k in lora)
    assert not any(".embed." in k for k in lora)
    assert "llm_adapter.embed.weight" in result.report.skipped["not representable in a LoRA"]
    written = lc.written_params(pair.model, result)
    lc.assert_coverage(pair, written, ("embed.weight",))
    model = pair.model.copy_with(pair.base)
    pipeline = anima_pipeline(model)
    messages, injected = lc.diffusers_load(pipeline, out, model.components)
    assert not lc.key_complaints(messages), messages
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
    pipeline.fuse_lora(components=["transformer", "text_conditioner"])
    loaded = {name: lc.clean_state(module) for name, module in model.components.items()}
    assert lc.assert_weights(pair, loaded, written, "diffusers") == len(result.report.layers)


def test_default_format_in_diffusers_loses_only_the_embedding(pair, extracted):
    """diffusers converts the default format, but peft's Embedding ignores lora_A/lora_B:
    the one key it complains about, and the one weight it leaves unchanged."""
    result, path = extracted()
    model = pair.model.copy_with(pair.base)
    pipeline = anima_pipeline(model)
    messages, _ = lc.diffusers_load(pipeline, path, model.components)
    complaints = lc.key_complaints(messages)
    assert complaints and all("embed.lora_" in m for m in complaints), messages
    pipeline.fuse_lora(components=["transformer", "text_conditioner"])
    written = lc.written_params(pair.model, result)
    written["text_conditioner"].discard("embed.weight")
    loaded = {name: lc.clean_state(module) for name, module in model.components.items()}
    lc.assert_weights(pair, loaded, written, "diffusers")


@pytest.mark.parametrize(
    "base_layout, variant_layout, prefix",
    [
        ("original", "original", ""),
        ("original", "original", ALL_IN_ONE),
        ("diffusers", "original", "net."),
        ("diffusers", "diffusers", ""),
    ],
)
def test_every_layout_is_anima_and_gives_the_same_lora(pair, extracted, tmp_path, base_layout, variant_layout, prefix):
    other = make_pair(tmp_path / "other", base_layout, variant_layout, prefix)
    result = lc.run_extract(other.base_path, other.variant_path, tmp_path / "b.safetensors")
    assert result.architecture == "anima"
    described = result.report.description
    assert described.startswith(f"Anima, {base_layout} layout, 2 blocks")
    assert ("skipped" in described) == (prefix == ALL_IN_ONE), described
    assert not result.report.warnings, result.report.warnings
    _, path = extracted()
    a, b = load_file(str(path)), load_file(str(tmp_path / "b.safetensors"))
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cosmos_predict2_variant_is_refused(pair, tmp_path):
    cosmos = make_pair(tmp_path / "cosmos", variant_adapter=False)
    variant = cosmos.variant_path.rename(tmp_path / "cosmos-predict2-2b.safetensors")
    out = tmp_path / "lora.safetensors"
    with pytest.raises(UserError) as error:
        lc.run_extract(pair.base_path, variant, out)
    message = str(error.value)
    assert "anima-base.safetensors is Anima" in message and "cosmos-predict2-2b.safetensors is Cosmos-Predict2" in message
    assert message.count(". ") == 0 and not out.exists()


def test_other_family_variant_is_refused(pair, tmp_path):
    zimage = tm.zimage_model(seed=0)
    variant = tm.save(tm.checkpoint_for(zimage, zimage.states()), tmp_path / "z-image.safetensors")
    out = tmp_path / "lora.safetensors"
    with pytest.raises(UserError) as error:
        lc.run_extract(pair.base_path, variant, out)
    message = str(error.value)
    assert "is Anima" in message and "z-image.safetensors is Z-Image" in message and not out.exists()


@pytest.mark.parametrize("spelling", ["default", "diffusers", "kohya", "neo"])
def test_anima_lora_as_variant_gives_the_same_lora(pair, extracted, tmp_path, spelling):
    """A trainer's Anima LoRA as the variant (diffusion-pipe's diffusion_model.* names, diffusers',
    sd-scripts' lora_unet_*, Neo's renamed adapter keys): every module lands on its weight."""
    result, path = extracted()
    source = path
    if spelling == "diffusers":
        source = tmp_path / "diffusers.safetensors"
        lc.run_extract(pair.base_path, pair.variant_path, source, format="diffusers")
    elif spelling in ("kohya", "neo"):
        renamed = {}
        for key, value in load_file(str(path)).items():
            module, _, suffix = key.removeprefix("diffusion_model.").partition(".lora_")
            if spelling == "kohya":
                name = "lora_unet_" + module.replace(".", "_")
            else:
                name = ("text_encoders.qwen3_06b." if module.startswith("llm_adapter.") else "diffusion_model.") + module
            renamed[f"{name}.lora_{suffix}"] = value
        source = tm.save(renamed, tmp_path / f"{spelling}.safetensors")
    again = lc.run_extract(pair.base_path, source, tmp_path / "again.safetensors")
    a, b = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    expected = set(a) - ({k for k in a if ".embed." in k} if spelling == "diffusers" else set())
    assert set(b) == expected and len(again.report.layers) == len(result.report.layers) - (spelling == "diffusers")
    for module in lc.lora_module_names(b):
        product_a = a[module + ".lora_B.weight"] @ a[module + ".lora_A.weight"]
        product_b = b[module + ".lora_B.weight"] @ b[module + ".lora_A.weight"]
        assert torch.allclose(product_a, product_b, atol=1e-5, rtol=1e-4), module

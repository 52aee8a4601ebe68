"""Flux.2 (Klein 4B, Klein 9B, dev): name maps at full size, real loaders on a tiny real model.

- Full size, on the meta device: diffusers' real ``Flux2Transformer2DModel`` with the configs
  Forge Neo ships (``backend/huggingface/black-forest-labs/FLUX.2-klein-{4B,9B}/transformer/
  config.json``) and diffusers' conversion script gives for dev (``scripts/
  convert_flux2_to_diffusers.py``), in the BFL layout (bare, all-in-one) and the diffusers
  layout: detection names the kind, every >=2-D weight has a LoRA module, and diffusers'
  ``Flux2LoraLoaderMixin.lora_state_dict`` turns each module into modules of the model.
- A tiny real ``Flux2Transformer2DModel`` with a known delta on every weight, saved in BFL
  layout (checked against diffusers' own single-file converter): ``--format diffusers`` loads
  in ``Flux2KleinPipeline`` with every module injected and every weight = variant; the
  default format, applied through ComfyUI's and Forge Neo's key maps emulated from their
  source (one patch per weight in Neo), gives every weight = variant.
- Realistic deltas (bf16, full-rank noise, 1024 wide): the default format's fused
  block-diagonal qkv module, applied as Neo's one patch, is as exact part by part as split
  q/k/v modules, which Neo would cut down to v.
- A trainer's Flux.2 LoRA as the variant (musubi-tuner's kohya names, ai-toolkit's
  ``diffusion_model.<BFL name>.lora_A/B``) rebuilds the delta.
- The detection line names Flux.2 in every layout, with no "generic" warning; pairing two
  kinds (Klein 4B with dev) or Flux.1 with Flux.2 is refused in one sentence.
"""

from __future__ import annotations

import dit_layouts as dl
import loader_checks as lc
import pytest
import realistic
import tiny_models as tm
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file
from test_names import infos_of, lora_entries, meta, module_names

import lib_ckpt2lora
from lib_ckpt2lora import ExtractOptions, architectures
from lib_ckpt2lora.architectures import flux2
from lib_ckpt2lora.architectures.base import FileView
from lib_ckpt2lora.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The real sizes (see the module docstring for the sources).
KLEIN_4B = dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)
KLEIN_9B = dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False)
DEV = dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360, guidance_embeds=True)
FULL = {
    "klein_4b": (KLEIN_4B, "Flux.2 Klein 4B", "flux2_klein_4b", "Flux.2-klein-4b/lora"),
    "klein_9b": (KLEIN_9B, "Flux.2 Klein 9B", "flux2_klein_9b", "Flux.2-klein-9b/lora"),
    "dev": (DEV, "Flux.2 dev", "flux2", "Flux.2-dev/lora"),
}
# What diffusers' kohya Flux.2 converter has no key for (it logs "Unsupported keys" and drops them).
KOHYA_DROPPED_IN_DIFFUSERS = (
    "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
    "norm_out.linear",
    "time_guidance_embed.guidance_embedder.linear_1",
    "time_guidance_embed.guidance_embedder.linear_2",
)
TINY = dict(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=True,
)
ALL_IN_ONE_EXTRAS = {
    "text_encoders.qwen3_4b.transformer.model.embed_tokens.weight": (64, 24),
    "vae.decoder.conv_in.weight": (8, 16, 3, 3),
}


# -- full size ------------------------------------------------------------------------------------


def full_size(kind, layout):
    config = FULL[kind][0]
    model = meta(lambda: Flux2Transformer2DModel(**config))
    state = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
    if layout != "diffusers":
        state = dl.to_bfl(state, "flux2")
    if layout == "all-in-one":
        state = {dl.ALL_IN_ONE + k: v for k, v in state.items()}
        state.update({k: torch.empty(shape, device="meta") for k, shape in ALL_IN_ONE_EXTRAS.items()})
    return model, state


def diffusers_modules(converted: dict) -> set[str]:
    return {k[: -len(".lora_A.weight")].removeprefix("transformer.") for k in converted if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("layout", ["bfl", "diffusers", "all-in-one"])
@pytest.mark.parametrize("kind", list(FULL))
def test_full_size_names_load_in_diffusers(kind, layout, fmt):
    model, state = full_size(kind, layout)
    infos = infos_of(state)
    arch = architectures.detect(infos)
    config, title, version, spec = FULL[kind]
    assert (arch.name, arch.title, arch.base_model_version, arch.modelspec_architecture) == ("flux2", title, version, spec)
    blocks = f"{config['num_layers']} double + {config['num_single_layers']} single blocks"
    described = arch.describe(infos)
    assert described.startswith(f"{title}, {'diffusers' if layout == 'diffusers' else 'BFL'} layout, {blocks}")
    assert ("text_encoders, vae skipped" in described) == (layout == "all-in-one")
    view = FileView.build(type("F", (), {"infos": infos})(), arch)
    modules, missing = lora_entries(arch, fmt, infos)
    assert missing == [] and not any(k.startswith(("text_encoders", "vae")) for k in view.shapes)
    # rank-1 zero factors with each module's real rows (the kohya converter splits fused rows)
    style, lora = arch.formats[fmt], {}
    for module, key in modules.items():
        parts = arch.fusion(key, fmt) or (key,)
        lora[module + style.down] = torch.zeros(1, view.shapes[key][1])
        lora[module + style.up] = torch.zeros(sum(view.shapes[p][0] for p in parts), 1)
        if style.writes_alpha:
            lora[module + ".alpha"] = torch.tensor(1.0)
    expected = {
        "norm_out.linear" if k.startswith("norm_out.linear.") else k.rpartition(".")[0]
        for k, shape in view.shapes.items()
        if len(shape) >= 2
    }
    with lc.loader_messages() as messages:
        converted = Flux2KleinPipeline.lora_state_dict(lora)
    landed = diffusers_modules(converted)
    assert landed <= module_names(model)
    if fmt == "diffusers":
        assert landed == expected and not lc.key_complaints(messages)
    else:
        dropped = {m for m in KOHYA_DROPPED_IN_DIFFUSERS if m in expected}
        assert landed == expected - dropped
        assert any("Unsupported keys" in m for m in messages)
        # ONE module per fused BFL weight: both streams' qkv; linear1 is one weight anyway
        assert sum(m.endswith("_qkv") for m in modules) == 2 * config["num_layers"]
        assert not any("_to_q" in m for m in modules)


def test_full_size_report_levels():
    levels = {}
    for kind in FULL:
        _, state = full_size(kind, "bfl")
        arch = architectures.detect(infos_of(state))
        view = FileView.build(type("F", (), {"infos": infos_of(state)})(), arch)
        levels[kind] = sorted({arch.group(k).level for k in view.shapes if not arch.group(k).auxiliary})
    assert levels["klein_4b"] == [
        "D1 (dbl 0-2)",
        "D2 (dbl 3-4)",
        "S1 (sgl 0-4)",
        "S2 (sgl 5-9)",
        "S3 (sgl 10-14)",
        "S4 (sgl 15-19)",
    ]
    assert levels["klein_9b"][:2] == ["D1 (dbl 0-3)", "D2 (dbl 4-7)"] and levels["klein_9b"][-1] == "S4 (sgl 18-23)"
    assert levels["dev"][-1] == "S4 (sgl 36-47)"
    arch = architectures.detect(infos_of(full_size("dev", "diffusers")[1]))
    assert {arch.group(k).level for k in ("double_stream_modulation_img.linear.weight", "x_embedder.weight")} == {
        "modulation img",
        "x_embedder",
    }
    assert arch.group("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight").type == "Attn"
    assert arch.group("transformer_blocks.0.ff.linear_in.weight").type == "FF"
    assert arch.group("single_stream_modulation.linear.weight").type == "Mod"


# -- a tiny real model ------------------------------------------------------------------------------


def transformer(seed=0, **config):
    return tm.randomize_(Flux2Transformer2DModel(**{**TINY, **config}), seed).eval()


def checkpoint(state, layout, prefix=""):
    tensors = dl.to_bfl(state, "flux2") if layout == "bfl" else dict(state)
    tensors = {prefix + key: value for key, value in tensors.items()}
    if prefix == dl.ALL_IN_ONE:
        tensors.update({k: torch.randn(shape) for k, shape in ALL_IN_ONE_EXTRAS.items()})
    return tensors


def make_pair(folder, base_layout="bfl", variant_layout="bfl", base_prefix="", variant_prefix="", **config):
    model = transformer(seed=0, **config)
    tiny = tm.TinyModel({"transformer": model}, "flux2", dl.canonical_map(model))
    base = tiny.states()
    variant = {"transformer": tm.make_variant(base["transformer"], seed=1)}
    folder.mkdir(parents=True, exist_ok=True)
    base_path = tm.save(checkpoint(base["transformer"], base_layout, base_prefix), folder / "base.safetensors")
    variant_path = tm.save(checkpoint(variant["transformer"], variant_layout, variant_prefix), folder / "variant.safetensors")
    return lc.Pair(tiny, base, variant, base_path, variant_path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_torch_thread):
    return make_pair(tmp_path_factory.mktemp("flux2"))


@pytest.fixture(scope="module")
def extracted(pair, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("flux2_loras"), {}

    def get(fmt):
        if fmt not in cache:
            out = root / f"{fmt}.safetensors"
            cache[fmt] = (lc.run_extract(pair.base_path, pair.variant_path, out, format=fmt), out)
        return cache[fmt]

    return get


def test_bfl_layout_matches_diffusers_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    state = transformer(seed=0).state_dict()
    bfl = dl.to_bfl(state, "flux2")
    assert "double_stream_modulation_img.lin.weight" in bfl and "single_blocks.0.linear1.weight" in bfl
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


def load_into_diffusers(pair, lora_path):
    model = pair.model.copy_with(pair.base).components["transformer"]
    pipeline = Flux2KleinPipeline(None, None, None, None, model)
    messages, injected = lc.diffusers_load(pipeline, lora_path, {"transformer": model})
    return pipeline, model, messages, injected


def test_diffusers_format_loads_exactly_in_diffusers(pair, extracted):
    result, out = extracted("diffusers")
    assert result.architecture == "flux2"
    lora = lc.check_report_matches_file(result, out)
    assert all(k.startswith("transformer.") for k in lora)
    assert any(".attn.to_q." in k for k in lora) and any(".attn.to_qkv_mlp_proj." in k for k in lora)
    written = lc.written_params(pair.model, result)
    lc.assert_coverage(pair, written, ())
    pipeline, model, messages, injected = load_into_diffusers(pair, out)
    complaints = [m for m in lc.key_complaints(messages) if "prefix='text_encoder'" not in m]
    assert not complaints, messages
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
    pipeline.fuse_lora()
    checked = lc.assert_weights(pair, {"transformer": lc.clean_state(model)}, written, "diffusers")
    assert checked == len(result.report.layers)


def test_default_format_in_diffusers_drops_only_the_shared_modulations(pair, extracted):
    """What the format table says of the default in diffusers: converted, every module but the
    shared/final modulations and the guidance embedder applied exactly, those dropped with a warning."""
    result, out = extracted("kohya")
    pipeline, model, messages, injected = load_into_diffusers(pair, out)
    assert any("Unsupported keys" in m for m in messages)
    # every >=2-D weight has a module (fused ones lead by their first part: take the model's names)
    matrices = {p for p, v in pair.base["transformer"].items() if v.ndim >= 2}
    assert {lc.module_of(p) for p in lc.written_params(pair.model, result)["transformer"]} <= {lc.module_of(p) for p in matrices}
    kept = {"transformer": {p for p in matrices if not p.startswith(KOHYA_DROPPED_IN_DIFFUSERS)}}
    assert len(kept["transformer"]) < len(matrices)
    want = {lc.module_of(p) for p in kept["transformer"]}
    assert injected["transformer"] == want, (sorted(injected["transformer"] - want), sorted(want - injected["transformer"]))
    pipeline.fuse_lora()
    lc.assert_weights(pair, {"transformer": lc.clean_state(model)}, kept, "diffusers (kohya)")


# ComfyUI's and Forge Neo's LoRA application, from their source: ``model_lora_keys_unet``
# (yzkee/ComfyUI comfy/lora.py; nolanlane/sd-webui-forge-classic @6e1e0d5
# modules_forge/packages/comfy/lora.py) maps ``lora_unet_<key with _>`` and ``<key>`` onto every
# ``diffusion_model.<key>`` weight, and, for Flux-family models (ComfyUI: model_base.Flux2 is a
# Flux; Neo: "flux" in the Klein repo names), the diffusers names of ``flux_to_diffusers``
# (comfy/utils.py) under ``transformer.``, ``lycoris_``, ``lora_transformer_`` or bare, q/k/v
# onto row slices of qkv. ``add_patches`` (Neo backend/patcher/base.py) keeps one patch per
# weight key; ComfyUI keeps all. Only the flux_to_diffusers entries a Flux.2 model has are built.
PREFIX = "diffusion_model."


def flux_to_diffusers(hidden: int, doubles: int, singles: int) -> dict[str, object]:
    """diffusers name -> BFL key, or (key, (dim, start, length)) for a row slice."""
    out: dict[str, object] = {}
    for i in range(doubles):
        source, target = f"transformer_blocks.{i}", f"{PREFIX}double_blocks.{i}"
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for j, name in enumerate(names):
                out[f"{source}.attn.{name}.weight"] = (f"{target}.{stream}_attn.qkv.weight", (0, j * hidden, hidden))
        for name, bfl in (
            ("attn.to_out.0", "img_attn.proj"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.linear_in", "img_mlp.0"),
            ("ff.linear_out", "img_mlp.2"),
            ("ff_context.linear_in", "txt_mlp.0"),
            ("ff_context.linear_out", "txt_mlp.2"),
        ):
            out[f"{source}.{name}.weight"] = f"{target}.{bfl}.weight"
    for i in range(singles):
        source, target = f"single_transformer_blocks.{i}", f"{PREFIX}single_blocks.{i}"
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{source}.attn.{name}.weight"] = (f"{target}.linear1.weight", (0, j * hidden, hidden))
        out[f"{source}.proj_out.weight"] = f"{target}.linear2.weight"
        out[f"{source}.attn.to_qkv_mlp_proj.weight"] = f"{target}.linear1.weight"
        out[f"{source}.attn.to_out.weight"] = f"{target}.linear2.weight"
    for bfl, name in (
        ("final_layer.linear", "proj_out"),
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ):
        out[f"{name}.weight"] = f"{PREFIX}{bfl}.weight"
    out["norm_out.linear.weight"] = (f"{PREFIX}final_layer.adaLN_modulation.1.weight", None, "swap_scale_shift")
    return out


def lora_key_map(model_state: dict[str, torch.Tensor], hidden: int, doubles: int, singles: int) -> dict[str, object]:
    key_map: dict[str, object] = {}
    for key in model_state:
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[len(PREFIX) : -len(".weight")].replace(".", "_")] = key
            key_map[key[: -len(".weight")]] = key
        else:
            key_map[key] = key
    for name, target in flux_to_diffusers(hidden, doubles, singles).items():
        module = name[: -len(".weight")]
        for spelling in (
            "transformer." + module,
            "lycoris_" + module.replace(".", "_"),
            "lora_transformer_" + module.replace(".", "_"),
            module,
        ):
            key_map[spelling] = target
    return key_map


def load_lora(lora, key_map):
    """(patches as (target, up, down, scale) in key-map order, LoRA keys nothing consumed)."""
    patches, consumed = [], set()
    for name, target in key_map.items():
        for up_name, down_name in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
            up, down = f"{name}.{up_name}", f"{name}.{down_name}"
            if up in lora and down in lora:
                alpha = f"{name}.alpha"
                scale = float(lora[alpha]) / lora[down].shape[0] if alpha in lora else 1.0
                consumed |= {up, down} | ({alpha} if alpha in lora else set())
                patches.append((target, lora[up], lora[down], scale))
                break
    return patches, set(lora) - consumed


def apply_patches(model_state, patches, one_per_key: bool):
    kept: dict[str, list] = {}
    for target, up, down, scale in patches:
        key, offset, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        if key in model_state:
            entry = (offset, function, up, down, scale)
            kept[key] = [entry] if one_per_key else kept.get(key, []) + [entry]
    out = {key: value.clone().double() for key, value in model_state.items()}
    for key, entries in kept.items():
        for offset, function, up, down, scale in entries:
            change = scale * (up.double() @ down.double())
            if function == "swap_scale_shift":  # diffusers' scale|shift -> the model's shift|scale
                change = torch.cat(change.chunk(2)[::-1])
            weight = out[key] if offset is None else out[key].narrow(offset[0], offset[1], offset[2])
            weight += change.reshape(weight.shape)
    return out


def webui_state(states) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in dl.to_bfl(states["transformer"], "flux2").items()}


def apply_as(pair, lora_path, one_per_key):
    base = webui_state(pair.base)
    patches, unused = load_lora(load_file(str(lora_path)), lora_key_map(base, 32, TINY["num_layers"], TINY["num_single_layers"]))
    return base, apply_patches(base, patches, one_per_key), unused


def delta_errors(pair, base, patched) -> dict[str, float]:
    variant = webui_state(pair.variant)
    out = {}
    for key, value in patched.items():
        delta = (variant[key].double() - base[key].double()).norm()
        if base[key].ndim >= 2 and delta > 0:
            out[key] = float((value - variant[key].double()).norm() / delta)
        elif not torch.equal(value, base[key].double()):
            out[key] = float("inf")  # a weight the LoRA has no module for must stay the base's
    return out


@pytest.mark.parametrize("webui", ["forge_neo", "comfyui"])
def test_default_format_applies_exactly_in_comfyui_and_neo(pair, extracted, webui):
    result, out = extracted("kohya")
    assert result.architecture == "flux2" and result.report.format == "kohya"
    lora = lc.check_report_matches_file(result, out)
    modules = lc.lora_module_names(lora)
    assert all(m.startswith("lora_unet_") for m in modules)
    assert {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_double_stream_modulation_img_lin",
    } <= modules
    with safe_open(str(out), "pt") as handle:
        header = handle.metadata()
    assert (header["ss_base_model_version"], header["modelspec.architecture"]) == ("flux2", "Flux.2/lora")  # unknown width
    base, patched, unused = apply_as(pair, out, one_per_key=webui == "forge_neo")
    assert not unused, sorted(unused)[:5]
    errors = delta_errors(pair, base, patched)
    assert len(errors) == sum(v.ndim >= 2 for v in base.values())
    bad = {k: e for k, e in errors.items() if not e < lc.DELTA_TOLERANCE}
    assert not bad, sorted(bad.items())[:6]


def test_diffusers_format_is_not_for_neo(pair, extracted):
    """Why Neo gets the default: the split q/k/v modules of --format diffusers land on row
    slices of one qkv weight, and Neo's one patch per weight keeps only v; its key map has no
    name for the shared modulations or the time embedder at all."""
    _, out = extracted("diffusers")
    base, patched, unused = apply_as(pair, out, one_per_key=True)
    assert {k.split(".lora_")[0] for k in unused} == {
        "transformer.double_stream_modulation_img.linear",
        "transformer.double_stream_modulation_txt.linear",
        "transformer.single_stream_modulation.linear",
        "transformer.time_guidance_embed.timestep_embedder.linear_1",
        "transformer.time_guidance_embed.timestep_embedder.linear_2",
        "transformer.time_guidance_embed.guidance_embedder.linear_1",
        "transformer.time_guidance_embed.guidance_embedder.linear_2",
    }
    variant, key = webui_state(pair.variant), PREFIX + "double_blocks.0.img_attn.qkv.weight"
    rows = {"q": slice(0, 32), "k": slice(32, 64), "v": slice(64, 96)}
    error = {
        part: float(
            (patched[key][r] - variant[key][r].double()).norm() / (variant[key][r].double() - base[key][r].double()).norm()
        )
        for part, r in rows.items()
    }
    assert error["v"] < lc.DELTA_TOLERANCE and error["q"] > 0.99 and error["k"] > 0.99


def test_trainers_loras_read_back_as_variants(pair, extracted, tmp_path):
    """A Flux.2 LoRA as the variant: our kohya file (musubi-tuner's names) and the same modules
    in ai-toolkit's spelling (``diffusion_model.<BFL name>.lora_A/B``, no alpha) rebuild the
    delta, and extracting it again gives the same modules."""
    result, out = extracted("kohya")
    kohya = load_file(str(out))
    names = {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_"): k[: -len(".weight")]
        for k in dl.to_bfl(pair.base["transformer"], "flux2")
    }
    ai_toolkit = {}
    for key, value in kohya.items():
        module, _, suffix = key.partition(".")
        assert float(kohya[module + ".alpha"]) == kohya[module + ".lora_down.weight"].shape[0]  # scale 1
        spelled = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix)
        if spelled:
            ai_toolkit[f"diffusion_model.{names[module]}.{spelled}"] = value
    lora_paths = {"kohya": out, "ai-toolkit": tm.save(ai_toolkit, tmp_path / "ai_toolkit.safetensors")}
    for name, path in lora_paths.items():
        again = lc.run_extract(pair.base_path, path, tmp_path / f"{name}_again.safetensors")
        rebuilt = load_file(str(tmp_path / f"{name}_again.safetensors"))
        assert set(rebuilt) == set(kohya), name
        assert len(again.report.layers) == len(result.report.layers)
        for key in kohya:
            if key.endswith(".lora_up.weight"):
                module = key[: -len(".lora_up.weight")]
                want = kohya[key].double() @ kohya[module + ".lora_down.weight"].double()
                got = rebuilt[key].double() @ rebuilt[module + ".lora_down.weight"].double()
                assert float((got - want).norm() / want.norm()) < 1e-4, (name, module)


# -- detection in every layout, refusals --------------------------------------------------------------


LAYOUTS = {
    "bfl": ("bfl", ""),
    "bfl all-in-one": ("bfl", dl.ALL_IN_ONE),
    "bfl diffusion_model.": ("bfl", "diffusion_model."),
    "diffusers": ("diffusers", ""),
    "diffusers transformer.": ("diffusers", "transformer."),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_is_detected_as_flux2(name, tmp_path):
    layout, prefix = LAYOUTS[name]
    state = transformer(seed=0).state_dict()
    infos = infos_of(checkpoint(state, layout, prefix))
    arch = architectures.detect(infos, strict=True)
    described = arch.describe(infos)
    assert arch.name == "flux2" and described.startswith(f"Flux.2 (32 wide), {'BFL' if layout == 'bfl' else 'diffusers'} layout")
    assert ("text_encoders, vae skipped" in described) == (prefix == dl.ALL_IN_ONE)
    view = FileView.build(type("F", (), {"infos": infos})(), arch)
    assert set(view.shapes) == set(state) - {"norm_out.linear.weight"} | {
        "norm_out.linear.scale.weight",
        "norm_out.linear.shift.weight",
    }


def test_layouts_give_the_same_lora_with_no_generic_warning(pair, extracted, tmp_path):
    mixed = make_pair(tmp_path / "mixed", base_layout="diffusers", base_prefix="transformer.", variant_prefix=dl.ALL_IN_ONE)
    lines = []
    second = lib_ckpt2lora.extract(
        ExtractOptions(
            base=mixed.base_path,
            variant=mixed.variant_path,
            out=tmp_path / "b.safetensors",
            min_dim=1,
            save_dtype="fp32",
            rank_thresh=0.9999,
        ),
        log=lines.append,
    )
    first, out = extracted("kohya")
    assert not second.warnings and not first.warnings
    assert any(
        line.startswith("Base: base.safetensors: Flux.2 (32 wide), diffusers layout, 2 double + 2 single blocks")
        for line in lines
    )
    assert any("Flux.2 (32 wide), BFL layout" in line and "text_encoders, vae skipped" in line for line in lines)
    a, b = load_file(str(out)), load_file(str(tmp_path / "b.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert len(first.report.layers) == len(second.report.layers)


def test_klein_4b_against_dev_is_refused(tmp_path, monkeypatch):
    """Two kinds are told apart by width (the full-size test checks the real widths' names);
    here two tiny widths stand for Klein 4B and dev."""
    monkeypatch.setitem(flux2.KINDS, 32, ("Klein 4B", "flux2_klein_4b", "Flux.2-klein-4b"))
    monkeypatch.setitem(flux2.KINDS, 48, ("dev", "flux2", "Flux.2-dev"))
    klein = transformer(seed=0, guidance_embeds=False).state_dict()
    dev = transformer(seed=0, num_attention_heads=3).state_dict()
    base = tm.save(checkpoint(klein, "bfl"), tmp_path / "flux-2-klein-base-4b.safetensors")
    variant = tm.save(checkpoint(dev, "bfl"), tmp_path / "flux2-dev-finetune.safetensors")
    out = tmp_path / "lora.safetensors"
    with pytest.raises(UserError) as error:
        lc.run_extract(base, variant, out)
    message = str(error.value)
    assert "flux-2-klein-base-4b.safetensors is Flux.2 Klein 4B" in message
    assert "flux2-dev-finetune.safetensors is Flux.2 dev" in message
    assert message.count(". ") == 0 and not out.exists()


def test_flux1_against_flux2_is_refused(tmp_path):
    flux1 = tm.save(dl.checkpoint(dl.flux_transformer(seed=0).state_dict(), "bfl"), tmp_path / "flux1-dev.safetensors")
    klein = tm.save(checkpoint(transformer(seed=0).state_dict(), "bfl"), tmp_path / "flux-2-klein-4b.safetensors")
    out = tmp_path / "lora.safetensors"
    with pytest.raises(UserError) as error:
        lc.run_extract(flux1, klein, out)
    message = str(error.value)
    assert "flux1-dev.safetensors is Flux.1 but the variant flux-2-klein-4b.safetensors is Flux.2" in message
    assert message.count(". ") == 0 and not out.exists()


# -- realistic deltas: the fused module loses nothing against split q/k/v -------------------------------


def test_fused_qkv_is_as_exact_as_split_modules_with_realistic_deltas(tmp_path):
    """A 1024-wide Flux.2 double block's qkv weights (bf16, base N(0, 0.02)), q, k and v changed
    independently by fine-tune-like deltas (decaying spectrum, 30% dense noise, norms 1 : 0.4 :
    1.6), rounded through bf16. The default format's one block-diagonal module, applied as
    Neo's single patch, gives each part the same error as the split modules of --format
    diffusers applied exactly (and that Neo would cut down to v)."""
    width = 1024
    shapes = {
        "img_in.weight": (width, 128),
        "double_stream_modulation_img.lin.weight": (6 * width, width),
        "double_blocks.0.img_attn.qkv.weight": (3 * width, width),
    }
    base = realistic.base_weights(shapes, seed=0)
    deltas = {}
    for i, key in enumerate(("double_blocks.0.img_attn.qkv.weight",)):
        parts = [
            realistic.noisy_delta(width, width, seed=10 * i + j, norm=scale * realistic.default_norm(width, width))
            for j, scale in enumerate((1.0, 0.4, 1.6))
        ]
        deltas[key] = torch.cat(parts)
    variant = realistic.apply_delta(base, deltas)
    real = realistic.realized(base, variant)
    base_path = realistic.save(base, tmp_path / "base.safetensors")
    variant_path = realistic.save(variant, tmp_path / "variant.safetensors")
    errors = {}
    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        options = ExtractOptions(
            base=base_path, variant=variant_path, out=out, format=fmt, include="attn.qkv,to_q,to_k,to_v", save_dtype="fp32"
        )
        result = lib_ckpt2lora.extract(options, log=lambda line: None)
        assert result.architecture == "flux2"
        lora = load_file(str(out))
        state = {PREFIX + k: v.float() for k, v in base.items()}
        patches, unused = load_lora(lora, lora_key_map(state, width, 1, 0))
        assert not unused
        # the fused module as Neo's one patch; the split modules each applied (ComfyUI, diffusers)
        patched = apply_patches(state, patches, one_per_key=fmt == "kohya")
        for key in deltas:
            for j, part in enumerate("qkv"):
                rows = slice(j * width, (j + 1) * width)
                change = patched[PREFIX + key][rows] - state[PREFIX + key][rows].double()
                errors[(fmt, key, part)] = float((change - real[key][rows].double()).norm() / real[key][rows].norm())
        if fmt == "diffusers":
            neo = apply_patches(state, patches, one_per_key=True)
            key = "double_blocks.0.img_attn.qkv.weight"
            lost = (neo[PREFIX + key][:width] - state[PREFIX + key][:width].double()).norm()
            assert float(lost) == 0  # q (and k) of the split format never reach Neo
    for (fmt, key, part), error in errors.items():
        if fmt == "kohya":
            assert 0.05 < error < 0.6, (key, part, error)  # what the rank rule keeps of a noisy delta
            assert error == pytest.approx(errors[("diffusers", key, part)], rel=1e-3, abs=1e-4), (key, part)

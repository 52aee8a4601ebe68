"""Flux.1 and Chroma name maps against the FULL-SIZE models (meta device, real configs).

Every >=2-D weight of the real ``FluxTransformer2DModel`` (dev: guidance_embeds) and
``ChromaTransformer2DModel``, in the BFL layout (bare and all-in-one) and the diffusers
layout, must map to a LoRA module; diffusers' own LoRA conversion must turn each module
of the file into modules of the full-size model, consuming every key. The kohya
converter hard-codes the full-size model (19/38 blocks, linear1 split 3072 x 3 + 12288),
which is why this runs at full size: factors here are rank 1 with the real row counts.
"""

import pytest
import torch
from diffusers import ChromaTransformer2DModel, FluxPipeline, FluxTransformer2DModel
from dit_layouts import ALL_IN_ONE, to_bfl
from test_names import converted_modules, infos_of, lora_entries, meta, module_names

from lib_ckpt2lora import architectures

FLUX_DEV = dict(
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
)
FAMILIES = {
    "flux": (lambda: FluxTransformer2DModel(**FLUX_DEV), "flux"),
    "chroma": (lambda: ChromaTransformer2DModel(), "chroma"),
}


def full_size(family, layout):
    factory, name = FAMILIES[family]
    model = meta(factory)
    state = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
    if layout != "diffusers":
        state = to_bfl(state, family)
    if layout == "all-in-one":
        state = {ALL_IN_ONE + k: v for k, v in state.items()}
        state["text_encoders.t5xxl.transformer.shared.weight"] = torch.empty(32128, 4096, device="meta")
        state["text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight"] = torch.empty(
            49408, 768, device="meta"
        )
    return model, state


def sized_lora(arch, fmt, modules, view_shapes):
    """Rank-1 zero factors with each module's real row/column counts (kohya's converter
    checks the fused modules' row sums), alpha = 1 (= rank) where the format writes one."""
    style = arch.formats[fmt]
    state = {}
    for module, (rows, cols) in modules.items():
        state[module + style.down] = torch.zeros(1, cols)
        state[module + style.up] = torch.zeros(rows, 1)
        if style.writes_alpha:
            state[module + ".alpha"] = torch.tensor(1.0)
    return state


def module_shapes(arch, fmt, infos):
    from lib_ckpt2lora.architectures.base import FileView

    view = FileView.build(type("F", (), {"infos": infos})(), arch)
    modules, missing = lora_entries(arch, fmt, infos)
    shapes = {}
    for module, key in modules.items():
        parts = arch.fusion(key, fmt) or (key,)
        shapes[module] = (sum(view.shapes[p][0] for p in parts), view.shapes[key][1])
    return shapes, missing, view


def expected_modules(view):
    """The diffusers modules every 2-D canonical weight belongs to (the final modulation's
    two halves are one module, norm_out.linear)."""
    out = set()
    for key, shape in view.shapes.items():
        if len(shape) >= 2:
            module = key.rpartition(".")[0]
            out.add("norm_out.linear" if module.startswith("norm_out.linear.") else module)
    return out


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("layout", ["bfl", "diffusers", "all-in-one"])
@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_full_size_names_load_in_diffusers(family, layout, fmt):
    model, state = full_size(family, layout)
    infos = infos_of(state)
    arch = architectures.detect(infos)
    assert arch.name == family
    if layout == "all-in-one":
        assert "text_encoders skipped" in arch.describe(infos)
    shapes, missing, view = module_shapes(arch, fmt, infos)
    assert missing == []
    assert not any(key.startswith("text_encoders") for key in view.shapes)
    lora = sized_lora(arch, fmt, shapes, view.shapes)
    if family == "chroma" and fmt == "kohya":
        # diffusers' Flux kohya converter (ChromaPipeline uses it) knows no approximator keys
        with pytest.raises(ValueError, match="Incompatible keys"):
            FluxPipeline.lora_state_dict(lora)
        lora = {k: v for k, v in lora.items() if "distilled_guidance_layer" not in k}
        expected = {m for m in expected_modules(view) if not m.startswith("distilled_guidance_layer")}
    else:
        expected = expected_modules(view)
    converted = FluxPipeline.lora_state_dict(lora)
    landed = {name.removeprefix("transformer.") for name in converted_modules(converted)}
    assert landed == expected
    assert landed <= module_names(model)
    if fmt == "kohya":
        # ONE module per fused BFL weight: qkv of both streams and every single block's linear1
        n_double, n_single = model.config.num_layers, model.config.num_single_layers
        assert sum(m.endswith("_qkv") for m in shapes) == 2 * n_double
        assert sum(m.endswith("_linear1") for m in shapes) == n_single
        assert shapes["lora_unet_single_blocks_0_linear1"] == (3 * 3072 + 12288, 3072)


def test_fill_and_depth_variants_are_named_and_refused_against_plain_flux():
    for channels, name, title in ((384, "flux_fill", "Flux.1 Fill"), (128, "flux_depth", "Flux.1 Depth/Canny")):
        config = {**FLUX_DEV, "in_channels": channels, "out_channels": 64}
        model = meta(lambda: FluxTransformer2DModel(**config))  # noqa: B023 (called at once)
        infos = infos_of(to_bfl({k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}))
        arch = architectures.detect(infos)
        assert (arch.name, arch.title) == (name, title)
        assert arch.describe(infos).startswith(title + ", BFL layout, 19 double + 38 single blocks")

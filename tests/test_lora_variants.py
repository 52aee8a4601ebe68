"""LoRA files as the variant: every kind rebuilt as a dense delta, extracted again, and the
extracted LoRA loaded back by diffusers must reproduce the variant LoRA's own delta.

The variant LoRAs come from the real tools on tiny real models: LyCORIS (LoCon with alpha,
Tucker ``lora_mid``, LoHa with and without Tucker, LoKr full and decomposed, full
``.diff``/``.diff_b``) and peft through diffusers' ``add_adapter``; the other spellings
are those files renamed. Ground truth is the tool's own application of its LoRA (see
``_feature_models``); the extracted LoRA is loaded by diffusers' ``load_lora_weights`` +
``fuse_lora`` and every weight's delta compared (relative error < 1e-3). The SD1.5/SDXL
module spellings (ldm/sgm vs diffusers paths, every prefix) are in test_lora_spellings.py.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import tiny_models as tm
import torch
from _feature_models import (
    assert_reproduces,
    fused_sd,
    fused_zimage,
    lycoris_forward_truth,
    lycoris_merged,
    lycoris_network,
    peft_adapter,
    renamed,
    run_extract,
    save_lora,
    torch_threads,
)

from lib_ckpt2lora.errors import UserError

ZIMAGE_PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    """Tiny Z-Image: the diffusers model, its state, and the base as an original-layout
    (fused qkv) file and a diffusers-layout file."""
    folder = tmp_path_factory.mktemp("zimage_lora")
    model = tm.zimage_transformer(0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = tm.save(tm.zimage_checkpoint(state), folder / "base_original.safetensors")
    split = tm.save(tm.zimage_checkpoint(state, layout="diffusers"), folder / "base_diffusers.safetensors")
    return dict(model=model, state=state, original=original, split=split, folder=folder)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15_lora")
    model = tm.sd15_model(0)
    states = model.states()
    base = tm.save(tm.sd15_checkpoint(model, states), folder / "base.safetensors")
    return dict(model=model, states=states, base=base, folder=folder)


def _weights(state):
    return [k for k, v in state.items() if v.dim() >= 2]


# -- Z-Image: LyCORIS kinds, q/k/v LoRAs onto the fused qkv of the original layout ---------------


@pytest.mark.parametrize("prefix", ["lycoris_", "lora_unet_"])
def test_zimage_lora_with_alpha_onto_fused_qkv_base(zimage, prefix):
    lora, truth = lycoris_merged(zimage["model"], "lora", dim=4, alpha=2.0, seed=11)
    lora = renamed(lora, "lycoris_", prefix)
    assert any("_attention_to_q.lora_down" in k for k in lora) and any(k.endswith(".alpha") for k in lora)
    path = save_lora(lora, zimage["folder"] / f"lora_{prefix}.safetensors")
    result, out = run_extract(zimage["folder"], zimage["original"], path, f"out_lora_{prefix}", rank=8)
    assert result.architecture == "zimage"
    got = fused_zimage(zimage["state"], out)
    assert_reproduces(got, truth, zimage["state"], keys=_weights(truth))


LOHA_LOKR_CASES = {
    "loha alpha=dim": ("loha", 2, 2.0, {}),
    "loha alpha!=dim": ("loha", 2, 0.5, {}),
    "lokr full factors": ("lokr", 4, 4.0, {"factor": 4, "full_matrix": True}),
    "lokr w2 decomposed": ("lokr", 2, 1.0, {"factor": 8}),
    "lokr both decomposed": ("lokr", 2, 1.0, {"factor": 8, "decompose_both": True}),
}


@pytest.mark.parametrize("case", list(LOHA_LOKR_CASES))
def test_zimage_loha_and_lokr(zimage, case):
    algo, dim, alpha, extra = LOHA_LOKR_CASES[case]
    lora, truth = lycoris_forward_truth(zimage["model"], algo, dim, alpha, seed=12, scale=0.3, **extra)
    roles = {key.split(".", 1)[1] for key in lora}
    if case == "lokr full factors":
        assert {"lokr_w1", "lokr_w2"} <= roles and "lokr_w2_a" not in roles
    if case == "lokr both decomposed":
        assert {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"} <= roles
    path = save_lora(lora, zimage["folder"] / f"{algo}_{dim}_{alpha}.safetensors")
    _, out = run_extract(zimage["folder"], zimage["original"], path, f"out_{algo}_{len(extra)}_{alpha}", rank=1024)
    got = fused_zimage(zimage["state"], out)
    assert_reproduces(got, truth, zimage["state"], keys=_weights(truth))


def test_zimage_full_diff_and_diff_b(zimage):
    lora, truth = lycoris_merged(zimage["model"], "full", dim=4, alpha=4.0, seed=13, scale=0.01)
    assert any(k.endswith(".diff") for k in lora) and any(k.endswith(".diff_b") for k in lora)
    path = save_lora(lora, zimage["folder"] / "full.safetensors")
    _, out = run_extract(zimage["folder"], zimage["original"], path, "out_full", rank=1024)
    got = fused_zimage(zimage["state"], out)
    assert_reproduces(got, truth, zimage["state"], keys=_weights(truth))
    # --full-layer: the biases come out as .diff_b, equal to LyCORIS's bias deltas.
    _, out = run_extract(zimage["folder"], zimage["original"], path, "out_full_layer", rank=1024, full_layer=True)
    biases = [k for k in truth if k.endswith(".bias") and not torch.equal(truth[k], zimage["state"][k])]
    assert biases
    for key in biases:
        written = out["diffusion_model." + key[: -len(".bias")] + ".diff_b"]
        expected = truth[key] - zimage["state"][key]
        assert torch.allclose(written, expected, rtol=1e-4, atol=1e-7), key


# -- peft / diffusers LoRAs, and the other spellings --------------------------------------------


@pytest.mark.parametrize("lora_alpha", [4, 8])
def test_zimage_peft_lora_saved_by_diffusers(zimage, lora_alpha):
    """A LoRA as diffusers saves it (``transformer.<name>.lora_A/B``, rank and alpha in the
    ``lora_adapter_metadata`` header). Truth: peft's own fuse, which diffusers' loading of
    the same file reproduces."""
    from diffusers import ZImagePipeline

    adapted, state, config = peft_adapter(zimage["model"], ZIMAGE_PEFT_TARGETS, rank=4, alpha=lora_alpha, seed=14)
    folder = zimage["folder"]
    name = f"peft_{lora_alpha}.safetensors"
    ZImagePipeline.save_lora_weights(
        folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict(), weight_name=name
    )
    adapted.fuse_lora()
    adapted.unload_lora()
    truth = {k: v.detach().clone() for k, v in adapted.state_dict().items()}
    # diffusers itself agrees with peft on what this file means
    assert_reproduces(fused_zimage(zimage["state"], folder / name), truth, zimage["state"], keys=_weights(truth))
    _, out = run_extract(folder, zimage["original"], folder / name, f"out_peft_{lora_alpha}", rank=8)
    got = fused_zimage(zimage["state"], out)
    assert_reproduces(got, truth, zimage["state"], keys=_weights(truth))


SPELLINGS = {
    "peft keys, no prefix": ("", ".lora_A.weight", ".lora_B.weight"),
    "_lora.up/down": ("transformer.", "_lora.down.weight", "_lora.up.weight"),
    ".lora.up/down": ("diffusion_model.", ".lora.down.weight", ".lora.up.weight"),
    ".lora_linear_layer.up/down": ("transformer.", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_zimage_other_lora_spellings(zimage, spelling):
    prefix, down, up = SPELLINGS[spelling]
    adapted, state, _ = peft_adapter(zimage["model"], ZIMAGE_PEFT_TARGETS, rank=4, alpha=4, seed=15)
    adapted.fuse_lora()
    adapted.unload_lora()
    truth = {k: v.detach().clone() for k, v in adapted.state_dict().items()}
    lora = {}
    for key, value in state.items():
        module, _, role = key.rpartition(".lora_")
        lora[prefix + module + (down if role.startswith("A") else up)] = value
    path = save_lora(lora, zimage["folder"] / f"spelling_{zlib.crc32(spelling.encode())}.safetensors")
    _, out = run_extract(zimage["folder"], zimage["original"], path, f"out_spelling_{zlib.crc32(spelling.encode())}", rank=8)
    got = fused_zimage(zimage["state"], out)
    assert_reproduces(got, truth, zimage["state"], keys=_weights(truth))


def test_fused_qkv_kohya_lora_onto_diffusers_layout_base(zimage):
    """ComfyUI's extractor style (``diffusion_model.layers.N.attention.qkv`` + the original
    ``attention.out`` name, lora_down/up + alpha) onto a base with split to_q/to_k/to_v."""
    state = zimage["state"]
    generator = torch.Generator().manual_seed(16)
    blocks = sorted({k.rsplit(".attention.", 1)[0] for k in state if ".attention.to_q.weight" in k})
    lora, truth = {}, {k: v.clone() for k, v in state.items()}
    rank, alpha = 4, 2.0
    for block in blocks:
        dim = state[f"{block}.attention.to_q.weight"].shape[1]
        for original, parts in (("qkv", ("to_q", "to_k", "to_v")), ("out", ("to_out.0",))):
            down = 0.1 * torch.randn(rank, dim, generator=generator)
            up = 0.1 * torch.randn(dim * len(parts), rank, generator=generator)
            name = f"diffusion_model.{block}.attention.{original}"
            lora.update({name + ".lora_down.weight": down, name + ".lora_up.weight": up, name + ".alpha": torch.tensor(alpha)})
            for part, rows in zip(parts, (up * (alpha / rank) @ down).chunk(len(parts))):
                truth[f"{block}.attention.{part}.weight"] += rows
    path = save_lora(lora, zimage["folder"] / "comfy_qkv.safetensors")
    _, out = run_extract(zimage["folder"], zimage["split"], path, "out_comfy_qkv", rank=8)
    assert not any(".qkv." in k for k in out)
    got = fused_zimage(state, out)
    assert_reproduces(got, truth, state, keys=_weights(truth))


# -- SDXL: te2 attention LoRA onto OpenCLIP's fused in_proj --------------------------------------


def test_sdxl_te2_attention_lora_onto_openclip_in_proj(tmp_path):
    model = tm.sdxl_model(0)
    states = model.states()
    base = tm.save(tm.sdxl_checkpoint(model, states), tmp_path / "sdxl_base.safetensors")
    te2 = model.components["text_encoder_2"]
    lora, truth = lycoris_merged(te2, "lora", dim=4, alpha=2.0, seed=17, target_module=("CLIPAttention", "CLIPSdpaAttention"))
    lora = renamed(lora, "lycoris_", "lora_te2_")
    assert {k.split("_self_attn_")[1].split(".")[0] for k in lora} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    path = save_lora(lora, tmp_path / "te2.safetensors")
    _, out = run_extract(tmp_path, base, path, "out_te2", rank=4)
    layers = {k.split(".")[0] for k in out}
    for layer in range(te2.config.num_hidden_layers):
        for part in ("q", "k", "v", "out"):
            assert f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{part}_proj" in layers
    got = fused_sd(model, out)["text_encoder_2"]
    attention = [k for k in _weights(truth) if ".self_attn." in k]
    assert_reproduces(got, truth, states["text_encoder_2"], keys=attention)


# -- SD1.5: convolutions, Tucker factors --------------------------------------------------------

CONV_CASES = {
    "locon tucker (lora_mid)": ("lora", 2, 1.0, {"use_tucker": True}),
    "loha tucker": ("loha", 2, 2.0, {"use_tucker": True}),
    "loha": ("loha", 2, 2.0, {}),
    "lokr tucker, both decomposed": ("lokr", 2, 2.0, {"factor": 8, "decompose_both": True, "use_tucker": True}),
    "lokr conv, w2 decomposed": ("lokr", 2, 2.0, {"factor": 8}),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_sd15_unet_conv_kinds(sd15, case):
    """LyCORIS on every Linear/Conv2d of the UNet (3x3 convs included). The extraction's
    fixed rank 32 covers every delta (their ranks are at most 8), so every module gets the
    same rank; modules of different ranks are the next test's subject."""
    algo, dim, alpha, extra = CONV_CASES[case]
    unet = sd15["model"].components["unet"]
    lora, truth = lycoris_merged(unet, algo, dim, alpha, seed=18, scale=0.3, exclude_name=("conv_out",), **extra)
    roles = {key.split(".", 1)[1] for key in lora}
    if "tucker" in case:
        assert roles & {"lora_mid.weight", "hada_t1", "lokr_t2"}, roles
    lora = renamed(lora, "lycoris_", "lora_unet_")
    path = save_lora(lora, sd15["folder"] / f"unet_{zlib.crc32(case.encode())}.safetensors")
    _, out = run_extract(sd15["folder"], sd15["base"], path, f"out_unet_{zlib.crc32(case.encode())}", rank=32)
    assert any(v.dim() == 4 and v.shape[-1] == 3 for v in out.values()), "no 3x3 LoCon written"
    got = fused_sd(sd15["model"], out)["unet"]
    assert_reproduces(got, truth, sd15["states"]["unet"], keys=_weights(truth))


def test_sd15_auto_rank_lora_loads_exactly_in_diffusers(sd15, tmp_path):
    """Auto rank gives every module its own rank. The kohya file carries one alpha (the
    rank cap) on every module, with each module's rank/alpha folded into its factors,
    because diffusers takes one alpha for a file's modules: with alpha = own rank it would
    scale each module by (that common alpha / own rank)."""
    model, states = sd15["model"], sd15["states"]
    generator = torch.Generator().manual_seed(19)
    variant = copy.deepcopy(states)
    for key, weight in variant["unet"].items():
        if weight.dim() < 2 or weight.shape[0] < 8:
            continue
        rank = 1 + zlib.crc32(key.encode()) % 6
        rows, cols = weight.shape[0], weight[0].numel()
        delta = (torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)).reshape(
            weight.shape
        )
        variant["unet"][key] = weight + delta * (0.05 * weight.norm() / delta.norm())
    path = tm.save(tm.sd15_checkpoint(model, variant), tmp_path / "ranks_variant.safetensors")
    _, out = run_extract(tmp_path, sd15["base"], path, "out_ranks", rank_thresh=0.999999)
    ranks = {int(v.shape[0]) for k, v in out.items() if k.endswith(".lora_down.weight")}
    assert len(ranks) > 3, ranks
    got = fused_sd(model, out)["unet"]
    assert_reproduces(got, variant["unet"], states["unet"], keys=_weights(variant["unet"]))


# -- refusals, and a LoRA variant beside a checkpoint variant2 -----------------------------------


def test_lora_for_another_architecture_is_refused(zimage, sd15):
    unet = sd15["model"].components["unet"]
    _, lora = lycoris_network(copy.deepcopy(unet), "lora", 2, 2.0, seed=20, target_module=("Transformer2DModel",))
    path = save_lora(renamed(lora, "lycoris_", "lora_unet_"), zimage["folder"] / "sd15_lora.safetensors")
    with pytest.raises(UserError) as error:
        run_extract(zimage["folder"], zimage["original"], path, "out_wrong_arch", rank=4)
    message = str(error.value)
    assert "lora_unet_down_blocks_" in message and "sd15_lora.safetensors" in message


def test_lora_modules_matching_nothing_are_named(zimage):
    _, state, _ = peft_adapter(zimage["model"], ["to_q"], rank=2, alpha=2, seed=21)
    lora = {"diffusion_model." + k: v for k, v in state.items()}
    lora["diffusion_model.layers.7.attention.to_q.lora_A.weight"] = torch.zeros(2, 96)
    lora["diffusion_model.layers.7.attention.to_q.lora_B.weight"] = torch.zeros(96, 2)
    path = save_lora(lora, zimage["folder"] / "stray.safetensors")
    with pytest.raises(UserError) as error:
        run_extract(zimage["folder"], zimage["original"], path, "out_stray", rank=4)
    assert "layers.7.attention.to_q" in str(error.value)


def test_dora_is_refused_by_name(zimage):
    _, lora = lycoris_network(copy.deepcopy(zimage["model"]), "lora", 2, 2.0, seed=22, weight_decompose=True)
    assert any(k.endswith(".dora_scale") for k in lora)
    path = save_lora(lora, zimage["folder"] / "dora.safetensors")
    with pytest.raises(UserError) as error:
        run_extract(zimage["folder"], zimage["original"], path, "out_dora", rank=4)
    assert "DoRA" in str(error.value)
    assert not (zimage["folder"] / "out_dora.safetensors").exists()


def test_lora_variant_with_checkpoint_variant2(zimage):
    """variant = a LoRA, variant2 = the checkpoint it merges into: their common part is the
    LoRA's delta itself."""
    lora, truth = lycoris_merged(zimage["model"], "lora", dim=4, alpha=4.0, seed=23)
    folder = zimage["folder"]
    lora_path = save_lora(lora, folder / "mixed_lora.safetensors")
    merged = tm.save(tm.zimage_checkpoint(truth), folder / "mixed_checkpoint.safetensors")
    _, out = run_extract(folder, zimage["original"], lora_path, "out_mixed", variant2=merged, rank=8, rank_thresh=0.9999999)
    got = fused_zimage(zimage["state"], out)
    assert_reproduces(got, truth, zimage["state"], keys=_weights(truth))

"""SDXL LoRAs from the engine, loaded by diffusers (LyCORIS: test_lycoris.py).

A tiny SDXL-shaped UNet (real ``UNet2DConditionModel``: no attention in the first level,
two transformer blocks per attention, linear proj_in/out, ``text_time`` added
conditioning), CLIP-L and OpenCLIP-G text encoders, in the single-file layout (sgm UNet
names, OpenCLIP's fused ``in_proj``); a variant with a known rank-1..4 delta on every
weight. The engine's kohya LoRA (sgm UNet names, te1/te2) must load into weights equal
to the variant's, with every module in the file injected and no loader complaint.
"""

from __future__ import annotations

import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2-D weights no LoRA module can address: CLIP embeddings, OpenCLIP's raw text_projection.
NOT_LORA = ("embeddings.", "text_projection")


@pytest.fixture(scope="module")
def pair(sdxl_case):
    return sdxl_case.pair


@pytest.fixture(scope="module")
def extracted(sdxl_case):
    return sdxl_case.result, sdxl_case.lora_path


def pipeline_for(model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=model.components["text_encoder"],
        text_encoder_2=model.components["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=None,
        unet=model.components["unet"],
        scheduler=None,
    )


# -- the test model's layout ----------------------------------------------------------------------


def test_checkpoint_layout_matches_diffusers_converters(pair):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )

    checkpoint = tm.checkpoint_for(pair.model, pair.base)
    assert any(k.endswith(".attn.in_proj_weight") for k in checkpoint)
    assert tm.SD_UNET + "label_emb.0.0.weight" in checkpoint
    unet = convert_ldm_unet_checkpoint(dict(checkpoint), dict(pair.model.components["unet"].config))
    assert set(unet) == set(pair.base["unet"])
    assert all(torch.equal(unet[k], v) for k, v in pair.base["unet"].items())
    te1 = convert_ldm_clip_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(tm.SDXL_TE1)})
    te1.pop("text_model.embeddings.position_ids")
    expected = {tm.clip_checkpoint_name(k): v for k, v in pair.base["text_encoder"].items()}
    assert set(te1) == set(expected)
    assert all(torch.equal(te1[k], v) for k, v in expected.items())
    te2 = convert_open_clip_checkpoint(pair.model.components["text_encoder_2"], checkpoint, prefix=tm.SDXL_TE2)
    expected = {tm.clip_checkpoint_name(k): v for k, v in pair.base["text_encoder_2"].items()}
    assert set(te2) == set(expected)
    assert all(torch.equal(te2[k], v) for k, v in expected.items())


def test_unet_loads_with_from_single_file(pair, tmp_path):
    from diffusers import UNet2DConditionModel

    pair.model.components["unet"].save_config(tmp_path / "unet")
    with lc.loader_messages():
        unet = UNet2DConditionModel.from_single_file(
            str(pair.base_path), config=str(tmp_path), subfolder="unet", local_files_only=True
        )
    state = unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pair.base["unet"].items())


# -- the engine's LoRA --------------------------------------------------------------------------


def test_lora_names_and_metadata(pair, extracted):
    result, path = extracted
    assert result.architecture == "sdxl"
    lora = lc.check_report_matches_file(result, path)
    modules = lc.lora_module_names(lora)
    assert all(m.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for m in modules)
    # sgm UNet names (not diffusers paths), the added-conditioning MLP and 3x3 convs included
    assert not any(part in m for m in modules for part in ("down_blocks", "mid_block", "up_blocks"))
    for name in ("lora_unet_input_blocks_0_0", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
                 "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv", "lora_unet_label_emb_0_0",
                 "lora_unet_time_embed_2", "lora_unet_out_2", "lora_unet_middle_block_1_proj_out",
                 "lora_te1_text_model_encoder_layers_1_mlp_fc2", "lora_te2_text_model_encoder_layers_0_mlp_fc1"):
        assert name in modules, name
    # A1111 applies a te2 attention LoRA only when q, k, v and out all exist for the layer.
    for layer in range(2):
        for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{part}" in modules
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_diffusers_loads_exactly(pair, extracted):
    result, path = extracted
    lora = lc.check_report_matches_file(result, path)
    written = lc.written_params(pair.model, result)
    lc.assert_coverage(pair, written, NOT_LORA)
    model = pair.model.copy_with(pair.base)
    pipeline = pipeline_for(model)
    messages, injected = lc.diffusers_load(pipeline, path, model.components)
    assert not lc.key_complaints(messages), messages
    lc.assert_injected(injected, written, len(lc.lora_module_names(lora)), "diffusers")
    pipeline.fuse_lora()
    loaded = {name: lc.clean_state(module) for name, module in model.components.items()}
    assert lc.assert_weights(pair, loaded, written, "diffusers") == len(result.report.layers)


def test_forward_pass_with_lora_matches_variant(pair, extracted):
    """UNet and both text encoders with the LoRA applied at run time (peft, unfused) give
    the variant's outputs."""
    result, path = extracted
    target = pair.model.copy_with(lc.lora_reachable_states(pair, lc.written_params(pair.model, result)))
    base = pair.model.copy_with(pair.base)
    model = pair.model.copy_with(pair.base)
    messages, _ = lc.diffusers_load(pipeline_for(model), path, model.components)
    assert not lc.key_complaints(messages), messages
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    tokens = torch.randint(3, 1000, (1, 9), generator=generator)
    context = torch.randn(1, 9, tm.SDXL_TE1_HIDDEN + tm.SDXL_TE2_HIDDEN, generator=generator)
    added = {
        "text_embeds": torch.randn(1, tm.SDXL_TE2_PROJECTION, generator=generator),
        "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]),
    }

    def outputs(m):
        with torch.no_grad():
            te1 = m.components["text_encoder"](tokens).last_hidden_state
            te2 = m.components["text_encoder_2"](tokens).text_embeds
            unet = m.components["unet"](sample, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added)
        return te1, te2, unet.sample

    for lora_out, variant_out, base_out in zip(outputs(model), outputs(target), outputs(base)):
        assert lc.relative_output_error(lora_out, variant_out, base_out) < 1e-3

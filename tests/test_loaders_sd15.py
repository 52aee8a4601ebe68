"""SD1.5 LoRAs from the engine, loaded by diffusers (LyCORIS: test_lycoris.py).

A tiny SD1.5-shaped UNet (real ``UNet2DConditionModel``, SD1.5's block layout) and CLIP
text encoder in the single-file layout, a variant with a known rank-1..4 delta on every
weight (3x3 and 1x1 convs, attention, text encoder); the engine's kohya LoRA (every
layer, enough rank, fp32) must load into weights equal to the variant's, with every
module in the file injected and no loader complaint.
"""

from __future__ import annotations

import loader_checks as lc
import pytest
import tiny_models as tm
import torch
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2-D weights no LoRA module can address: CLIP's token and position embeddings.
NOT_LORA = ("embeddings.",)


@pytest.fixture(scope="module")
def pair(sd15_case):
    return sd15_case.pair


@pytest.fixture(scope="module")
def extracted(sd15_case):
    return sd15_case.result, sd15_case.lora_path


def pipeline_for(model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=None,
        text_encoder=model.components["text_encoder"],
        tokenizer=None,
        unet=model.components["unet"],
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# -- the test model's layout ----------------------------------------------------------------------


def test_checkpoint_layout_matches_diffusers_converters(pair):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    checkpoint = tm.checkpoint_for(pair.model, pair.base)
    unet = convert_ldm_unet_checkpoint(dict(checkpoint), dict(pair.model.components["unet"].config))
    assert set(unet) == set(pair.base["unet"])
    assert all(torch.equal(unet[k], v) for k, v in pair.base["unet"].items())
    text = convert_ldm_clip_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(tm.SD15_TE)})
    text.pop("text_model.embeddings.position_ids")
    expected = {tm.clip_checkpoint_name(k): v for k, v in pair.base["text_encoder"].items()}
    assert set(text) == set(expected)
    assert all(torch.equal(text[k], v) for k, v in expected.items())


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
    assert result.architecture == "sd15"
    lora = lc.check_report_matches_file(result, path)
    modules = lc.lora_module_names(lora)
    assert all(m.startswith(("lora_unet_", "lora_te_")) for m in modules)
    # diffusers-path UNet names only (ldm names do not load in diffusers), 3x3 convs included
    assert not any(part in m for m in modules for part in ("input_blocks", "middle_block", "output_blocks"))
    for name in ("lora_unet_conv_in", "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv",
                 "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_mid_block_attentions_0_proj_in",
                 "lora_unet_time_embedding_linear_1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        assert name in modules, name
    assert all(m + ".alpha" in lora for m in modules)
    assert len({lora[m + ".lora_down.weight"].shape[0] for m in modules}) > 1, "the variant should give varied ranks"
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sd_v1"


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
    """UNet and text encoder with the LoRA applied at run time (peft, unfused) give the
    variant's outputs."""
    result, path = extracted
    target = pair.model.copy_with(lc.lora_reachable_states(pair, lc.written_params(pair.model, result)))
    base = pair.model.copy_with(pair.base)
    model = pair.model.copy_with(pair.base)
    messages, _ = lc.diffusers_load(pipeline_for(model), path, model.components)
    assert not lc.key_complaints(messages), messages
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    tokens = torch.randint(3, 1000, (1, 9), generator=generator)

    def outputs(m):
        with torch.no_grad():
            hidden = m.components["text_encoder"](tokens).last_hidden_state
            fixed = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(4))
            unet = m.components["unet"](sample, torch.tensor([500]), encoder_hidden_states=fixed).sample
        return hidden, unet

    for lora_out, variant_out, base_out in zip(outputs(model), outputs(target), outputs(base)):
        assert lc.relative_output_error(lora_out, variant_out, base_out) < 1e-3

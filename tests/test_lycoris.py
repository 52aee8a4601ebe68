"""The engine's kohya LoRAs (SD1.5, SDXL) merged by LyCORIS (lycoris-lora), as kohya's
sd-scripts and the LyCORIS WebUI paths load them.

LyCORIS matches ``<prefix>_<module path with _>`` against ``named_modules()`` and skips
keys that match nothing without a word, so each test counts the modules it matched
against the modules in the file, then checks every merged weight: the variant's where
the LoRA has a module, the base's elsewhere. SD1.5's kohya UNet names are diffusers
paths (the diffusers UNet itself is the target); SDXL's are sgm paths, matched against
an sgm-named module tree, the layout sd-scripts and A1111 hold the SDXL UNet in. Text
encoders are Hugging Face CLIP models under transformers 4's ``text_model.`` level.
"""

from __future__ import annotations

import loader_checks as lc
import pytest
import tiny_models as tm
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def state_of(module):
    return {k: v.detach() for k, v in module.state_dict().items()}


def check_matched(lora, matched, messages):
    modules = lc.lora_module_names(lora)
    assert matched == modules, f"LyCORIS matched no module for {len(modules - matched)}: {sorted(modules - matched)[:6]}"
    assert not lc.key_complaints(messages), messages


def test_sd15_lora_merges_exactly(sd15_case):
    pair, result = sd15_case.pair, sd15_case.result
    lora = load_file(str(sd15_case.lora_path))
    model = pair.model.copy_with(pair.base)
    targets = {"lora_unet": model.components["unet"], "lora_te": lc.TextModelWrapper(model.components["text_encoder"])}
    matched, messages = lc.lycoris_merge(lora, targets)
    check_matched(lora, matched, messages)
    loaded = {name: state_of(module) for name, module in model.components.items()}
    written = lc.written_params(pair.model, result)
    assert lc.assert_weights(pair, loaded, written, "LyCORIS") == len(result.report.layers)


def test_sdxl_lora_merges_exactly(sdxl_case):
    pair, result = sdxl_case.pair, sdxl_case.result
    lora = load_file(str(sdxl_case.lora_path))
    model = pair.model.copy_with(pair.base)
    checkpoint = tm.checkpoint_for(pair.model, pair.base)
    unet_tree = tm.ldm_module_tree({k[len(tm.SD_UNET) :]: v for k, v in checkpoint.items() if k.startswith(tm.SD_UNET)})
    targets = {
        "lora_unet": unet_tree,
        "lora_te1": lc.TextModelWrapper(model.components["text_encoder"]),
        "lora_te2": model.components["text_encoder_2"],
    }
    matched, messages = lc.lycoris_merge(lora, targets)
    check_matched(lora, matched, messages)
    names = tm.unet_to_ldm(pair.base["unet"], pair.model.components["unet"].config)
    tree = state_of(unet_tree)
    loaded = {
        # the sgm tree holds only LoRA-able layers (weights >= 2-D and their biases)
        "unet": {name: tree[ldm] for name, ldm in names.items() if ldm in tree},
        "text_encoder": state_of(model.components["text_encoder"]),
        "text_encoder_2": state_of(model.components["text_encoder_2"]),
    }
    written = lc.written_params(pair.model, result)
    assert lc.assert_weights(pair, loaded, written, "LyCORIS", complete=False) == len(result.report.layers)


def test_sgm_module_tree_has_the_checkpoint_names(sdxl_case):
    """The SDXL target tree: one Linear/Conv2d per >=2-D UNet weight, at its sgm path."""
    checkpoint = tm.checkpoint_for(sdxl_case.pair.model, sdxl_case.pair.base)
    ldm = {k[len(tm.SD_UNET) :]: v for k, v in checkpoint.items() if k.startswith(tm.SD_UNET)}
    tree = state_of(tm.ldm_module_tree(ldm))
    wanted = {k for k, v in ldm.items() if v.ndim >= 2}
    assert wanted <= set(tree)
    assert all((tree[k] == ldm[k]).all() for k in wanted)

"""LoRA files as the variant, in every module spelling that A1111, Forge, ComfyUI or
diffusers load for SD1.5 and SDXL.

Each file is WRITTEN in one naming from a known delta: a rank-2 up/down pair on every
Linear and Conv2d of the tiny real UNet and text encoders (``tests/tiny_models.py``).
Two checks per spelling:

- the variant reader (``LoraSource``) lands every module on exactly the base weights it
  was written for, each with exactly its delta: nothing dropped, nothing extra;
- ``extract()`` with the file as variant writes a LoRA that diffusers loads back onto
  the same model with every weight's delta reproduced.

Where each spelling comes from: kohya sd-scripts (SD1.5 UNet by diffusers path, SDXL UNet
by sgm path, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``); A1111's fallback of
``lora_unet_`` onto its ldm module names and ComfyUI's ``model_lora_keys_unet`` (ldm/sgm
names for both models, with ``lora_unet_`` or ``diffusion_model.``; diffusers names with
``unet.`` or no prefix; diffusers' old ``attn1.processor.to_q`` names); ComfyUI's
``model_lora_keys_clip`` (``lora_te_`` and ``lora_te1_`` both on CLIP-L, ``text_encoder.``,
``text_encoder_2.``); diffusers/peft (``unet.`` / ``text_encoder.`` + ``lora_A/B``).
"""

from __future__ import annotations

import zlib
from contextlib import ExitStack

import pytest
import tiny_models as tm
import torch
from _feature_models import assert_reproduces, fused_sd, run_extract, save_lora, torch_threads

from lib_ckpt2lora.architectures import FileView, detect
from lib_ckpt2lora.lora_input import LoraSource, alias_index, normalise
from lib_ckpt2lora.reading import TensorFile

RANK = 2
ALPHA = 1.0  # scale alpha / rank = 0.5: a loader that ignores alpha gets it wrong
STYLES = {
    # style -> (down suffix, up suffix, writes alpha)
    "kohya": (".lora_down.weight", ".lora_up.weight", True),
    "peft": (".lora_A.weight", ".lora_B.weight", False),
    "attn procs": ("_lora.down.weight", "_lora.up.weight", False),
    "lora_linear_layer": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", False),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _ldm_module(mapping: dict[str, str], path: str) -> str:
    """A diffusers UNet module path under its ldm/sgm name (longest mapped prefix)."""
    for prefix in sorted(mapping, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + "."):
            return mapping[prefix] + path[len(prefix) :]
    raise KeyError(path)


def _processor(path: str) -> str:
    """diffusers' pre-peft attention-processor module name."""
    for attn in (".attn1.", ".attn2."):
        head, found, tail = path.partition(attn)
        if found and tail in ("to_q", "to_k", "to_v", "to_out.0"):
            return f"{head}{attn}processor.{tail.removesuffix('.0')}"
    return path


def _unet_name(spelling: str, path: str, mapping: dict[str, str]) -> str:
    ldm = _ldm_module(mapping, path)
    return {
        "lora_unet_ + diffusers": "lora_unet_" + path.replace(".", "_"),
        "lora_unet_ + ldm": "lora_unet_" + ldm.replace(".", "_"),
        "diffusion_model. + ldm": "diffusion_model." + ldm,
        "unet. + diffusers": "unet." + path,
        "diffusers, no prefix": path,
        "unet. + attn processor": "unet." + _processor(path),
    }[spelling]


def _text_name(prefix: str, path: str) -> str:
    path = path if path.startswith("text_model.") else "text_model." + path  # transformers 5 drops it
    return prefix + (path.replace(".", "_") if prefix.endswith("_") else path)


def _lora_modules(model: tm.TinyModel):
    """(component, module path) of every Linear / Conv2d a LoRA can address."""
    for component, module in model.components.items():
        for path, layer in module.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if component != "unet" and (".embeddings." in path or path.startswith("text_projection")):
                continue
            yield component, path, layer


def write_lora(model: tm.TinyModel, case: dict, seed: int):
    """A LoRA file's tensors in one spelling, and the delta it means for each
    (component, parameter name)."""
    generator = torch.Generator().manual_seed(seed)
    mapping = tm.unet_module_map(model.components["unet"].config)
    tensors, truth = {}, {}
    for component, path, layer in _lora_modules(model):
        if component == "unet":
            name = _unet_name(case["unet"], path, mapping)
        else:
            prefix = case.get(component)
            if prefix is None:
                continue
            name = _text_name(prefix, path)
        style = case["style"]
        if style == "attn procs" and component != "unet":
            style = "lora_linear_layer"
        down_suffix, up_suffix, with_alpha = STYLES[style]
        weight = layer.weight
        fan_in = weight[0].numel()
        down = 0.2 * torch.randn(RANK, fan_in, generator=generator)
        up = 0.2 * torch.randn(weight.shape[0], RANK, generator=generator)
        scale = ALPHA / RANK if with_alpha else 1.0
        truth[(component, path + ".weight")] = (scale * up @ down).reshape(weight.shape)
        if weight.dim() == 4:
            down, up = down.reshape(RANK, *weight.shape[1:]), up[..., None, None]
        tensors[name + down_suffix] = down
        tensors[name + up_suffix] = up
        if with_alpha:
            tensors[name + ".alpha"] = torch.tensor(ALPHA)
    return tensors, truth


CASES = {
    # SD1.5
    "sd15 kohya, UNet by ldm names": dict(model="sd15", unet="lora_unet_ + ldm", text_encoder="lora_te_", style="kohya"),
    "sd15 kohya, diffusers names, lora_te1_": dict(
        model="sd15", unet="lora_unet_ + diffusers", text_encoder="lora_te1_", style="kohya"
    ),
    "sd15 ComfyUI diffusion_model. + ldm": dict(
        model="sd15", unet="diffusion_model. + ldm", text_encoder="text_encoder.", style="kohya"
    ),
    "sd15 peft": dict(model="sd15", unet="unet. + diffusers", text_encoder="text_encoder.", style="peft"),
    "sd15 peft, no prefix": dict(model="sd15", unet="diffusers, no prefix", style="peft"),
    "sd15 diffusers attn processors": dict(
        model="sd15", unet="unet. + attn processor", text_encoder="text_encoder.", style="attn procs"
    ),
    # SDXL
    "sdxl kohya, UNet by sgm names": dict(
        model="sdxl", unet="lora_unet_ + ldm", text_encoder="lora_te1_", text_encoder_2="lora_te2_", style="kohya"
    ),
    "sdxl kohya, UNet by diffusers names": dict(
        model="sdxl", unet="lora_unet_ + diffusers", text_encoder="lora_te1_", text_encoder_2="lora_te2_", style="kohya"
    ),
    "sdxl ComfyUI diffusion_model. + sgm, lora_te_": dict(
        model="sdxl", unet="diffusion_model. + ldm", text_encoder="lora_te_", text_encoder_2="lora_te2_", style="kohya"
    ),
    "sdxl peft": dict(
        model="sdxl", unet="unet. + diffusers", text_encoder="text_encoder.", text_encoder_2="text_encoder_2.", style="peft"
    ),
    "sdxl diffusers attn processors": dict(
        model="sdxl",
        unet="unet. + attn processor",
        text_encoder="text_encoder.",
        text_encoder_2="text_encoder_2.",
        style="attn procs",
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spellings")
    built = {}
    for name, make, checkpoint in (("sd15", tm.sd15_model, tm.sd15_checkpoint), ("sdxl", tm.sdxl_model, tm.sdxl_checkpoint)):
        model = make(0)
        states = model.states()
        base = tm.save(checkpoint(model, states), folder / f"{name}_base.safetensors")
        built[name] = dict(model=model, states=states, base=base, folder=folder)
    return built


def _case_file(models, case_name):
    case = CASES[case_name]
    entry = models[case["model"]]
    tag = zlib.crc32(case_name.encode())
    tensors, truth = write_lora(entry["model"], case, seed=tag % 1000)
    path = save_lora(tensors, entry["folder"] / f"lora_{tag}.safetensors")
    return entry, path, tensors, truth, tag


@pytest.mark.parametrize("case_name", list(CASES))
def test_every_module_lands_on_its_weight_with_its_delta(models, case_name):
    entry, path, tensors, truth, _ = _case_file(models, case_name)
    model = entry["model"]
    canonical_of = {where: key for key, where in model.canonical.items()}
    with ExitStack() as stack:
        base_file = stack.enter_context(TensorFile(entry["base"], "base"))
        arch = detect(base_file.infos)
        base = FileView.build(base_file, arch)
        source = LoraSource(stack.enter_context(TensorFile(path, "variant")), arch, base)
        expected = {}
        for where, delta in truth.items():
            key = canonical_of[where]
            if key in base.shapes:
                expected[key] = delta
            else:  # SDXL te2 q/k/v: one HF weight is a row third of OpenCLIP's in_proj
                expected.update({k: delta for k, w in model.canonical.items() if w == where})
        dropped, extra = sorted(set(expected) - set(source.targets)), sorted(set(source.targets) - set(expected))
        assert not dropped and not extra, f"dropped: {dropped[:4]}, extra: {extra[:4]}"
        for key, delta in expected.items():
            got = source.delta(source.load(key), base.read(key).float())
            assert torch.allclose(got, delta.reshape(got.shape), rtol=1e-5, atol=1e-7), key


@pytest.mark.parametrize("case_name", list(CASES))
def test_extracted_lora_reproduces_the_spelled_lora(models, case_name):
    entry, path, _, truth, tag = _case_file(models, case_name)
    model, states = entry["model"], entry["states"]
    _, out = run_extract(entry["folder"], entry["base"], path, f"out_{tag}", rank=2 * RANK)
    got = fused_sd(model, out)
    for component in model.components:
        keys = [param for (part, param) in truth if part == component]
        if not keys:
            continue
        variant = {k: v + truth[(component, k)] if (component, k) in truth else v for k, v in states[component].items()}
        assert_reproduces(got[component], variant, states[component], keys=keys)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_no_two_weights_share_a_lora_name(models, name):
    """An alias that two weights shared would send one LoRA module to the wrong weight."""
    entry = models[name]
    with TensorFile(entry["base"], "base") as base_file:
        arch = detect(base_file.infos)
        base = FileView.build(base_file, arch)
        owners: dict[str, set[str]] = {}
        for key in base.shapes:
            module, _, param = key.rpartition(".")
            if param != "weight":
                continue
            for alias in arch.lora_aliases(key):
                owners.setdefault(normalise(alias), set()).add(key)
        shared = {alias: keys for alias, keys in owners.items() if len(keys) > 1}
        assert not shared, list(shared.items())[:3]
        assert len(alias_index(arch, base)) >= len(owners)

"""Helpers for the feature tests: variant LoRAs made by real tools (LyCORIS, peft) on the
tiny real models of ``tiny_models``, the ground truth those tools define, and an
extracted LoRA loaded back by diffusers.

Ground truth is what the tool itself does with its LoRA: LyCORIS merged into a copy of
the model (``merge_to``), or for LoHa/LoKr with alpha != dim the weight LyCORIS's own
forward pass applies (LyCORIS 4.1.3's ``merge_to`` multiplies LoHa/LoKr by alpha/dim
twice, while its forward pass, A1111 and ComfyUI apply it once).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

import tiny_models as tm
import torch


@contextlib.contextmanager
def torch_threads(count: int = 1):
    """Tiny matrices on a shared 2-core machine: one intra-op thread is far faster
    (OpenMP spinning across busy cores slowed a 96x256 SVD 70-fold)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_libraries():
    """LyCORIS / diffusers / transformers / peft loggers at ERROR inside, restored after
    (other tests may watch these libraries' warnings)."""
    loggers = [logging.getLogger(name) for name in ("LyCORIS", "lycoris", "diffusers", "transformers", "peft")]
    with contextlib.suppress(ImportError):
        from lycoris.logging import logger

        loggers.append(logger)
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def silent_log(message: str) -> None:
    """``extract(log=...)``: keep the test output clean."""


# -- LyCORIS --------------------------------------------------------------------------------


def lycoris_network(
    module: torch.nn.Module,
    algo: str,
    dim: int,
    alpha: float,
    seed: int,
    scale: float = 0.1,
    target_module=("Linear", "Conv2d"),
    target_name=(),
    exclude_name=(),
    **kwargs,
):
    """A LyCORIS network of ``algo`` applied to ``module`` (in place), every parameter
    re-drawn from a seeded generator; returns (network, its state dict)."""
    from lycoris.wrapper import LycorisNetwork

    # The preset lives in class attributes: set every one for this network, and put
    # them back after, so no test leaks its preset into another (create_lycoris's own
    # presets do not reset them all).
    preset = {
        "ENABLE_CONV": True,
        "TARGET_REPLACE_MODULE": list(target_module),
        "TARGET_REPLACE_NAME": list(target_name),
        "MODULE_ALGO_MAP": {},
        "NAME_ALGO_MAP": {},
        "LORA_PREFIX": "lycoris",
        "USE_FNMATCH": False,
        "TARGET_EXCLUDE_NAME": list(exclude_name),
    }
    saved = {name: getattr(LycorisNetwork, name) for name in preset}
    try:
        for name, value in preset.items():
            setattr(LycorisNetwork, name, value)
        with quiet_libraries():
            network = LycorisNetwork(
                module,
                multiplier=1.0,
                lora_dim=dim,
                conv_lora_dim=dim,
                alpha=alpha,
                conv_alpha=alpha,
                network_module=algo,
                warn_on_unmatched=False,
                **kwargs,
            )
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)
    network.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(network.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    state = {key: value.detach().clone().contiguous() for key, value in network.state_dict().items()}
    assert state, "LyCORIS matched no module"
    return network, state


def lycoris_merged(model: torch.nn.Module, algo: str, dim: int, alpha: float, seed: int, **kwargs):
    """(LoRA state dict, state dict of ``model`` with LyCORIS's merge of it)."""
    merged = copy.deepcopy(model)
    network, state = lycoris_network(merged, algo, dim, alpha, seed, **kwargs)
    network.restore()
    network.merge_to(1.0)
    return state, {key: value.detach().clone() for key, value in merged.state_dict().items()}


def lycoris_forward_truth(model: torch.nn.Module, algo: str, dim: int, alpha: float, seed: int, **kwargs):
    """(LoRA state dict, ``model``'s weights as LyCORIS's forward pass applies them).

    Linear layers only: each adapted layer is fed the identity, so its output minus the
    base layer's output is the transposed weight delta LyCORIS uses at inference.
    """
    adapted = copy.deepcopy(model)
    network, state = lycoris_network(adapted, algo, dim, alpha, seed, **kwargs)
    truth = {key: value.detach().clone() for key, value in model.state_dict().items()}
    names = {id(module): name for name, module in adapted.named_modules()}
    with torch.no_grad():
        for lora in network.loras:
            layer = lora.org_module[0]
            assert isinstance(layer, torch.nn.Linear), "forward truth is for Linear layers"
            probe = torch.eye(layer.in_features)
            delta = (layer(probe) - torch.nn.functional.linear(probe, layer.weight, layer.bias)).T
            truth[names[id(layer)] + ".weight"] += delta
    network.restore()
    return state, truth


# -- peft ------------------------------------------------------------------------------------


def peft_adapter(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int, scale: float = 0.1):
    """A peft LoRA on a copy of ``model`` (diffusers ``add_adapter``), weights re-drawn;
    returns (the copy with the adapter, its peft state dict, the LoraConfig)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = copy.deepcopy(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    adapted.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(adapted.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    state = {key: value.detach().clone().contiguous() for key, value in get_peft_model_state_dict(adapted).items()}
    return adapted, state, config


# -- loading an extracted LoRA back ----------------------------------------------------------


def fused_zimage(base_state: dict[str, torch.Tensor], lora, **load_kwargs) -> dict[str, torch.Tensor]:
    """A Z-Image transformer with ``lora`` (a state dict or a file path) loaded and fused by
    diffusers' ZImagePipeline; returns its state dict."""
    from diffusers import ZImagePipeline

    transformer = tm.zimage_transformer(0, state_dict=base_state)
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    with quiet_libraries():
        if isinstance(lora, Path):
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, **load_kwargs)
        else:
            pipe.load_lora_weights(dict(lora), **load_kwargs)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return {key: value.detach().clone() for key, value in transformer.state_dict().items()}


def fused_sd(model: tm.TinyModel, lora: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """SD1.5 / SDXL components (diffusers layout) with a kohya LoRA loaded and fused by
    diffusers' StableDiffusion(XL)Pipeline; returns each component's state dict."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    components = {name: copy.deepcopy(module) for name, module in model.components.items()}
    with warnings.catch_warnings(), quiet_libraries():
        warnings.simplefilter("ignore")
        scheduler = DDIMScheduler(steps_offset=1)
        if model.layout_name == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=None,
                text_encoder=components["text_encoder"],
                text_encoder_2=components["text_encoder_2"],
                tokenizer=None,
                tokenizer_2=None,
                unet=components["unet"],
                scheduler=scheduler,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=None,
                text_encoder=components["text_encoder"],
                tokenizer=None,
                unet=components["unet"],
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.load_lora_weights(dict(lora))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name, module in components.items()}


# -- comparing ---------------------------------------------------------------------------------


def delta_errors(got, truth, base, keys=None) -> dict[str, float]:
    """Per weight: ||(got - base) - (truth - base)|| / ||truth - base|| (absolute norm of
    the loaded delta where the truth has none)."""
    errors = {}
    for key in keys if keys is not None else truth:
        expected = truth[key].float() - base[key].float()
        error = float(torch.linalg.vector_norm(got[key].float() - truth[key].float()))
        norm = float(torch.linalg.vector_norm(expected))
        errors[key] = error / norm if norm > 0 else error
    return errors


def assert_reproduces(got, truth, base, tolerance: float = 1e-3, keys=None) -> None:
    """Every weight's delta reproduced within ``tolerance``, and some delta at all."""
    keys = list(keys if keys is not None else truth)
    changed = [k for k in keys if not torch.equal(truth[k], base[k])]
    assert changed, "the ground truth changes nothing"
    errors = delta_errors(got, truth, base, keys)
    bad = {k: round(v, 6) for k, v in errors.items() if v > tolerance}
    assert not bad, f"{len(bad)} of {len(keys)} weights off by more than {tolerance}: {dict(list(bad.items())[:6])}"


# -- running the engine ------------------------------------------------------------------------


def run_extract(folder: Path, base: Path, variant: Path, name: str, **options):
    """extract() into ``folder/name.safetensors`` with exact-comparison defaults (every
    layer, fp32 factors); returns (result, the output's tensors)."""
    from safetensors.torch import load_file

    from lib_ckpt2lora.extract import extract
    from lib_ckpt2lora.options import ExtractOptions

    settings = dict(min_dim=1, save_dtype="fp32", overwrite=True)
    settings.update(options)
    out = folder / f"{name}.safetensors"
    result = extract(ExtractOptions(base=base, variant=variant, out=out, **settings), log=silent_log)
    return result, load_file(str(out))


def save_lora(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def renamed(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Keys with the prefix ``old`` replaced by ``new``."""
    return {(new + key[len(old) :] if key.startswith(old) else key): value for key, value in state.items()}

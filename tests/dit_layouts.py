"""Tiny real Flux.1 / Chroma / Flux.2 transformers and their BFL (original, ComfyUI) checkpoint layout.

``to_bfl`` writes a diffusers state dict under BFL names with q|k|v (and single blocks'
q|k|v|mlp) fused and the final modulation's halves swapped. It uses the architecture
module's own name table, so tests/test_loaders_dit.py checks its output against
diffusers' single-file converters (BFL -> diffusers), which were written independently:
a wrong table entry fails there.
"""

from __future__ import annotations

import tiny_models as tm
import torch

from lib_ckpt2lora.architectures.chroma import Chroma
from lib_ckpt2lora.architectures.flux import FINAL_MODULATION, Flux
from lib_ckpt2lora.architectures.flux2 import Flux2

FLUX_CONFIG = dict(
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
CHROMA_CONFIG = dict(
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
    approximator_num_channels=8,
    approximator_hidden_dim=40,
    approximator_layers=2,
)
ALL_IN_ONE = "model.diffusion_model."


def flux_transformer(seed: int = 0, **config):
    from diffusers import FluxTransformer2DModel

    return tm.randomize_(FluxTransformer2DModel(**{**FLUX_CONFIG, **config}), seed).eval()


def chroma_transformer(seed: int = 0, **config):
    from diffusers import ChromaTransformer2DModel

    return tm.randomize_(ChromaTransformer2DModel(**{**CHROMA_CONFIG, **config}), seed).eval()


def to_bfl(state: dict[str, torch.Tensor], family: str = "flux") -> dict[str, torch.Tensor]:
    """diffusers layout -> BFL layout (fused weights concatenated in the BFL row order)."""
    hidden = state["x_embedder.weight"].shape[0]
    arch = {"chroma": Chroma, "flux2": Flux2}.get(family, Flux)("", "BFL layout", hidden)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module == "norm_out.linear":  # diffusers: scale | shift; BFL: shift | scale
            scale, shift = value.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
            continue
        found = arch.to_bfl(module)
        assert found is not None, f"no BFL name for {key}"
        name, parts = found
        if name.endswith(("query_norm", "key_norm")) or ".norms." in name:
            param = "scale"
        if parts is None:
            out[f"{name}.{param}"] = value
        elif module == parts[0]:
            out[f"{name}.{param}"] = torch.cat([state[f"{part}.{param}"] for part in parts])
    return out


def checkpoint(state: dict[str, torch.Tensor], layout: str, family: str = "flux", prefix: str = "") -> dict[str, torch.Tensor]:
    """A file: ``layout`` "bfl" or "diffusers"; ``prefix`` "" or ALL_IN_ONE (then with a
    text-encoder and VAE stand-in, as ComfyUI's all-in-one files have)."""
    tensors = to_bfl(state, family) if layout == "bfl" else dict(state)
    tensors = {prefix + key: value for key, value in tensors.items()}
    if prefix:
        tensors["text_encoders.t5xxl.transformer.shared.weight"] = torch.randn(64, 24)
        tensors["vae.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3)
    return tensors


def canonical_map(model) -> dict[str, tuple[str, str]]:
    """Engine canonical key -> ("transformer", diffusers parameter), for loader_checks."""
    canonical = {key: ("transformer", key) for key in model.state_dict()}
    for param in ("weight", "bias"):
        for half in FINAL_MODULATION:
            canonical[f"{half}.{param}"] = ("transformer", f"norm_out.linear.{param}")
    return canonical


def single_file_converter(name: str, inner_dim: int):
    """diffusers' own BFL -> diffusers converter ``name`` (single_file_utils), with its
    hard-coded full-size ``inner_dim = 3072`` replaced by the tiny model's width; the rest
    of its code runs unchanged."""
    import inspect
    import textwrap

    from diffusers.loaders import single_file_utils

    source = textwrap.dedent(inspect.getsource(getattr(single_file_utils, name)))
    assert source.count("inner_dim = 3072") == 1, f"{name} changed: update this test helper"
    namespace = dict(vars(single_file_utils))
    exec(compile(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), single_file_utils.__file__, "exec"), namespace)
    return namespace[name]

"""Tiny models with real key names, and running a gradio event the way the server does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from safetensors.torch import save_file

CH, CROSS = 32, 48
U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    """A small SD1.5-layout single-file checkpoint: real ldm / CLIP key names, tiny sizes."""
    attn = {
        "attn1.to_q": (CH, CH),
        "attn1.to_k": (CH, CH),
        "attn1.to_v": (CH, CH),
        "attn1.to_out.0": (CH, CH),
        "attn2.to_q": (CH, CH),
        "attn2.to_k": (CH, CROSS),
        "attn2.to_v": (CH, CROSS),
        "attn2.to_out.0": (CH, CH),
        "ff.net.0.proj": (8 * CH, CH),
        "ff.net.2": (CH, 4 * CH),
    }
    shapes: dict[str, tuple[int, ...]] = {
        U + "input_blocks.0.0.weight": (CH, 4, 3, 3),
        U + "input_blocks.0.0.bias": (CH,),
        U + "input_blocks.1.0.in_layers.2.weight": (CH, CH, 3, 3),
        U + "input_blocks.1.0.emb_layers.1.weight": (CH, 4 * CH),
        U + "input_blocks.1.1.proj_in.weight": (CH, CH, 1, 1),
        U + "input_blocks.1.1.proj_out.weight": (CH, CH, 1, 1),
        U + "input_blocks.1.1.norm.weight": (CH,),
        U + "time_embed.0.weight": (4 * CH, CH),
        U + "time_embed.2.weight": (4 * CH, 4 * CH),
        U + "out.2.weight": (4, CH, 3, 3),
        TE + "embeddings.token_embedding.weight": (64, CROSS),
        TE + "encoder.layers.0.self_attn.q_proj.weight": (CROSS, CROSS),
        TE + "encoder.layers.0.self_attn.k_proj.weight": (CROSS, CROSS),
        TE + "encoder.layers.0.mlp.fc1.weight": (4 * CROSS, CROSS),
        "first_stage_model.decoder.conv_in.weight": (CH, 4, 3, 3),
    }
    for block in ("input_blocks.1.1", "middle_block.1", "output_blocks.3.1"):
        for name, shape in attn.items():
            shapes[f"{U}{block}.transformer_blocks.0.{name}.weight"] = shape
    return shapes


def write_pair(folder: Path, base_name: str, variant_name: str, shapes=None, seed: int = 0, rank: int = 3):
    """A base and a variant differing by a low-rank delta in every matrix; returns both paths."""
    shapes = shapes or sd15_shapes()
    gen = torch.Generator().manual_seed(seed)
    base, variant = {}, {}
    for key, shape in shapes.items():
        weight = torch.randn(shape, generator=gen) * 0.05
        base[key] = weight.to(torch.float16)
        if len(shape) >= 2 and "token_embedding" not in key:
            rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
            delta = (torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)) * 0.002
            weight = weight + delta.reshape(shape)
        variant[key] = weight.to(torch.float16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / base_name))
    save_file(variant, str(folder / variant_name))
    return folder / base_name, folder / variant_name


def generic_shapes(layers: int = 8, width: int = 64) -> dict[str, tuple[int, ...]]:
    return {f"blocks.{i}.attn.weight": (width, width) for i in range(layers)}


def fn_index(blocks, fn) -> int:
    """The index of the event whose function is ``fn`` (gradio 3: list, gradio 4: dict)."""
    fns = blocks.fns
    items = fns.items() if isinstance(fns, dict) else enumerate(fns)
    for index, block_fn in items:
        if block_fn.fn is fn or (block_fn.fn is not None and block_fn.fn == fn):
            return index
    raise LookupError("no such event")


def run_event(blocks, fn, inputs: list) -> list:
    """Run an event as gradio's server does: preprocess, call, postprocess; returns the data."""
    index = fn_index(blocks, fn)
    try:
        from gradio.state_holder import SessionState  # gradio 4

        state = SessionState(blocks)
    except ImportError:  # gradio 3
        state = {}
    result = asyncio.run(blocks.process_api(index, list(inputs), state))
    return result["data"]


def standalone_tab(tmp_path):
    """The tab on standalone services over a fresh base/tuned pair: (blocks, models, loras)."""
    from lib_ckpt2lora.ui.standalone_services import StandaloneServices
    from lib_ckpt2lora.ui.tab import build_tab

    models, loras = tmp_path / "checkpoints", tmp_path / "loras"
    write_pair(models, "base.safetensors", "tuned.safetensors")
    loras.mkdir()
    blocks = build_tab(StandaloneServices(models, loras))
    blocks.queue()
    return blocks, models, loras


def form_inputs(**changes):
    """The tab's form values (job.Form defaults, with ``changes``) in FORM_FIELDS order."""
    from lib_ckpt2lora.ui import job

    values = dict(vars(job.Form()))
    values.update(changes)
    return [values[f] for f in job.FORM_FIELDS]

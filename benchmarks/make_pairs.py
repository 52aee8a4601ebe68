"""Generate realistic (base, variant) checkpoint pairs for the extraction benchmark.

Real key names and full-size shapes, synthetic values:

* ``zimage``: Z-Image (Tongyi-MAI) in the original/ComfyUI layout, no prefix, bf16:
  ``--blocks N`` main ``layers.*`` blocks (the real model has 30) plus every auxiliary
  module (2 noise refiners, 2 context refiners, the embedders, the final layer and the
  pad tokens).
* ``wan`` / ``wan5b``: Wan 2.1/2.2 T2V 14B (a Wan 2.2 A14B expert has the same shapes) /
  TI2V 5B in the original/ComfyUI layout, no prefix, bf16: ``--blocks N`` full-width
  ``blocks.*`` (the real models have 40 / 30) plus every auxiliary module (patch_embedding
  Conv3d, text/time embeddings, time_projection, head, the modulation tables).
* ``anima``: Anima (Cosmos-Predict2 2B DiT + LLM adapter) under ``net.``, bf16: ``--blocks N``
  of its 28 blocks plus every auxiliary module (embedders, final layer, the 6-block adapter).
* ``sd15``: a Stable Diffusion 1.5 single file, fp16: the full UNet in ldm names
  (``model.diffusion_model.*``) and, unless ``--no-text-encoder``, the CLIP-L text
  encoder (``cond_stage_model.transformer.text_model.*``). No VAE.

Values: base weights ~ N(0, 0.02) (norm weights ~ 1, biases small); the variant is
``base + delta`` where, for every matrix (conv kernels flattened to [out, in*k*k]),
``delta = U diag(s) V^T + noise``: U, V random orthonormal of rank min(m, n, 256), a
power-law spectrum s_i = (i+1)^-p with p drawn per tensor from [--decay-min,
--decay-max], plus dense Gaussian noise of --noise times the low-rank part's norm, the
whole scaled so that ||delta||/||W|| = --rel (1e-2). Vectors get a small dense delta.
Both files are then rounded to the storage dtype, exactly as a real fine-tune saved in
bf16/fp16 is (that rounding adds its own dense noise to the stored difference).

Every tensor is generated from its own seed (``--seed`` + a hash of its key), so a
block's values do not depend on how many blocks are generated, and the two files are
written side by side, one tensor at a time, by a streaming safetensors writer: memory
stays at a few tensors whatever the model size.

    python benchmarks/make_pairs.py zimage --blocks 1 --out-dir /tmp/pairs
    python benchmarks/make_pairs.py sd15 --out-dir /tmp/pairs
    python benchmarks/make_pairs.py wan --blocks 2 --out-dir /tmp/pairs
    python benchmarks/make_pairs.py zimage --blocks 30 --device cuda --out-dir /tmp/pairs
    python benchmarks/make_pairs.py --verify-shapes   # compare with diffusers/transformers
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from .stio import StreamingSafetensorsWriter
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from stio import StreamingSafetensorsWriter

# ----------------------------------------------------------------------------- shapes

ZIMAGE_DIM = 3840
ZIMAGE_FFN = 10240
ZIMAGE_HEAD_DIM = 128
ZIMAGE_ADALN = 256  # adaLN input width (min(dim, 256))
ZIMAGE_T_MID = 1024
ZIMAGE_CAP_DIM = 2560
ZIMAGE_PATCH_IN = 64  # in_channels 16 * patch 2 * 2 * f_patch 1
ZIMAGE_MAIN_BLOCKS = 30
ZIMAGE_REFINERS = 2


def zimage_block(prefix: str, modulation: bool) -> list[tuple[str, tuple[int, ...]]]:
    d = ZIMAGE_DIM
    entries = [
        (f"{prefix}.attention.qkv.weight", (3 * d, d)),
        (f"{prefix}.attention.out.weight", (d, d)),
        (f"{prefix}.attention.q_norm.weight", (ZIMAGE_HEAD_DIM,)),
        (f"{prefix}.attention.k_norm.weight", (ZIMAGE_HEAD_DIM,)),
        (f"{prefix}.feed_forward.w1.weight", (ZIMAGE_FFN, d)),
        (f"{prefix}.feed_forward.w2.weight", (d, ZIMAGE_FFN)),
        (f"{prefix}.feed_forward.w3.weight", (ZIMAGE_FFN, d)),
        (f"{prefix}.attention_norm1.weight", (d,)),
        (f"{prefix}.attention_norm2.weight", (d,)),
        (f"{prefix}.ffn_norm1.weight", (d,)),
        (f"{prefix}.ffn_norm2.weight", (d,)),
    ]
    if modulation:
        entries += [
            (f"{prefix}.adaLN_modulation.0.weight", (4 * d, ZIMAGE_ADALN)),
            (f"{prefix}.adaLN_modulation.0.bias", (4 * d,)),
        ]
    return entries


def zimage_entries(blocks: int = ZIMAGE_MAIN_BLOCKS) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of a Z-Image diffusion-model file (original layout) with `blocks` main blocks."""
    d = ZIMAGE_DIM
    entries: list[tuple[str, tuple[int, ...]]] = [
        ("x_pad_token", (1, d)),
        ("cap_pad_token", (1, d)),
        ("x_embedder.weight", (d, ZIMAGE_PATCH_IN)),
        ("x_embedder.bias", (d,)),
        ("t_embedder.mlp.0.weight", (ZIMAGE_T_MID, ZIMAGE_ADALN)),
        ("t_embedder.mlp.0.bias", (ZIMAGE_T_MID,)),
        ("t_embedder.mlp.2.weight", (ZIMAGE_ADALN, ZIMAGE_T_MID)),
        ("t_embedder.mlp.2.bias", (ZIMAGE_ADALN,)),
        ("cap_embedder.0.weight", (ZIMAGE_CAP_DIM,)),
        ("cap_embedder.1.weight", (d, ZIMAGE_CAP_DIM)),
        ("cap_embedder.1.bias", (d,)),
        ("final_layer.linear.weight", (ZIMAGE_PATCH_IN, d)),
        ("final_layer.linear.bias", (ZIMAGE_PATCH_IN,)),
        ("final_layer.adaLN_modulation.1.weight", (d, ZIMAGE_ADALN)),
        ("final_layer.adaLN_modulation.1.bias", (d,)),
    ]
    for i in range(ZIMAGE_REFINERS):
        entries += zimage_block(f"noise_refiner.{i}", modulation=True)
        entries += zimage_block(f"context_refiner.{i}", modulation=False)
    for i in range(blocks):
        entries += zimage_block(f"layers.{i}", modulation=True)
    return entries


SD15_UNET = "model.diffusion_model."
SD15_TE = "cond_stage_model.transformer.text_model."
SD15_CONTEXT = 768
SD15_TIME = 1280


def _resblock(p: str, cin: int, cout: int) -> list[tuple[str, tuple[int, ...]]]:
    e = [
        (f"{p}.in_layers.0.weight", (cin,)),
        (f"{p}.in_layers.0.bias", (cin,)),
        (f"{p}.in_layers.2.weight", (cout, cin, 3, 3)),
        (f"{p}.in_layers.2.bias", (cout,)),
        (f"{p}.emb_layers.1.weight", (cout, SD15_TIME)),
        (f"{p}.emb_layers.1.bias", (cout,)),
        (f"{p}.out_layers.0.weight", (cout,)),
        (f"{p}.out_layers.0.bias", (cout,)),
        (f"{p}.out_layers.3.weight", (cout, cout, 3, 3)),
        (f"{p}.out_layers.3.bias", (cout,)),
    ]
    if cin != cout:
        e += [(f"{p}.skip_connection.weight", (cout, cin, 1, 1)), (f"{p}.skip_connection.bias", (cout,))]
    return e


def _spatial_transformer(p: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    t = f"{p}.transformer_blocks.0"
    return [
        (f"{p}.norm.weight", (c,)),
        (f"{p}.norm.bias", (c,)),
        (f"{p}.proj_in.weight", (c, c, 1, 1)),
        (f"{p}.proj_in.bias", (c,)),
        (f"{t}.attn1.to_q.weight", (c, c)),
        (f"{t}.attn1.to_k.weight", (c, c)),
        (f"{t}.attn1.to_v.weight", (c, c)),
        (f"{t}.attn1.to_out.0.weight", (c, c)),
        (f"{t}.attn1.to_out.0.bias", (c,)),
        (f"{t}.ff.net.0.proj.weight", (8 * c, c)),
        (f"{t}.ff.net.0.proj.bias", (8 * c,)),
        (f"{t}.ff.net.2.weight", (c, 4 * c)),
        (f"{t}.ff.net.2.bias", (c,)),
        (f"{t}.attn2.to_q.weight", (c, c)),
        (f"{t}.attn2.to_k.weight", (c, SD15_CONTEXT)),
        (f"{t}.attn2.to_v.weight", (c, SD15_CONTEXT)),
        (f"{t}.attn2.to_out.0.weight", (c, c)),
        (f"{t}.attn2.to_out.0.bias", (c,)),
        (f"{t}.norm1.weight", (c,)),
        (f"{t}.norm1.bias", (c,)),
        (f"{t}.norm2.weight", (c,)),
        (f"{t}.norm2.bias", (c,)),
        (f"{t}.norm3.weight", (c,)),
        (f"{t}.norm3.bias", (c,)),
        (f"{p}.proj_out.weight", (c, c, 1, 1)),
        (f"{p}.proj_out.bias", (c,)),
    ]


def sd15_unet_entries() -> list[tuple[str, tuple[int, ...]]]:
    """The SD1.5 UNet in ldm names (without the ``model.diffusion_model.`` prefix)."""
    ch = (320, 640, 1280, 1280)
    e: list[tuple[str, tuple[int, ...]]] = [
        ("time_embed.0.weight", (SD15_TIME, ch[0])),
        ("time_embed.0.bias", (SD15_TIME,)),
        ("time_embed.2.weight", (SD15_TIME, SD15_TIME)),
        ("time_embed.2.bias", (SD15_TIME,)),
        ("input_blocks.0.0.weight", (ch[0], 4, 3, 3)),
        ("input_blocks.0.0.bias", (ch[0],)),
    ]
    skip_channels = [ch[0]]
    n = 1
    cur = ch[0]
    for level, c in enumerate(ch):
        for _ in range(2):
            e += _resblock(f"input_blocks.{n}.0", cur, c)
            cur = c
            if level < 3:
                e += _spatial_transformer(f"input_blocks.{n}.1", c)
            skip_channels.append(c)
            n += 1
        if level < 3:
            e += [(f"input_blocks.{n}.0.op.weight", (c, c, 3, 3)), (f"input_blocks.{n}.0.op.bias", (c,))]
            skip_channels.append(c)
            n += 1
    e += _resblock("middle_block.0", cur, cur)
    e += _spatial_transformer("middle_block.1", cur)
    e += _resblock("middle_block.2", cur, cur)
    n = 0
    for level, c in reversed(list(enumerate(ch))):
        for i in range(3):
            e += _resblock(f"output_blocks.{n}.0", cur + skip_channels.pop(), c)
            cur = c
            sub = 1
            if level < 3:
                e += _spatial_transformer(f"output_blocks.{n}.1", c)
                sub = 2
            if level > 0 and i == 2:
                e += [(f"output_blocks.{n}.{sub}.conv.weight", (c, c, 3, 3)), (f"output_blocks.{n}.{sub}.conv.bias", (c,))]
            n += 1
    e += [
        ("out.0.weight", (ch[0],)),
        ("out.0.bias", (ch[0],)),
        ("out.2.weight", (4, ch[0], 3, 3)),
        ("out.2.bias", (4,)),
    ]
    return e


def sd15_text_encoder_entries() -> list[tuple[str, tuple[int, ...]]]:
    """CLIP ViT-L/14 text model (HF names, without the ``cond_stage_model.transformer.text_model.`` prefix)."""
    h, inter = 768, 3072
    e: list[tuple[str, tuple[int, ...]]] = [
        ("embeddings.token_embedding.weight", (49408, h)),
        ("embeddings.position_embedding.weight", (77, h)),
    ]
    for i in range(12):
        p = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            e += [(f"{p}.self_attn.{proj}.weight", (h, h)), (f"{p}.self_attn.{proj}.bias", (h,))]
        e += [
            (f"{p}.layer_norm1.weight", (h,)),
            (f"{p}.layer_norm1.bias", (h,)),
            (f"{p}.mlp.fc1.weight", (inter, h)),
            (f"{p}.mlp.fc1.bias", (inter,)),
            (f"{p}.mlp.fc2.weight", (h, inter)),
            (f"{p}.mlp.fc2.bias", (h,)),
            (f"{p}.layer_norm2.weight", (h,)),
            (f"{p}.layer_norm2.bias", (h,)),
        ]
    e += [("final_layer_norm.weight", (h,)), ("final_layer_norm.bias", (h,))]
    e += [("embeddings.position_ids", (1, 77))]  # int64 buffer, present in the original SD1.5 files
    return e


def sd15_entries(text_encoder: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    entries = [(SD15_UNET + k, s) for k, s in sd15_unet_entries()]
    if text_encoder:
        entries += [(SD15_TE + k, s) for k, s in sd15_text_encoder_entries()]
    return entries


# Anima (circlestone-labs, ComfyUI comfy/ldm/anima): Cosmos-Predict2 2B's DiT + the LLM adapter,
# released under Cosmos' "net." prefix. Widths from comfy/model_detection.py ("anima") and
# diffusers' AnimaTextConditioner defaults; --verify-shapes checks them against diffusers.
ANIMA_PREFIX = "net."
ANIMA_DIM = 2048
ANIMA_HEAD_DIM = 128
ANIMA_MLP = 8192
ANIMA_ADALN_LORA = 256
ANIMA_CONTEXT = 1024
ANIMA_PATCH_IN = 68  # (16 latent channels + 1 padding mask) * 2 * 2
ANIMA_OUT = 64  # 16 channels * 2 * 2
ANIMA_MAIN_BLOCKS = 28
ANIMA_ADAPTER = dict(dim=1024, blocks=6, head_dim=64, vocab=32128)


def anima_entries(blocks: int = ANIMA_MAIN_BLOCKS) -> list[tuple[str, tuple[int, ...]]]:
    """``blocks`` DiT blocks plus every auxiliary module (embedders, final layer, LLM adapter)."""
    d, a = ANIMA_DIM, ANIMA_ADAPTER["dim"]
    out: list[tuple[str, tuple[int, ...]]] = []
    for i in range(blocks):
        p = f"blocks.{i}."
        for attn, kv_in in (("self_attn", d), ("cross_attn", ANIMA_CONTEXT)):
            out += [(f"{p}{attn}.q_proj.weight", (d, d)), (f"{p}{attn}.k_proj.weight", (d, kv_in)),
                    (f"{p}{attn}.v_proj.weight", (d, kv_in)), (f"{p}{attn}.output_proj.weight", (d, d)),
                    (f"{p}{attn}.q_norm.weight", (ANIMA_HEAD_DIM,)), (f"{p}{attn}.k_norm.weight", (ANIMA_HEAD_DIM,))]
        out += [(f"{p}mlp.layer1.weight", (ANIMA_MLP, d)), (f"{p}mlp.layer2.weight", (d, ANIMA_MLP))]
        for mod in ("self_attn", "cross_attn", "mlp"):
            out += [(f"{p}adaln_modulation_{mod}.1.weight", (ANIMA_ADALN_LORA, d)),
                    (f"{p}adaln_modulation_{mod}.2.weight", (3 * d, ANIMA_ADALN_LORA))]
    out += [("x_embedder.proj.1.weight", (d, ANIMA_PATCH_IN)), ("t_embedder.1.linear_1.weight", (d, d)),
            ("t_embedder.1.linear_2.weight", (3 * d, d)), ("t_embedding_norm.weight", (d,)),
            ("final_layer.adaln_modulation.1.weight", (ANIMA_ADALN_LORA, d)),
            ("final_layer.adaln_modulation.2.weight", (2 * d, ANIMA_ADALN_LORA)),
            ("final_layer.linear.weight", (ANIMA_OUT, d))]
    q = "llm_adapter."
    out += [(q + "embed.weight", (ANIMA_ADAPTER["vocab"], a)), (q + "out_proj.weight", (a, a)), (q + "out_proj.bias", (a,)),
            (q + "norm.weight", (a,))]
    for i in range(ANIMA_ADAPTER["blocks"]):
        p = f"{q}blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            out += [(f"{p}norm_{attn}.weight", (a,))]
            out += [(f"{p}{attn}.{name}.weight", (a, a)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            out += [(f"{p}{attn}.{name}.weight", (ANIMA_ADAPTER["head_dim"],)) for name in ("q_norm", "k_norm")]
        out += [(f"{p}norm_mlp.weight", (a,)), (f"{p}mlp.0.weight", (4 * a, a)), (f"{p}mlp.0.bias", (4 * a,)),
                (f"{p}mlp.2.weight", (a, 4 * a)), (f"{p}mlp.2.bias", (a,))]
    return [(ANIMA_PREFIX + k, s) for k, s in out]


# Wan 2.1/2.2 (original / ComfyUI layout): width, FFN width, input and output latent channels,
# blocks of the released models (diffusers' Wan-AI/*-Diffusers transformer configs).
WAN_SIZES = {"wan": (5120, 13824, 16, 16, 40), "wan5b": (3072, 14336, 48, 48, 30)}
WAN_TEXT_DIM = 4096  # umT5-XXL
WAN_FREQ_DIM = 256
WAN_PATCH = (1, 2, 2)


def wan_entries(arch: str, blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    dim, ffn, in_ch, out_ch, _ = WAN_SIZES[arch]
    patch = WAN_PATCH[0] * WAN_PATCH[1] * WAN_PATCH[2]
    entries = [
        ("patch_embedding.weight", (dim, in_ch, *WAN_PATCH)), ("patch_embedding.bias", (dim,)),
        ("text_embedding.0.weight", (dim, WAN_TEXT_DIM)), ("text_embedding.0.bias", (dim,)),
        ("text_embedding.2.weight", (dim, dim)), ("text_embedding.2.bias", (dim,)),
        ("time_embedding.0.weight", (dim, WAN_FREQ_DIM)), ("time_embedding.0.bias", (dim,)),
        ("time_embedding.2.weight", (dim, dim)), ("time_embedding.2.bias", (dim,)),
        ("time_projection.1.weight", (6 * dim, dim)), ("time_projection.1.bias", (6 * dim,)),
        ("head.head.weight", (out_ch * patch, dim)), ("head.head.bias", (out_ch * patch,)),
        ("head.modulation", (1, 2, dim)),
    ]
    for i in range(blocks):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for name in "qkvo":
                entries += [(f"{b}{attn}.{name}.weight", (dim, dim)), (f"{b}{attn}.{name}.bias", (dim,))]
            entries += [(f"{b}{attn}.norm_q.weight", (dim,)), (f"{b}{attn}.norm_k.weight", (dim,))]
        entries += [
            (f"{b}norm3.weight", (dim,)), (f"{b}norm3.bias", (dim,)),
            (f"{b}ffn.0.weight", (ffn, dim)), (f"{b}ffn.0.bias", (ffn,)),
            (f"{b}ffn.2.weight", (dim, ffn)), (f"{b}ffn.2.bias", (dim,)),
            (f"{b}modulation", (1, 6, dim)),
        ]
    return entries


# ------------------------------------------------------------------------ values


@dataclass
class DeltaSettings:
    rel: float = 1e-2          # ||delta||_F / ||W||_F
    noise: float = 0.1         # dense noise norm / low-rank part norm
    rank: int = 256            # rank of the structured part (capped by the matrix size)
    decay_min: float = 0.5     # spectrum s_i = (i+1)^-p, p uniform in [decay_min, decay_max]
    decay_max: float = 1.5
    # Per-matrix ||delta||/||W|| = rel * spread**u, u uniform in [-1, 1] (1 = every layer alike).
    # Real fine-tunes change some layers far more than others; a global rank budget is
    # measured on pairs with a spread (benchmarks/bench_budget.py).
    rel_spread: float = 1.0

    def matrix_rel(self, seed: int, key: str, device: torch.device) -> float:
        if self.rel_spread == 1.0:
            return self.rel
        # Its own generator, so every other value of the pair is as without a spread.
        u = 2 * torch.rand((), generator=_generator(seed + 7919, key, device), device=device).item() - 1
        return self.rel * self.rel_spread**u


def _generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return g


def _is_matrix(shape: tuple[int, ...]) -> bool:
    """A weight the extractor can factor: 2-D or a conv kernel, both matrix sides > 1."""
    return len(shape) >= 2 and shape[0] > 1 and math.prod(shape[1:]) > 1


def make_tensor_pair(key: str, shape: tuple[int, ...], seed: int, settings: DeltaSettings,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, variant) in fp32 for one key. Deterministic in (seed, key)."""
    g = _generator(seed, key, device)
    if key.endswith("position_ids"):
        ids = torch.arange(shape[-1], device=device).reshape(shape)
        return ids, ids.clone()
    if _is_matrix(shape):
        m, n = shape[0], math.prod(shape[1:])
        base = torch.randn((m, n), generator=g, device=device).mul_(0.02)
        k = min(m, n, settings.rank)
        u = torch.linalg.qr(torch.randn((m, k), generator=g, device=device)).Q
        v = torch.linalg.qr(torch.randn((n, k), generator=g, device=device)).Q
        p = settings.decay_min + (settings.decay_max - settings.decay_min) * torch.rand((), generator=g, device=device)
        s = torch.arange(1, k + 1, device=device, dtype=torch.float32).pow(-p)
        delta = (u * s) @ v.T
        delta.mul_(1.0 / delta.norm())
        if settings.noise > 0:
            noise = torch.randn((m, n), generator=g, device=device)
            delta.add_(noise, alpha=settings.noise / noise.norm().item())
            del noise
        delta.mul_(settings.matrix_rel(seed, key, device) * base.norm() / delta.norm())
        variant = base.add(delta)
        return base.reshape(shape), variant.reshape(shape)
    last = key.rsplit(".", 1)[-1]
    if len(shape) == 1 and last == "weight":  # every 1-D weight here is a norm's scale
        base = 1.0 + 0.05 * torch.randn(shape, generator=g, device=device)
    elif last == "bias":
        base = 0.01 * torch.randn(shape, generator=g, device=device)
    else:
        base = 0.02 * torch.randn(shape, generator=g, device=device)
    delta = torch.randn(shape, generator=g, device=device)
    variant = base + delta * (settings.rel * base.norm() / delta.norm())
    return base, variant


# -------------------------------------------------------------------------- pairs


def pair_layout(arch: str, blocks: int = 1, text_encoder: bool = True) -> tuple[list, torch.dtype, dict[str, str]]:
    if arch == "zimage":
        return zimage_entries(blocks), torch.bfloat16, {"format": "pt"}
    if arch == "sd15":
        return sd15_entries(text_encoder), torch.float16, {"format": "pt"}
    if arch in WAN_SIZES:
        return wan_entries(arch, blocks), torch.bfloat16, {"format": "pt"}
    if arch == "anima":
        return anima_entries(blocks), torch.bfloat16, {"format": "pt"}
    raise ValueError(f"unknown architecture {arch!r} (zimage, sd15, wan, wan5b, anima)")


def default_names(arch: str, blocks: int) -> tuple[str, str]:
    stem = "sd15" if arch == "sd15" else f"{arch}_b{blocks}"
    return f"{stem}_base.safetensors", f"{stem}_variant.safetensors"


def generate_pair(arch: str, out_dir: Path, blocks: int = 1, seed: int = 0,
                  settings: DeltaSettings | None = None, device: str = "cpu",
                  text_encoder: bool = True, overwrite: bool = False,
                  log=print) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>_base.safetensors`` and ``..._variant.safetensors``; return their paths."""
    settings = settings or DeltaSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_name, variant_name = default_names(arch, blocks)
    base_path, variant_path = out_dir / base_name, out_dir / variant_name
    if not overwrite and base_path.exists() and variant_path.exists():
        log(f"exists, kept: {base_path} {variant_path}")
        return base_path, variant_path
    entries, dtype, metadata = pair_layout(arch, blocks, text_encoder)
    entries = sorted(entries)
    dev = torch.device(device)

    def storage_dtype(key: str) -> torch.dtype:
        return torch.int64 if key.endswith("position_ids") else dtype

    layout = [(k, s, storage_dtype(k)) for k, s in entries]
    meta = dict(metadata, ckpt2lora_bench=json.dumps({"arch": arch, "blocks": blocks, "seed": seed, **settings.__dict__}))
    writers = [StreamingSafetensorsWriter(base_path, layout, meta),
               StreamingSafetensorsWriter(variant_path, layout, meta)]
    t0 = time.perf_counter()
    # Writes of tensor i (both files, in two threads) overlap the generation of tensor i+1.
    pool = ThreadPoolExecutor(max_workers=2)
    pending: list = []
    try:
        for i, (key, shape) in enumerate(entries):
            base, variant = make_tensor_pair(key, shape, seed, settings, dev)
            tensors = [base.to(storage_dtype(key)).cpu(), variant.to(storage_dtype(key)).cpu()]
            del base, variant
            for f in pending:
                f.result()
            pending = [pool.submit(w.write, key, t) for w, t in zip(writers, tensors)]
            del tensors
            if (i + 1) % 50 == 0:
                log(f"  {i + 1}/{len(entries)} tensors, {time.perf_counter() - t0:.1f} s")
        for f in pending:
            f.result()
        for w in writers:
            w.close()
    except BaseException:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        for w in writers:
            w.abort()
        raise
    pool.shutdown()
    size = base_path.stat().st_size
    log(f"wrote {len(entries)} tensors x2 ({size / 2**30:.2f} GiB each) in {time.perf_counter() - t0:.1f} s: "
        f"{base_path}, {variant_path}")
    return base_path, variant_path


# ------------------------------------------------------------------- verification


def verify_shapes() -> bool:
    """Compare the layouts with diffusers / transformers models built on the meta device."""
    ok = True
    from diffusers import UNet2DConditionModel, ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        zimage = ZImageTransformer2DModel()
    want = {k: tuple(v.shape) for k, v in zimage.state_dict().items()}
    got: dict[str, tuple[int, ...]] = {}
    for key, shape in zimage_entries(ZIMAGE_MAIN_BLOCKS):
        for diff_key, diff_shape in zimage_original_to_diffusers(key, shape):
            got[diff_key] = diff_shape
    ok &= _compare("Z-Image (30 blocks) vs diffusers ZImageTransformer2DModel()", got, want)

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=SD15_CONTEXT)
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    ldm = dict(sd15_unet_entries())
    mapping = convert_ldm_unet_checkpoint({SD15_UNET + k: k for k in ldm}, {"layers_per_block": 2})
    got = {diff_key: ldm[ldm_key] for diff_key, ldm_key in mapping.items()}
    ok &= _compare("SD1.5 UNet (ldm) vs diffusers UNet2DConditionModel(cross_attention_dim=768)", got, want)
    if len(mapping) != len(ldm):
        print(f"  {len(ldm) - len(mapping)} ldm keys were not converted")
        ok = False

    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)
    with torch.device("meta"):
        clip = CLIPTextModel(config)
    want = {k: tuple(v.shape) for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    got = {k: s for k, s in sd15_text_encoder_entries() if not k.endswith("position_ids")}
    if next(iter(want)).startswith("text_model."):
        got = {"text_model." + k: s for k, s in got.items()}
    ok &= _compare("CLIP-L text model vs transformers CLIPTextModel", got, want)
    ok &= verify_anima_shapes()
    ok &= verify_wan_shapes()
    return ok


def verify_wan_shapes() -> bool:
    """Both Wan layouts, through diffusers' own single-file converter, against its model."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ok = True
    for arch, (dim, ffn, in_ch, out_ch, blocks) in WAN_SIZES.items():
        with torch.device("meta"):
            model = WanTransformer3DModel(num_attention_heads=dim // 128, in_channels=in_ch, out_channels=out_ch,
                                          ffn_dim=ffn, num_layers=blocks)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        original = {k: torch.empty(shape, device="meta") for k, shape in wan_entries(arch, blocks)}
        got = {k: tuple(v.shape) for k, v in convert_wan_transformer_to_diffusers(original).items()}
        ok &= _compare(f"{arch} ({blocks} blocks) vs diffusers WanTransformer3DModel", got, want)
    return ok


def verify_anima_shapes() -> bool:
    """Anima (28 blocks) in ComfyUI's names vs diffusers' CosmosTransformer3DModel + AnimaTextConditioner."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    from lib_ckpt2lora.architectures.anima import TEXT_CONDITIONER, diffusers_name

    with torch.device("meta"):
        transformer = CosmosTransformer3DModel(
            num_attention_heads=16, attention_head_dim=128, num_layers=28, text_embed_dim=1024, adaln_lora_dim=256,
            rope_scale=(1.0, 4.0, 4.0), extra_pos_embed_type=None)
        conditioner = AnimaTextConditioner()
    want = {"transformer." + k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    want |= {TEXT_CONDITIONER + k: tuple(v.shape) for k, v in conditioner.state_dict().items()}
    got = {}
    for key, shape in anima_entries(ANIMA_MAIN_BLOCKS):
        module, _, param = key[len(ANIMA_PREFIX):].rpartition(".")
        got[f"{diffusers_name(module)}.{param}"] = shape
    return _compare("Anima (28 blocks) vs diffusers CosmosTransformer3DModel + AnimaTextConditioner", got, want)


def zimage_original_to_diffusers(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Original-layout Z-Image key -> diffusers key(s) (qkv splits into three)."""
    if key.endswith("attention.qkv.weight"):
        stem = key[: -len("qkv.weight")]
        part = (shape[0] // 3, shape[1])
        return [(f"{stem}to_{x}.weight", part) for x in "qkv"]
    new = key.replace("attention.out.", "attention.to_out.0.")
    new = new.replace("attention.q_norm.", "attention.norm_q.").replace("attention.k_norm.", "attention.norm_k.")
    if new.startswith("x_embedder."):
        new = "all_x_embedder.2-1." + new[len("x_embedder."):]
    if new.startswith("final_layer."):
        new = "all_final_layer.2-1." + new[len("final_layer."):]
    return [(new, shape)]


def _compare(title: str, got: dict, want: dict) -> bool:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
    good = not (missing or extra or wrong)
    print(f"{'OK ' if good else 'BAD'} {title}: {len(got)} keys"
          + ("" if good else f"; missing {missing[:5]} extra {extra[:5]} wrong {[(k, got[k], want[k]) for k in wrong[:5]]}"))
    return good


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", nargs="?", choices=("zimage", "sd15", *WAN_SIZES, "anima"), help="which pair to generate")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/ckpt2lora_pairs"))
    ap.add_argument("--blocks", type=int, default=1,
                    help=f"Z-Image main blocks (real model: {ZIMAGE_MAIN_BLOCKS}); Wan blocks (40 for 14B, 30 for 5B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rel", type=float, default=DeltaSettings.rel, help="||delta|| / ||W|| (default 1e-2)")
    ap.add_argument("--noise", type=float, default=DeltaSettings.noise,
                    help="dense noise norm relative to the low-rank part (default 0.1)")
    ap.add_argument("--delta-rank", type=int, default=DeltaSettings.rank)
    ap.add_argument("--decay-min", type=float, default=DeltaSettings.decay_min)
    ap.add_argument("--decay-max", type=float, default=DeltaSettings.decay_max)
    ap.add_argument("--rel-spread", type=float, default=DeltaSettings.rel_spread,
                    help="per-matrix ||delta||/||W|| = rel * spread**u, u uniform in [-1, 1] (default 1: all alike)")
    ap.add_argument("--no-text-encoder", action="store_true", help="sd15: UNet only")
    ap.add_argument("--device", default="cpu", help="where values are generated (cpu, cuda)")
    ap.add_argument("--overwrite", action="store_true", help="regenerate even if the pair exists")
    ap.add_argument("--verify-shapes", action="store_true",
                    help="check the layouts against diffusers/transformers models and exit")
    args = ap.parse_args(argv)
    if args.verify_shapes:
        return 0 if verify_shapes() else 1
    if args.arch is None:
        ap.error("choose an architecture: zimage, sd15, wan, wan5b or anima")
    most = WAN_SIZES[args.arch][4] if args.arch in WAN_SIZES else ZIMAGE_MAIN_BLOCKS
    most = ANIMA_MAIN_BLOCKS if args.arch == "anima" else most
    if args.blocks < 0 or args.blocks > most:
        ap.error(f"--blocks must be 0..{most}")
    settings = DeltaSettings(args.rel, args.noise, args.delta_rank, args.decay_min, args.decay_max, args.rel_spread)
    base, variant = generate_pair(args.arch, args.out_dir, args.blocks, args.seed, settings, args.device,
                                  text_encoder=not args.no_text_encoder, overwrite=args.overwrite)
    print(base)
    print(variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())

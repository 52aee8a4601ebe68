"""Realistic deltas for tests: what a fine-tune looks like, not an exactly low-rank toy.

A real fine-tune's delta has a decaying singular spectrum (a few strong directions, a
long tail) under dense full-rank noise, and stored in bf16 the rounding of the variant's
weights adds more dense noise on top. Widths of 1024 and more make the engine take its
randomized SVD path (the exact SVD is used only when the wanted rank is a quarter of the
smaller side or more).

Use:
    base = base_weights({"blocks.0.attn.weight": (1024, 1024)}, seed=0)     # bf16
    delta = {k: noisy_delta(*base[k].shape, seed=1) for k in base}         # fp32
    variant = apply_delta(base, delta)                                      # bf16(base + delta)
    save(base, tmp_path / "base.safetensors")
    realized(base, variant)   # the fp32 delta the engine will actually see

Keys are plain ``blocks.N.<name>.weight``: the engine treats such a file generically
(LoRA keys ``diffusion_model.<key>``), which is all these tests need.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Typical weight scale of a transformer linear layer, and a fine-tune's relative change.
WEIGHT_STD = 0.02
RELATIVE_CHANGE = 0.01
DEFAULT_SHAPES = {
    "blocks.0.attn.weight": (1024, 1024),
    "blocks.0.mlp.weight": (1536, 1024),
    "blocks.1.proj.weight": (1024, 1280),
}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


def decaying_spectrum(count: int, decay: float = 1.0) -> torch.Tensor:
    """s_i = (i + 1)^-decay, i < count (float64)."""
    return (torch.arange(count, dtype=torch.float64) + 1) ** -decay


def signal_from(u: torch.Tensor, v: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
    """u diag(spectrum) v^T (float64)."""
    return (u * spectrum) @ v.T


def add_noise(signal: torch.Tensor, noise: float, gen: torch.Generator, norm: float | None = None) -> torch.Tensor:
    """signal + dense Gaussian noise holding ``noise`` of the result's norm (e.g. 0.3), with
    mildly uneven row and column scales as real weights have; scaled to ``norm`` if given.
    Returns fp32."""
    rows, cols = signal.shape
    raw = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    raw *= torch.exp(0.3 * torch.randn(rows, 1, generator=gen, dtype=torch.float64))
    raw *= torch.exp(0.3 * torch.randn(1, cols, generator=gen, dtype=torch.float64))
    signal_norm = float(signal.norm())
    if signal_norm > 0 and noise < 1:
        raw *= noise / (1 - noise**2) ** 0.5 * signal_norm / float(raw.norm())
    result = signal + raw
    if norm is not None:
        result *= norm / float(result.norm())
    return result.float()


def noisy_delta(
    rows: int,
    cols: int,
    seed: int,
    decay: float = 1.0,
    noise: float = 0.3,
    signal_rank: int | None = None,
    norm: float | None = None,
) -> torch.Tensor:
    """A fine-tune-like delta: decaying spectrum over ``signal_rank`` (a quarter of the
    smaller side) directions plus dense noise holding ``noise`` of its norm. Default norm:
    RELATIVE_CHANGE of a WEIGHT_STD weight of this shape."""
    gen = generator(seed)
    rank = signal_rank or min(rows, cols) // 4
    signal = signal_from(orthonormal(rows, rank, gen), orthonormal(cols, rank, gen), decaying_spectrum(rank, decay))
    return add_noise(signal, noise, gen, norm if norm is not None else default_norm(rows, cols))


def orthogonal_noisy_deltas(
    rows: int, cols: int, count: int, seed: int, decay: float = 1.0, noise: float = 0.3, signal_rank: int | None = None
) -> list[torch.Tensor]:
    """``count`` fine-tune-like deltas whose signals have mutually orthogonal row spaces and
    mutually orthogonal column spaces, each with its own independent noise."""
    gen = generator(seed)
    rank = signal_rank or min(rows, cols) // (4 * count)
    u, v = orthonormal(rows, rank * count, gen), orthonormal(cols, rank * count, gen)
    deltas = []
    for i in range(count):
        part = slice(i * rank, (i + 1) * rank)
        signal = signal_from(u[:, part], v[:, part], decaying_spectrum(rank, decay))
        deltas.append(add_noise(signal, noise, gen, default_norm(rows, cols)))
    return deltas


def default_norm(rows: int, cols: int) -> float:
    return RELATIVE_CHANGE * WEIGHT_STD * (rows * cols) ** 0.5


def base_weights(shapes: dict | None = None, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights of WEIGHT_STD, stored in ``dtype``."""
    gen = generator(seed)
    shapes = shapes or DEFAULT_SHAPES
    return {key: (WEIGHT_STD * torch.randn(*shape, generator=gen)).to(dtype) for key, shape in shapes.items()}


def apply_delta(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], dtype=None) -> dict[str, torch.Tensor]:
    """A variant: (base + delta) rounded to the base's dtype (or ``dtype``); keys without a delta stay."""
    out = {}
    for key, weight in base.items():
        target = dtype or weight.dtype
        out[key] = (weight.float() + deltas[key]).to(target) if key in deltas else weight.to(target)
    return out


def mirrored(base: dict[str, torch.Tensor], variant: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """2 * base - variant, rounded to the stored dtype: the variant with its delta negated."""
    return {key: (2 * base[key].float() - variant[key].float()).to(variant[key].dtype) for key in base}


def realized(base: dict[str, torch.Tensor], variant: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 deltas the engine sees: stored variant - stored base."""
    return {key: variant[key].float() - base[key].float() for key in base}


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Write as safetensors, each tensor in its own dtype."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path

"""Measure fused vs split qkv LoRAs (issue 11): per-part relative error and bytes.

    .venv/bin/python tests/measure_fused_qkv.py WIDTH NOISE      (e.g. 3840 0.3, 3840 0.05)

q, k and v change independently (full-rank noisy deltas, norms 1 : 0.4 : 1.6, rounded
through bf16 weights). Candidates: the split modules; one SVD of the stacked q|k|v at the
cap (the old --format comfy), at 3x the cap with the energy rule, at the sum of the split
ranks; and the block-diagonal module --format comfy writes now. Figures are in
lib_ckpt2lora/architectures/zimage.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from realistic import default_norm, noisy_delta  # noqa: E402

from lib_ckpt2lora.block_lora import factorize_blocks  # noqa: E402
from lib_ckpt2lora.svd import factorize  # noqa: E402

SCALES = (1.0, 0.4, 1.6)  # q, k, v


def deltas_for(width: int, noise: float) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, scale in enumerate(SCALES):
        base = (torch.randn(width, width, generator=gen) * 0.02).bfloat16()
        delta = noisy_delta(width, width, seed=10 + i, noise=noise, norm=scale * default_norm(width, width))
        out.append((base.float() + delta).bfloat16().float() - base.float())
    return out


def main(width: int, noise: float) -> None:
    deltas = deltas_for(width, noise)
    stacked = torch.cat(deltas)

    def errors(product: torch.Tensor) -> str:
        parts = product.split(width)
        return "/".join(f"{float((d - p).norm() / d.norm()):.3f}" for d, p in zip(deltas, parts))

    def fresh() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    for label, rank, cap in (("auto (0.95, cap 64)", 0, 64), ("--rank 16", 16, 64)):
        split = [factorize(d, rank, 0.95, cap, False, fresh()) for d in deltas]
        total = sum(f.rank for f in split)
        rows = [
            ("split", " ".join(str(f.rank) for f in split), errors(torch.cat([f.up @ f.down for f in split])), total * 2 * width),
        ]
        for name, fixed, fused_cap in (
            ("one SVD at the cap", rank, cap),
            ("one SVD, 3x cap", 3 * rank, 3 * cap),
            ("one SVD, sum of split ranks", total, total),
        ):
            f = factorize(stacked, fixed, 0.95, fused_cap, False, fresh())
            rows.append((name, str(f.rank), errors(f.up @ f.down), f.rank * 4 * width))
        block = factorize_blocks(stacked, [width] * 3, rank, 0.95, cap, False, fresh())
        rows.append(("block-diagonal", str(block.rank), errors(block.up @ block.down), block.rank * 4 * width))
        for name, ranks, errs, values in rows:
            megabytes = 2 * values / 1e6
            print(f"{width} wide, noise {noise}, {label}: {name:28s} rank {ranks:10s} q/k/v error {errs}  {megabytes:.2f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))

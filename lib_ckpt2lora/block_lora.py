"""One LoRA module for weights that a format fuses (Z-Image's q|k|v), block by block.

A fused module must carry exactly what the split modules would: each part keeps its own
energy-rule rank (or ``--rank N`` each), and the module is

    up   = blockdiag(up_q, up_k, up_v)      [rows_q + rows_k + rows_v, r_q + r_k + r_v]
    down = [down_q; down_k; down_v]         [r_q + r_k + r_v, in]

so up @ down is the split LoRA's product, row block by row block. One SVD of the stacked
matrix at one rank budget was measured worse: it spends the budget on the part that
changed most and loses the quieter part (figures in architectures/zimage.py).
"""

from __future__ import annotations

import torch

from .svd import Factorization, factorize, squared_norm


def factorize_blocks(
    matrix: torch.Tensor,
    rows: list[int],
    fixed_rank: int = 0,
    threshold: float = 0.95,
    cap: int = 64,
    exact: bool = False,
    generator: torch.Generator | None = None,
    total_energy: float | None = None,
) -> Factorization:
    """Factor each row block of ``matrix`` on its own and join them block-diagonally.

    ``rows``: the height of each block, in order (one block: a plain ``factorize``).
    A block that did not change gets no columns at all."""
    if len(rows) == 1:
        return factorize(matrix, fixed_rank, threshold, cap, exact, generator, total_energy=total_energy)
    blocks = matrix.split(rows, dim=0)
    energies = [squared_norm(block) for block in blocks]
    ups, downs, kept = [], [], []
    row = 0
    captured = 0.0
    for block, energy in zip(blocks, energies):
        if energy > 0:
            part = factorize(block, fixed_rank, threshold, cap, exact, generator, total_energy=energy)
            ups.append((row, part.up))
            downs.append(part.down)
            kept.append(part.singular_values[: part.rank])
            captured += part.energy * energy
        row += block.shape[0]
    rank = sum(down.shape[0] for down in downs)
    up = matrix.new_zeros(matrix.shape[0], rank)
    column = 0
    for start, part_up in ups:
        up[start : start + part_up.shape[0], column : column + part_up.shape[1]] = part_up
        column += part_up.shape[1]
    # Every block's kept singular values, largest first: the report's s_max / s_min are
    # then the largest and the smallest value the module keeps.
    singular = torch.cat(kept).float().cpu().sort(descending=True).values
    total = sum(energies) if total_energy is None else total_energy
    return Factorization(up, torch.cat(downs), rank, singular, total, 1.0 if total <= 0 else min(captured / total, 1.0))

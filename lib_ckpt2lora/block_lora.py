"""One LoRA module for weights that a format fuses (Z-Image's q|k|v), block by block.

A fused module must carry exactly what the split modules would: each part keeps its own
energy-rule rank (or ``--rank N`` each, or its share of a global budget), and the module is

    up   = blockdiag(up_q, up_k, up_v)      [rows_q + rows_k + rows_v, r_q + r_k + r_v]
    down = [down_q; down_k; down_v]         [r_q + r_k + r_v, in]

so up @ down is the split LoRA's product, row block by row block. One SVD of the stacked
matrix at one rank budget was measured worse: it spends the budget on the part that
changed most and loses the quieter part (figures in architectures/zimage.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .svd import Factorization, factorize, squared_norm


def factorize_parts(
    matrix: torch.Tensor,
    rows: list[int],
    fixed_rank: int = 0,
    threshold: float = 0.95,
    cap: int = 64,
    exact: bool = False,
    generator: torch.Generator | None = None,
    total_energy: float | None = None,
    exact_matrix: Callable[[], torch.Tensor] | None = None,
) -> list[Factorization | None]:
    """Each row block of ``matrix`` factored on its own; None for a block that did not change.

    ``rows``: the height of each block, in order (one block: a plain ``factorize``).
    ``exact_matrix``: the fp32 matrix on demand, where ``matrix`` came rounded to bf16 (see
    svd.factorize; only a single block is handed over so)."""
    if len(rows) == 1:
        return [factorize(matrix, fixed_rank, threshold, cap, exact, generator, total_energy, exact_matrix)]
    if exact_matrix is not None:
        matrix = exact_matrix()
    parts: list[Factorization | None] = []
    for block in matrix.split(rows, dim=0):
        energy = squared_norm(block)
        parts.append(factorize(block, fixed_rank, threshold, cap, exact, generator, total_energy=energy) if energy > 0 else None)
    return parts


def join_blocks(parts: list[Factorization | None], rows: list[int]) -> Factorization:
    """The parts as one block-diagonal factorization; a part that is None gets no columns."""
    present = [part for part in parts if part is not None]
    if len(rows) == 1 and present:
        return present[0]
    rank = sum(part.rank for part in present)
    reference = present[0].down if present else torch.zeros(0, 0)
    up = reference.new_zeros(sum(rows), rank)
    row = column = 0
    for part, height in zip(parts, rows):
        if part is not None:
            up[row : row + height, column : column + part.rank] = part.up.to(up.dtype)
            column += part.rank
        row += height
    down = torch.cat([part.down for part in present]) if present else reference.new_zeros(0, 0)
    # Every block's kept singular values, largest first: the report's s_max / s_min are
    # then the largest and the smallest value the module keeps.
    kept = [part.singular_values[: part.rank] for part in present]
    singular = torch.cat(kept).float().cpu().sort(descending=True).values if kept else torch.zeros(0)
    total = sum(part.total_energy for part in present)
    captured = sum(part.energy * part.total_energy for part in present)
    return Factorization(up, down, rank, singular, total, 1.0 if total <= 0 else min(captured / total, 1.0))


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
    """Factor each row block of ``matrix`` on its own and join them block-diagonally."""
    parts = factorize_parts(matrix, rows, fixed_rank, threshold, cap, exact, generator, total_energy)
    return join_blocks(parts, rows)

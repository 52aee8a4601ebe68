"""Rank selection: small pure functions over singular values.

Ranks here are counts (how many singular values to keep), never indices, which avoids
the off-by-one that index-returning variants invite.
"""

from __future__ import annotations

import torch

from .devices import to_float64  # MPS has no float64


def rank_for_energy(singular_values: torch.Tensor, total_energy: float, threshold: float, cap: int) -> int:
    """Smallest r with sum(s[:r]^2) / total_energy >= threshold, at most ``cap``.

    ``total_energy`` is the exact ||delta||_F^2, so ``singular_values`` may hold only
    the leading values: if they never reach the threshold, the answer is the cap (or
    every value given, when fewer than the cap are known).
    """
    if total_energy <= 0:
        return 0
    cumulative = torch.cumsum(to_float64(singular_values) ** 2, dim=0) / total_energy
    reached = torch.nonzero(cumulative >= threshold - 1e-12)
    if len(reached):
        return int(min(int(reached[0]) + 1, cap))
    return int(min(cap, len(singular_values)))


def captured_energy(singular_values: torch.Tensor, rank: int, total_energy: float) -> float:
    """Fraction of ||delta||_F^2 kept by the first ``rank`` singular values."""
    if total_energy <= 0:
        return 1.0
    kept = float((to_float64(singular_values[:rank]) ** 2).sum())
    return min(kept / total_energy, 1.0)


def target_rank(fixed_rank: int, cap: int, matrix_rank_bound: int) -> int:
    """The most singular values a layer may need: ``--rank N`` or the auto cap."""
    wanted = fixed_rank if fixed_rank > 0 else cap
    return max(1, min(wanted, matrix_rank_bound))

"""Truncated SVD of one delta matrix: randomized by default, exact for reference.

Only the leading singular values are needed: the total energy ||delta||_F^2 is exact and
cheap, so a randomized range finder (Halko, Martinsson & Tropp 2011) with oversampling
and power iterations finds the top-k subspace at a fraction of a full SVD's cost. If the
captured energy reaches the threshold at rank r, the randomized singular values are
lower bounds of the true ones, so r never falls below the exact answer; power
iterations make them accurate enough that it equals it except on near-ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rank import captured_energy, rank_for_energy, target_rank

OVERSAMPLE = 16
POWER_ITERATIONS = 2
# Past this fraction of the smaller side a full SVD is as cheap and exact.
EXACT_FRACTION = 0.25


@dataclass
class Factorization:
    """delta ~= up @ down, with the statistics the report needs."""

    up: torch.Tensor  # [out, r]
    down: torch.Tensor  # [r, in]
    rank: int
    singular_values: torch.Tensor  # the leading values found (CPU, fp32), at least r of them
    total_energy: float
    energy: float  # captured fraction

    @property
    def s_max(self) -> float:
        return float(self.singular_values[0]) if self.rank else 0.0

    @property
    def s_min(self) -> float:
        return float(self.singular_values[self.rank - 1]) if self.rank else 0.0


def factorize(
    delta: torch.Tensor,
    fixed_rank: int = 0,
    threshold: float = 0.95,
    cap: int = 64,
    exact: bool = False,
    generator: torch.Generator | None = None,
) -> Factorization:
    """Split a 2-D fp32 delta into balanced factors up @ down of the chosen rank."""
    rows, cols = delta.shape
    total_energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    wanted = target_rank(fixed_rank, cap, min(rows, cols))
    u, s, vh = top_singular_triplets(delta, wanted, exact, generator)
    rank = wanted if fixed_rank > 0 else rank_for_energy(s, total_energy, threshold, wanted)
    rank = max(1, min(rank, len(s)))
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    singular = s[: max(rank, min(len(s), wanted))].float().cpu()
    return Factorization(up, down, rank, singular, total_energy, captured_energy(s, rank, total_energy))


def dominant_subspaces(
    delta: torch.Tensor, threshold: float, cap: int, exact: bool = False, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases (U_r, V_r) of the left and right spaces holding ``threshold`` of the energy."""
    total_energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    wanted = target_rank(0, cap, min(delta.shape))
    u, s, vh = top_singular_triplets(delta, wanted, exact, generator)
    rank = max(1, min(rank_for_energy(s, total_energy, threshold, wanted), len(s)))
    return u[:, :rank], vh[:rank].T


def top_singular_triplets(
    delta: torch.Tensor, wanted: int, exact: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At least ``wanted`` leading singular triplets: randomized unless that costs as much as exact."""
    if exact or wanted + OVERSAMPLE >= EXACT_FRACTION * min(delta.shape):
        return torch.linalg.svd(delta, full_matrices=False)
    return randomized_svd(delta, wanted + OVERSAMPLE, POWER_ITERATIONS, generator)


def randomized_svd(
    matrix: torch.Tensor, k: int, power_iterations: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading k singular triplets of ``matrix`` by a randomized range finder."""
    rows, cols = matrix.shape
    transposed = rows < cols
    a = matrix.T if transposed else matrix  # tall: rows >= cols, sketch the column space
    sketch = torch.randn(a.shape[1], k, device=a.device, dtype=a.dtype, generator=generator)
    q, _ = torch.linalg.qr(a @ sketch)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    small = q.T @ a  # [k, cols]
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ u_small
    if transposed:
        return vh.T, s, u.T
    return u, s, vh

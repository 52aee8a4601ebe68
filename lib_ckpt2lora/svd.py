"""Truncated SVD of one delta matrix: randomized by default, exact for reference.

Only the leading singular values are needed: the total energy ||delta||_F^2 is exact and
cheap, so a randomized range finder (Halko, Martinsson & Tropp 2011) with oversampling
and power iterations finds the top-k subspace at a fraction of a full SVD's cost. If the
captured energy reaches the threshold at rank r, the randomized singular values are
lower bounds of the true ones, so r never falls below the exact answer; power
iterations make them accurate enough that it equals it except on near-ties.

How many power iterations: as many as the spectrum needs. A steep spectrum converges in
one or two; a flat one under dense noise (a bf16 fine-tune whose rank hits the cap) still
gained 1.3% of the optimum after two. So iterations continue until the energy of the
leading ``keep`` estimates, sum(s[:keep]^2), grows by less than CONVERGED of itself, at
most MAX_POWER_ITERATIONS. Measured (tests/measure_randomized_svd.py --full, 15 bf16
layers 1024-10240 wide x 3 thresholds): worst 0.9991 of the optimum (2 fixed: 0.9870;
4 fixed: 0.9971), with 2 iterations on steep spectra, 3-4 on noisy, 5-6 on flat; a
tolerance of 1e-4 gained 0.0006 for 5-8 iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .devices import on_supporting_device, to_float64
from .rank import captured_energy, rank_for_energy, target_rank

OVERSAMPLE = 16
# Power iterations: at least MIN, then until the kept energy moves by < CONVERGED (relative).
MIN_POWER_ITERATIONS = 2
MAX_POWER_ITERATIONS = 8
CONVERGED = 1e-3
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

    def truncated(self, rank: int) -> Factorization:
        """The first ``rank`` triplets: still the best rank-``rank`` approximation the
        factors give, because up and down come from one SVD (a projection of the delta)."""
        rank = max(0, min(rank, self.up.shape[1]))
        return Factorization(
            self.up[:, :rank],
            self.down[:rank],
            rank,
            self.singular_values,
            self.total_energy,
            captured_energy(self.singular_values, rank, self.total_energy),
        )

    @property
    def s_max(self) -> float:
        return float(self.singular_values[0]) if self.rank else 0.0

    @property
    def s_min(self) -> float:
        return float(self.singular_values[self.rank - 1]) if self.rank else 0.0


# Elements per partial sum of squares: small enough for fp32 partial sums to stay exact to
# ~1e-5, large enough that the Python loop costs nothing.
ENERGY_CHUNK = 1 << 18


def squared_norm(tensor: torch.Tensor) -> float:
    """||tensor||_F^2, accurately and fast: fp32 dot products of chunks, summed in float64.

    torch's fp32 norm of a 40M-element delta was off by 0.7% here (its reduction keeps
    few partial sums), enough to move the rank rule; a float64 norm is 20x slower.
    NaN and Inf propagate into the result."""
    flat = tensor.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    partial = torch.stack([torch.dot(chunk, chunk) for chunk in flat.split(ENERGY_CHUNK)])
    return float(to_float64(partial).sum())


def factorize(
    delta: torch.Tensor,
    fixed_rank: int = 0,
    threshold: float = 0.95,
    cap: int = 64,
    exact: bool = False,
    generator: torch.Generator | None = None,
    total_energy: float | None = None,
) -> Factorization:
    """Split a 2-D fp32 delta into balanced factors up @ down of the chosen rank.

    ``total_energy``: ||delta||_F^2 when the caller has it (computed in float64: an fp32
    sum over tens of millions of elements can be off by most of a percent)."""
    rows, cols = delta.shape
    if total_energy is None:
        total_energy = squared_norm(delta)
    wanted = target_rank(fixed_rank, cap, min(rows, cols))
    u, s, vh = top_singular_triplets(delta, wanted, exact, generator)
    rank = wanted if fixed_rank > 0 else rank_for_energy(s, total_energy, threshold, wanted)
    rank = max(1, min(rank, len(s)))
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    singular = s[: max(rank, min(len(s), wanted))].float().cpu()
    return Factorization(up, down, rank, singular, total_energy, captured_energy(s, rank, total_energy))


def top_singular_triplets(
    delta: torch.Tensor, wanted: int, exact: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At least ``wanted`` leading singular triplets: randomized unless that costs as much as exact."""
    if exact or wanted + OVERSAMPLE >= EXACT_FRACTION * min(delta.shape):
        return on_supporting_device(torch.linalg.svd, delta, full_matrices=False)
    return randomized_svd(delta, wanted + OVERSAMPLE, keep=wanted, generator=generator)


def randomized_svd(
    matrix: torch.Tensor,
    k: int,
    keep: int | None = None,
    generator: torch.Generator | None = None,
    min_iterations: int = MIN_POWER_ITERATIONS,
    max_iterations: int = MAX_POWER_ITERATIONS,
    tolerance: float = CONVERGED,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading k singular triplets of ``matrix`` by a randomized range finder with power
    iterations until the energy of the leading ``keep`` (default k) values converges."""
    keep = k if keep is None else keep
    rows, cols = matrix.shape
    transposed = rows < cols
    a = matrix.T if transposed else matrix  # tall: rows >= cols, sketch the column space
    sketch = torch.randn(a.shape[1], k, device=a.device, dtype=a.dtype, generator=generator)
    q, _ = on_supporting_device(torch.linalg.qr, a @ sketch)
    u_small, s, vh = on_supporting_device(torch.linalg.svd, q.T @ a, full_matrices=False)
    kept = float(s[:keep].square().sum())
    for iteration in range(1, max_iterations + 1):
        # One power iteration: vh's rows are an orthonormal basis of A^T q (the QR that
        # step would need), and the SVD that gives them also measures convergence.
        q, _ = on_supporting_device(torch.linalg.qr, a @ vh.T)
        u_small, s, vh = on_supporting_device(torch.linalg.svd, q.T @ a, full_matrices=False)
        previous, kept = kept, float(s[:keep].square().sum())
        if iteration >= min_iterations and kept - previous <= tolerance * kept:
            break
    u = q @ u_small
    if transposed:
        return vh.T, s, u.T
    return u, s, vh

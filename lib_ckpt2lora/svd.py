"""Truncated SVD of one delta matrix: randomized by default, exact for reference.

Only the leading singular values are needed: the total energy ||delta||_F^2 is exact and
cheap, so a randomized range finder (Halko, Martinsson & Tropp 2011) with oversampling
and power iterations finds the top-k subspace at a fraction of a full SVD's cost. If the
captured energy reaches the threshold at rank r, the randomized singular values are
lower bounds of the true ones, so r never falls below the exact answer; power
iterations make them accurate enough that it equals it except on near-ties.

The space searched is a block Krylov space (Musco & Musco 2015): every power iterate is
kept, not only the last, at no extra pass over the delta (see ``randomized_svd``). It grows
by one block (``wanted`` + 16 columns) per iteration until the energy of the leading
``keep`` Ritz values, sum(s[:keep]^2), grows by less than CONVERGED of itself, at least
MIN and at most MAX_POWER_ITERATIONS. Measured on bf16 layers 1024-10240 wide, flat,
noisy and steep spectra, thresholds 0.5/0.8/0.95 (tests/measure_randomized_svd.py, and
benchmarks/README.md): worst 0.9995 of the optimum with 2-3 iterations (tolerance 1e-3:
0.9998 with 3-4, 40% more time), where plain subspace iteration needed 2-6 iterations
of the same cost for 0.9991 (two fixed: 0.9870).

On a CPU that multiplies bf16 natively (AVX512-BF16, AMX: twice the fp32 speed here) the
Krylov products use a bf16 copy of the delta (fp32 results): they only choose the
subspace. The fp32 delta is then projected on it (one more product, k columns wide), so
the values, the energies and the factors are those of the fp32 delta and the values
are again lower bounds of the true ones. Elsewhere (CUDA: TF32 already; MPS; CPUs
without fast bf16) every product is fp32.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from .devices import on_supporting_device, to_float64
from .rank import captured_energy, rank_for_energy, target_rank

OVERSAMPLE = 16
# Krylov iterations: at least MIN, then until the kept energy moves by < CONVERGED (relative).
MIN_POWER_ITERATIONS = 1
MAX_POWER_ITERATIONS = 8
CONVERGED = 3e-3
# Krylov products with a bf16 copy of the delta on CPUs where that is faster (see above).
# Off: its subspace carries bf16's ~1e-3 relative error, so a fixed-rank LoRA of an exactly
# low-rank delta (a LoRA given as the variant, a merge) is no longer exact to 1e-3 (the
# loader and spelling tests caught it); on, it saves ~40% of the products' time.
BF16_ON_CPU = False
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
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At least k leading singular triplets of ``matrix`` (Ritz values: lower bounds of the
    true ones) from a block Krylov space, grown until the energy of the leading ``keep``
    (default k) values converges.

    The space is span[Q_0, Q_1, ...], Q_0 = orth(A S) for a Gaussian S of ``block``
    columns (default k) and Q_{i+1} = orth(A A^T Q_i) orthogonalised against every earlier
    block. Subspace iteration keeps only the last Q_i; keeping all of them (Musco & Musco
    2015) costs no extra pass over A, because Z_i = A^T Q_i, computed to go one step
    further, is also the i-th block of Q^T A: the Rayleigh-Ritz step needs no pass of its
    own. Each iteration: one A @ Z and one A^T @ Q, ``block`` columns wide."""
    keep = k if keep is None else keep
    block = k if block is None else block
    rows, cols = matrix.shape
    transposed = rows < cols
    exact_a = matrix.T if transposed else matrix  # tall: rows >= cols, the basis spans the column space
    if matrix.dtype == torch.float32 and matrix.device.type == "cpu" and BF16_ON_CPU and bf16_is_faster_on_cpu():
        matrix = matrix.bfloat16()
    a = matrix.T if transposed else matrix
    sketch = torch.randn(a.shape[1], block, device=a.device, generator=generator)
    bases = [_orthonormal(_product(a, sketch))]
    projections = [_product(a.T, bases[0])]  # Z_i = A^T Q_i = (Q_i^T A)^T
    kept = _kept_energy(projections, keep)
    for iteration in range(1, max_iterations + 1):
        if (len(bases) + 1) * block > a.shape[1]:
            break  # the space would exceed the delta's rank bound (its smaller side)
        basis = _next_block(_product(a, projections[-1]), bases)
        bases.append(basis)
        projections.append(_product(a.T, basis))
        previous, kept = kept, _kept_energy(projections, keep)
        if iteration >= min_iterations and len(bases) * block >= k and kept - previous <= tolerance * kept:
            break
    basis, projection = torch.cat(bases, dim=1), torch.cat(projections, dim=1)
    if a.dtype == exact_a.dtype:
        u, s, vh = _ritz_triplets(basis, projection)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        # The bf16 products chose the subspace: its k leading Ritz vectors (from the Gram
        # matrix, which only has to rank them) span where the fp32 delta is projected
        # (one more product, k columns wide). Values and factors are the fp32 delta's:
        # lower bounds of the true values again, energies exact for the factors.
        u = basis @ _leading_eigenvectors(projection, k).to(basis.dtype)
        u_small, s, vh = on_supporting_device(torch.linalg.svd, u.T @ exact_a, full_matrices=False)
        u = u @ u_small
    if transposed:
        return vh.T, s, u.T
    return u, s, vh


def _product(matrix: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """matrix @ columns in the matrix's dtype (a bf16 copy of the delta halves the cost
    where the CPU multiplies bf16 natively), the result in fp32."""
    return (matrix @ columns.to(matrix.dtype)).float()


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    return on_supporting_device(torch.linalg.qr, columns)[0]


def _next_block(columns: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
    """An orthonormal basis of ``columns`` with every earlier block projected out: project,
    normalise, twice. Normalising before the second projection matters when the space
    is nearly exhausted (an exactly low-rank delta): the first projection leaves only
    round-off, whose own components along the earlier blocks are then removed too."""
    basis = torch.cat(bases, dim=1) if len(bases) > 1 else bases[0]
    for _ in range(2):
        columns = _orthonormal(columns - basis @ (basis.T @ columns))
    return columns


def _kept_energy(projections: list[torch.Tensor], keep: int) -> float:
    """sum of the leading ``keep`` squared Ritz values: eigenvalues of Z^T Z (float64;
    only the energy, which the convergence test needs, not the vectors)."""
    z = torch.cat(projections, dim=1) if len(projections) > 1 else projections[0]
    gram = to_float64((z.T @ z).cpu())
    values = torch.linalg.eigvalsh(gram)
    return float(values.flip(0)[:keep].clamp(min=0).sum())


def _leading_eigenvectors(projection: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading eigenvectors of projection^T projection (float64, on the CPU),
    i.e. B's leading left singular vectors for B = projection^T."""
    gram = to_float64((projection.T @ projection).cpu())
    _, vectors = torch.linalg.eigh(gram)
    return vectors.flip(1)[:, :count].to(projection.device)


def _ritz_triplets(basis: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B = basis^T A = projection^T, via a QR of the tall projection [n, d]:
    projection = P R, so B = R^T P^T and B's SVD is R^T's (d x d) with P applied."""
    p, r = on_supporting_device(torch.linalg.qr, projection)
    u_small, s, w_t = on_supporting_device(torch.linalg.svd, r.T, full_matrices=False)
    return basis @ u_small, s, (p @ w_t.T).T


@functools.cache
def bf16_is_faster_on_cpu() -> bool:
    """Whether this CPU multiplies bf16 matrices clearly faster than fp32 (once per process,
    a few milliseconds): true with AVX512-BF16 or AMX, false where bf16 is emulated."""
    try:
        a32, x32 = torch.randn(2048, 1024), torch.randn(1024, 64)
        a16, x16 = a32.bfloat16(), x32.bfloat16()
        return _best_seconds(lambda: a16 @ x16) < 0.7 * _best_seconds(lambda: a32 @ x32)
    except (RuntimeError, TypeError):  # no bf16 matmul in this build
        return False


def _best_seconds(run, repeats: int = 5) -> float:
    run()  # warm-up: first-call dispatch and allocation
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best

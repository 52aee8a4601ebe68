"""Truncated SVD of one delta matrix: randomized by default, exact for reference.

Only the leading singular values are needed: the total energy ||delta||_F^2 is exact and
cheap, so a randomized range finder (Halko, Martinsson & Tropp 2011) with oversampling
and power iterations finds the top-k subspace at a fraction of a full SVD's cost. If the
captured energy reaches the threshold at rank r, the randomized singular values are
lower bounds of the true ones, so r never falls below the exact answer; power
iterations make them accurate enough that it equals it except on near-ties.

The space searched is a block Krylov space (Musco & Musco 2015): every power iterate is
kept, not only the last, at no extra pass over the delta (see ``randomized_svd``). It grows
by one block (BLOCK_FRACTION of ``wanted`` + 16 columns, in whole PRODUCT_COLUMNS: 32 for
the default cap 64) per iteration until the energy of the leading Ritz values has
converged (``_converged``: its last two growths, where they shrink, extrapolate to less
than half of CONVERGED of itself still to gain; else it grew by less than CONVERGED of
itself), at least MIN and at most
MAX_POWER_ITERATIONS. Under the energy rule only the values the rule keeps must converge
(RANK_AWARE), not all of ``wanted``, and the blocks after the first narrow to what those
values need (NARROW_BLOCKS). Narrow blocks grow the Krylov degree faster per column than
wide ones: 32 columns took 17% (SD1.5) and 9% (Z-Image) less CPU than the 48 used before,
at the same worst layer. Measured on the Z-Image and SD1.5 pairs of
benchmarks/make_pairs.py, layer by layer against the exact spectrum
(benchmarks/bench_svd_layers.py, benchmarks/README.md): every layer >= 0.9992 of the
optimum.

On a CPU that multiplies bf16 natively (AVX512-BF16, AMX: 2-3x the fp32 speed here) the
Krylov products use a bf16 copy of the delta, their results rounded to bf16, and the
Rayleigh-Ritz step takes its values and factors from those products (``_ritz_triplets``)
instead of one more fp32 pass over the delta, which cost as much as three bf16 products.
The factors then capture what an fp32 projection's would, to ~1e-5 of the energy; the
values (and the reported energy) carry the rounding, ~1e-4 either way, so they are no
longer strict lower bounds and the rank may differ from the exact rule's on a near-tie.
An exactly low-rank delta (a LoRA given as the variant, a merge) must come out exact:
it is recognised (``_exactly_low_rank``) and one fp32 half power step (two fp32 passes)
makes it so. Elsewhere (CUDA: TF32 already; MPS; CPUs without fast bf16) every product
is fp32 and the values are lower bounds. Tall blocks are orthonormalised by Cholesky QR
on the CPU (``_thin_qr``), Householder's QR where they are ill-conditioned.

Small layers, where the randomized route would cost as much as an exact SVD, take the
exact route: on the CPU the eigenvectors of the short side's fp32 Gram matrix (as exact
where it matters, 1.4-10x cheaper than a full SVD), elsewhere a full SVD.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import devices
from .devices import on_supporting_device, to_float64
from .rank import captured_energy, rank_for_energy, target_rank

OVERSAMPLE = 16
# Krylov iterations: at least MIN, then until the kept energy has converged to CONVERGED
# (relative; see _converged).
MIN_POWER_ITERATIONS = 1
# (12 blocks of 32 columns after the first: a space as large as the 8 of 48 before, which
# a flat, noise-like spectrum needs: an fp8 base's rounding, tests/test_comfy_quant.py)
MAX_POWER_ITERATIONS = 12
CONVERGED = 1e-3
# Where the growths shrink: when they extrapolate to less than this share of the tolerance
# still to gain (_converged; 5e-4 at the default tolerance).
EXTRAPOLATED = 0.5
# The first Krylov block's width as a fraction of k (wanted + OVERSAMPLE), rounded up to
# whole PRODUCT_COLUMNS. 16 columns (0.2) stopped too early on some layers (0.9987 of the
# optimum on Z-Image's cap_embedder); 48 (0.6) and wider cost more everywhere.
BLOCK_FRACTION = 0.4
# Krylov products with a bf16 copy of the delta on CPUs where that is faster (see above;
# exactly low-rank deltas stay exact through the fp32 step of ``_refined``).
BF16_ON_CPU = True
# Under the energy rule, stop when the values the rule keeps have converged (not all of
# ``wanted``): a layer whose rank stops well below the cap needs a much smaller space.
RANK_AWARE = True
# Past this fraction of the smaller side a full SVD is as cheap and exact. (At 0.25, SD1.5's
# [320, *] layers took the exact route at the default cap; the randomized one, whose
# blocks narrow to the rank the rule needs, took 0.47 against 0.66 CPU s for those 65
# layers, at the same accuracy: benchmarks/bench_svd_layers.py.)
EXACT_FRACTION = 0.3
# Under the energy rule, the blocks after the first are only as wide as the rank the first
# block's Ritz values call for plus NARROW_OVERSAMPLE, in whole PRODUCT_COLUMNS (``_narrowed``):
# 16 columns for a layer that keeps <= 8 values (most of SD1.5's), 5% less CPU there.
NARROW_BLOCKS = True
NARROW_OVERSAMPLE = 8
# The CPU's bf16 products cost about the same for any width up to the next multiple of
# this (one thread, [1280, 11520]: 16 columns 8.0 ms, 20-32 columns 10.8-12.0 ms, 48 16.7
# ms for both products), so block widths are rounded up to it: the extra columns are free.
PRODUCT_COLUMNS = 16


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
    return summed_squares(partial_squares(flat))


def partial_squares(flat: torch.Tensor) -> list[torch.Tensor]:
    """The fp32 dot products of ``flat``'s ENERGY_CHUNK pieces that squared_norm adds; a
    caller summing a tensor in ranges that start at whole ENERGY_CHUNKs gets the same ones
    (the reader's ||W||^2 and ||delta||^2, sources.read_deltas)."""
    return [torch.dot(chunk, chunk) for chunk in flat.split(ENERGY_CHUNK)]


def summed_squares(partials: list[torch.Tensor]) -> float:
    """partial_squares' results summed in float64 (0 for none)."""
    return float(to_float64(torch.stack(partials)).sum()) if partials else 0.0


def factorize(
    delta: torch.Tensor,
    fixed_rank: int = 0,
    threshold: float = 0.95,
    cap: int = 64,
    exact: bool = False,
    generator: torch.Generator | None = None,
    total_energy: float | None = None,
    exact_delta: Callable[[], torch.Tensor] | None = None,
) -> Factorization:
    """Split a 2-D fp32 delta into balanced factors up @ down of the chosen rank.

    ``total_energy``: ||delta||_F^2 when the caller has it (computed in float64: an fp32
    sum over tens of millions of elements can be off by most of a percent).

    ``delta`` may come rounded to bf16 already (the reader's, where ``takes_rounded_products``
    says the bf16 products will take it), with its exact ||delta||^2 and ``exact_delta``
    giving the fp32 delta on demand: an exactly low-rank delta is refined from that."""
    rows, cols = delta.shape
    if delta.dtype == torch.bfloat16 and not takes_rounded_products(rows, cols, fixed_rank, cap, exact):
        delta = exact_delta()  # not a route that takes it rounded (BF16_ON_CPU changed meanwhile)
    if total_energy is None:
        total_energy = squared_norm(exact_delta() if delta.dtype == torch.bfloat16 else delta)
    wanted = target_rank(fixed_rank, cap, min(rows, cols))
    if not exact and _gram_is_cheaper(delta, wanted):
        u, s, vh = leading_triplets_from_gram(delta, wanted)
    else:
        rule = threshold if fixed_rank <= 0 and RANK_AWARE else None
        u, s, vh = top_singular_triplets(
            delta, wanted, exact, generator, total_energy, triplets=wanted, threshold=rule, exact_delta=exact_delta
        )
    rank = wanted if fixed_rank > 0 else rank_for_energy(s, total_energy, threshold, wanted)
    rank = max(1, min(rank, len(s)))
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    singular = s[: max(rank, min(len(s), wanted))].float().cpu()
    return Factorization(up, down, rank, singular, total_energy, captured_energy(s, rank, total_energy))


def top_singular_triplets(
    delta: torch.Tensor,
    wanted: int,
    exact: bool,
    generator: torch.Generator | None,
    total_energy: float | None = None,
    triplets: int | None = None,
    threshold: float | None = None,
    exact_delta: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At least ``wanted`` leading singular triplets: randomized unless that costs as much as exact.

    ``triplets``: on the randomized route, return this many (default ``wanted`` + OVERSAMPLE,
    whose values some callers read as the spectrum's head). ``threshold``: the energy rule
    that will choose the rank; the randomized route then stops once the values that rule
    keeps have converged (see ``randomized_svd``). ``exact_delta``: see ``factorize``."""
    if not _randomized_is_cheaper(delta.shape, wanted, exact):
        return on_supporting_device(torch.linalg.svd, delta, full_matrices=False)
    return randomized_svd(
        delta,
        wanted + OVERSAMPLE,
        keep=wanted,
        generator=generator,
        total_energy=total_energy,
        triplets=triplets,
        threshold=threshold,
        exact_matrix=exact_delta,
    )


def _randomized_is_cheaper(shape: tuple[int, int], wanted: int, exact: bool) -> bool:
    return not exact and wanted + OVERSAMPLE < EXACT_FRACTION * min(shape)


def takes_rounded_products(rows: int, cols: int, fixed_rank: int, cap: int, exact: bool) -> bool:
    """Whether ``factorize`` on a CPU fp32 delta of [rows, cols] multiplies a bf16 copy of it
    (the randomized route, on a CPU that multiplies bf16 faster): the reader may then hand
    it over in bf16 (sources.read_deltas(rounded=True))."""
    wanted = target_rank(fixed_rank, cap, min(rows, cols))
    return _randomized_is_cheaper((rows, cols), wanted, exact) and BF16_ON_CPU and bf16_is_faster_on_cpu()


def _gram_is_cheaper(delta: torch.Tensor, wanted: int) -> bool:
    """A layer that takes the exact route (the randomized one would cost as much), on the
    CPU: the leading eigenvectors of its short side's fp32 Gram matrix, then the delta
    projected on them, cost less than a full SVD (one thread, measured: [320, 320] 9.7 vs
    13.8 ms, [320, 2880] 19 vs 96 ms, [256, 15360] 54 vs 625 ms; a float64 Gram matrix took
    2.4-3x the fp32 one's time for the same results to the tests' 1e-6)."""
    return delta.device.type == "cpu" and not _randomized_is_cheaper(delta.shape, wanted, False)


def leading_triplets_from_gram(delta: torch.Tensor, wanted: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``wanted`` leading singular triplets from the eigenvectors of the short side's
    Gram matrix A A^T (fp32): the leading ``wanted`` of them, L, then the SVD of L^T A
    through a QR of its tall transpose. The values are those of the delta projected on L
    (lower bounds), equal to a full SVD's to fp32 precision where they matter: a squared
    condition number only blurs eigenvectors whose values are below ~1e-4 of the largest,
    whose energy is below the rounding. An exactly low-rank delta is reproduced exactly."""
    transposed = delta.shape[0] > delta.shape[1]
    a = delta.T if transposed else delta  # [short, long]
    _, vectors = torch.linalg.eigh(a @ a.T)
    left = vectors.flip(1)[:, :wanted]
    u, s, vh = _projected_svd(left, a.T @ left)
    if transposed:
        return vh.T, s, u.T
    return u, s, vh


def randomized_svd(
    matrix: torch.Tensor,
    k: int,
    keep: int | None = None,
    generator: torch.Generator | None = None,
    min_iterations: int | None = None,
    max_iterations: int | None = None,
    tolerance: float | None = None,
    block: int | None = None,
    total_energy: float | None = None,
    triplets: int | None = None,
    threshold: float | None = None,
    exact_matrix: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At least k leading singular triplets of ``matrix`` (Ritz values: lower bounds of the
    true ones) from a block Krylov space, grown until the energy of the leading ``keep``
    (default k) values converges. A bf16 ``matrix`` on the CPU is the fp32 one already
    rounded for the bf16 products (``exact_matrix`` gives that fp32 one, ``total_energy``
    its ||matrix||^2).

    With A the matrix oriented [short side, long side], the space is span[Q_0, Q_1, ...],
    Q_0 = orth(A S) for a Gaussian S of ``block`` columns (default ``_first_block(k)``) and Q_{i+1} =
    orth(A A^T Q_i) orthogonalised against every earlier block. Subspace iteration keeps
    only the last Q_i; keeping all of them (Musco & Musco 2015) costs no extra pass over A,
    because Z_i = A^T Q_i, computed to go one step further, is also the i-th block of
    Q^T A: the Rayleigh-Ritz step needs no pass of its own. Each iteration: one A @ Z and
    one A^T @ Q, ``block`` columns wide. The basis lives on the short side, so the QRs are
    of short blocks; the long side only meets matrix products (the Gram matrix Z^T Z).

    Iteration limits and tolerance default to the module's constants (read at call time).
    ``total_energy``: ||matrix||_F^2 when the caller has it (the energy rule and the bf16
    path's refinement test need it). ``triplets``: return only this many leading triplets
    (default k; at least ``keep``). ``threshold``: the energy rule that will choose the
    rank, whose kept values are then the ones that must converge."""
    keep = k if keep is None else keep
    min_iterations = MIN_POWER_ITERATIONS if min_iterations is None else min_iterations
    max_iterations = MAX_POWER_ITERATIONS if max_iterations is None else max_iterations
    tolerance = CONVERGED if tolerance is None else tolerance
    transposed = matrix.shape[0] > matrix.shape[1]
    exact_a = matrix.T if transposed else matrix  # [short, long]
    short, long = exact_a.shape
    block = min(_first_block(k) if block is None else block, short)
    given_rounded = exact_a.dtype == torch.bfloat16 and exact_a.device.type == "cpu"
    reduced = given_rounded or (
        exact_a.dtype == torch.float32 and exact_a.device.type == "cpu" and BF16_ON_CPU and bf16_is_faster_on_cpu()
    )
    a = exact_a if given_rounded else _bf16_copy(exact_a) if reduced else exact_a

    def fp32_a() -> torch.Tensor:  # the fp32 [short, long] matrix, read again if it came rounded
        if not given_rounded:
            return exact_a
        full = exact_matrix()
        return full.T if transposed else full

    capacity = min((max_iterations + 1) * block, short)
    # Q^T and Z^T, one block of rows each, preallocated (no concatenation; a block's rows
    # are contiguous, so only the blocks used are ever touched).
    basis_t = _scratch_rows("basis", capacity, short, exact_a.device)
    projection_t = _scratch_rows("projection", capacity, long, exact_a.device)
    # Z^T Z, grown block by block, on the CPU: float64, or float32 after bf16 products (it
    # only ranks the Ritz vectors then; its solves cost half as much)
    gram = torch.zeros(capacity, capacity, dtype=torch.float32 if reduced else torch.float64)
    sketch_t = _sketch(block, long, a.device, generator)
    used = _add_block(a, _orthonormal(_product(a, sketch_t)), basis_t, projection_t, gram, 0)
    if total_energy is None and (threshold is not None or reduced):  # the rule, the refinement test
        total_energy = squared_norm(fp32_a())
    history = [_ritz_energies(gram[:used, :used])]  # the squared Ritz values after each block
    last_t = projection_t[:used]  # Z_i^T of the block the next one grows from
    if threshold is not None and NARROW_BLOCKS:
        last_t, block = _narrowed(last_t, gram[:used, :used], history[0], total_energy, threshold, keep, block)
    for iteration in range(1, max_iterations + 1):
        if used + block > short:
            break  # the space would exceed the delta's rank bound (its smaller side)
        columns = _product(a, last_t)
        used = _add_block(a, _next_block(columns, basis_t[:used]), basis_t, projection_t, gram, used)
        last_t = projection_t[used - block : used]
        history.append(_ritz_energies(gram[:used, :used]))
        # The energy rule's rank on the Ritz values so far (lower bounds: never below the
        # exact rule's): only the leading values it keeps need to converge.
        needed = keep if threshold is None else rank_for_energy(history[-1].sqrt(), total_energy, threshold, keep)
        if iteration >= min_iterations and used >= min(k, needed + OVERSAMPLE) and _converged(history, needed, tolerance):
            break
    count = k if triplets is None else max(keep, triplets)
    u, s, vh = _ritz_triplets(basis_t[:used], projection_t[:used], gram[:used, :used], count, reduced)
    if reduced and _exactly_low_rank(s, total_energy):
        u, s, vh = _refined(fp32_a(), vh)
    if transposed:
        return vh.T, s, u.T
    return u, s, vh


def _first_block(k: int) -> int:
    """The sketch's width: BLOCK_FRACTION of k, rounded up to whole PRODUCT_COLUMNS."""
    return _whole_product_columns(BLOCK_FRACTION * k)


def _whole_product_columns(width: float) -> int:
    return max(1, math.ceil(width / PRODUCT_COLUMNS)) * PRODUCT_COLUMNS


def _narrowed(first_t, gram, energies, total_energy, threshold, keep, block):
    """The first block's Z^T and width, or, where the energy rule needs far fewer values
    than the block holds, the Z^T of its leading Ritz vectors (Z W for the gram's leading
    eigenvectors W: A^T of the best directions found) and that narrower width. The rank
    the first block's Ritz values call for is never below the exact rule's (they are lower
    bounds), and the first block stays in the space: the later blocks, and every pass over
    the delta they cost, shrink to that rank plus NARROW_OVERSAMPLE. Most of SD1.5's layers
    keep 3-20 values of the 64 allowed."""
    needed = rank_for_energy(energies.sqrt(), total_energy, threshold, keep)
    width = _whole_product_columns(needed + NARROW_OVERSAMPLE)
    if width >= block:
        return first_t, block
    _, vectors = torch.linalg.eigh(gram.float())
    leading = vectors.flip(1)[:, :width].to(first_t.device)
    return leading.T @ first_t, width


def _add_block(a, new, basis_t, projection_t, gram, used) -> int:
    """Store Q_i (orthonormal, [short, b]) and Z_i^T = Q_i^T A, and extend Z^T Z by Z_i's
    row and column (fp32 products). Returns the columns now used."""
    end = used + new.shape[1]
    basis_t[used:end] = new.T
    _transposed_product(a, new, out=projection_t[used:end])
    cross = (projection_t[:end] @ projection_t[used:end].T).cpu()  # cast to the Gram's dtype on assignment
    gram[:end, used:end] = cross
    gram[used:end, :end] = cross.T
    return end


# Products in the matrix's dtype (a bf16 copy of the delta halves the cost where the CPU
# multiplies bf16 natively), results in fp32. Each is written with the delta in the
# operand position its memory layout suits (A row-major on the left, A^T row-major on the
# right): the other form of the same product measured 10-25% slower.


def _product(a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A X for A = ``a`` [short, long] and X^T = ``rows`` [b, long]: [short, b]."""
    if a.is_contiguous():
        return (a @ rows.T.to(a.dtype)).float()
    return (rows.to(a.dtype) @ a.T).T.float()


def _transposed_product(a: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> None:
    """(A^T Q)^T = Q^T A for Q = ``columns`` [short, b], into ``out`` [b, long]."""
    if a.is_contiguous():
        out.copy_(columns.T.to(a.dtype) @ a)
    else:
        out.copy_((a.T @ columns.to(a.dtype)).T)


def _orthonormal(columns: torch.Tensor, passes: int = 2) -> torch.Tensor:
    return _thin_qr(columns, passes)[0]


def _next_block(columns: torch.Tensor, basis_t: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``columns`` with the earlier blocks (rows of ``basis_t``)
    projected out: project, normalise, twice. Normalising before the second projection
    matters when the space is nearly exhausted (an exactly low-rank delta): the first
    projection leaves only round-off, whose own components along the earlier blocks are
    then removed too. One Cholesky QR pass each: the second one's input is orthonormal to
    its first pass's rounding, which it removes."""
    for _ in range(2):
        columns = _orthonormal(columns - basis_t.T @ (basis_t @ columns), passes=1)
    return columns


# Cholesky QR's factor must be this well conditioned (smallest over largest diagonal entry,
# a lower bound of 1 / cond): a pass leaves cond^2 * eps of orthogonality (~0.06 at 1e3 in
# fp32), which a second pass removes; worse blocks take Householder's QR.
CHOLESKY_QR_CONDITION = 1e-3


def _thin_qr(columns: torch.Tensor, passes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, R of a tall block: Cholesky QR (Q = X R^-1 with R from the Cholesky factor of
    X^T X: a Gram product and a product with a small inverse per pass, 5-10x less CPU than
    Householder's QR on the [1280-10240, 48-64] blocks here), twice by default
    (CholeskyQR2), or Householder's QR where the block is too ill-conditioned for it (an
    exhausted Krylov space, an exactly low-rank delta). Off the CPU, Householder's: on CUDA
    the products run in TF32, whose ~1e-3 would stay in the Gram matrices, and the GPU's QR
    is fast anyway."""
    if columns.device.type != "cpu" or "cpu" in devices.NO_DECOMPOSITIONS:
        return on_supporting_device(torch.linalg.qr, columns)
    q, r = columns, None
    for _ in range(passes):
        factor, info = torch.linalg.cholesky_ex(to_float64(q.T @ q))  # X^T X = L L^T, R = L^T
        diagonal = factor.diagonal()
        if int(info) != 0 or not bool(diagonal.min() > CHOLESKY_QR_CONDITION * diagonal.max()):
            return torch.linalg.qr(columns)
        inverse = _inverse_of_transpose(factor)  # R^-1
        q = q @ inverse.to(q.dtype)
        r = factor.T if r is None else factor.T @ r
    return q, r.to(columns.dtype)


def _inverse_of_transpose(lower: torch.Tensor) -> torch.Tensor:
    """(L^T)^-1 for a lower-triangular Cholesky factor L (small, on the CPU)."""
    return torch.linalg.solve_triangular(lower, _identity(len(lower), lower.dtype), upper=False).T


@functools.lru_cache(maxsize=64)
def _identity(size: int, dtype: torch.dtype) -> torch.Tensor:
    """A shared identity matrix (read only): ~7 small solves a layer each made their own."""
    return torch.eye(size, dtype=dtype)


def _converged(history: list[torch.Tensor], needed: int, tolerance: float) -> bool:
    """Whether the energy of the leading ``needed`` Ritz values has converged.

    Where the last two growths (both with at least ``needed`` values) shrink, the geometric
    series they start, g^2 / (g_before - g), estimates what is still to gain, and that
    estimate decides: at most EXTRAPOLATED * ``tolerance`` of the kept energy. Otherwise
    (the first test, or growth that does not shrink) the last growth must be at most
    ``tolerance`` of it. The growth per block was ~1e-3 just where the optimum was reached
    (>= 0.9996) on Z-Image's layers, so the plain test alone stopped there or one block
    later by chance, and the estimate stops there every time. The plain test must not
    overrule the estimate: on Anima's [2048, 2048] layers at the rank cap (values within
    0.3% of each other around the 64th) the growths went 2.2e-2, 1.9e-3, 9.1e-4; the
    plain test stopped at 0.99896 of the optimum, the estimate said ~8e-4 was left and
    went on (worst layer 0.99931, 3.5% more blocks there; Z-Image 2% more, SD1.5 none:
    benchmarks/bench_svd_layers.py)."""
    kept = [float(values[:needed].sum()) for values in history[-3:]]
    growth = kept[-1] - kept[-2]
    if len(kept) == 3 and len(history[-3]) >= needed:
        before = kept[-2] - kept[-3]
        if 0 < growth < before:
            return growth * growth / (before - growth) <= EXTRAPOLATED * tolerance * kept[-1]
    return growth <= tolerance * kept[-1]


def _ritz_energies(gram: torch.Tensor) -> torch.Tensor:
    """The squared Ritz values, largest first: eigenvalues of Z^T Z (only the energies,
    which the convergence test needs, not the vectors). Called once per Krylov block."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)


def _ritz_triplets(basis_t, projection_t, gram, k, rounded):
    """The k leading Ritz triplets of A ([short, long]) in the space spanned by Q.

    The Gram matrix ranks the Ritz vectors: its k leading eigenvectors W give L = Q W and
    Y = A^T L = Z W (no pass over A). With Y = P R, L^T A = R^T P^T, whose SVD is R^T's
    (k x k) with P applied: the values and factors are those of the delta projected on L,
    so the values are lower bounds of the true ones and the factors' energy is exact.

    After bf16 products (``rounded``), Z = A^T B for B the basis rounded to bf16 (what the
    products multiplied), orthonormal only to ~1e-4, which moved the values by up to 3e-4
    of the energy. With B^T B = C^T C (Cholesky, float64), B C^-1 is orthonormal and
    A^T B C^-1 = Z C^-1: the step runs on those, still without a pass over A. What stays is
    the products' own rounding: values within ~3e-5 of the energy either way, the factors'
    energy within ~1e-5 of an fp32 projection's (measured on Z-Image layers; that fp32
    product of the delta cost as much as three bf16 ones)."""
    if rounded:
        basis = basis_t.T.bfloat16().float()
        factor = torch.linalg.cholesky(to_float64(basis.T @ basis))  # lower: C = factor^T
        inverse = _inverse_of_transpose(factor)  # C^-1
        z_gram = to_float64(gram)
        gram = (inverse.T @ z_gram @ inverse).float()  # fp32 ranks Ritz vectors (half the cost)
    _, vectors = torch.linalg.eigh(gram)
    leading = vectors.flip(1)[:, :k]
    if rounded:
        coefficients = inverse @ leading.double()  # C^-1 W: B's and Z's columns that make L and Y
        # Y^T Y is the eigenvalues' diagonal (W diagonalises the Gram matrix of Z C^-1), so
        # L^T A = Y^T is already its own SVD: values the norms of Y's columns, right vectors
        # those columns normalised; no QR of Y (whose products cost ~5% of a large layer's
        # step). up @ down is L L^T A either way. The norms come from Z^T Z (||Y e_j||^2 =
        # c_j^T Z^T Z c_j, float64), so that a reorder where rounding swapped near-equal
        # values permutes the small C^-1 W, not L and Y (column gathers: ~1 ms a layer).
        values = ((z_gram @ coefficients) * coefficients).sum(0).clamp(min=0).sqrt().float()
        if bool((values[1:] > values[:-1]).any()):
            order = values.argsort(descending=True)
            values, coefficients = values[order], coefficients[:, order]
        coefficients = coefficients.float()
        left, y = basis @ coefficients, projection_t.T @ coefficients
        return left, values, (y / values.clamp(min=torch.finfo(y.dtype).tiny)).T
    leading = leading.to(basis_t.device, torch.float32)
    return _projected_svd(basis_t.T @ leading, projection_t.T @ leading)


def _projected_svd(left: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of L^T A from Y = A^T L: with Y = P R, L^T A = R^T P^T, whose SVD is R^T's
    (small, square) with P applied."""
    p, r = _thin_qr(y)
    u_small, s, w_t = on_supporting_device(torch.linalg.svd, r.T)
    return left @ u_small, s, w_t @ p.T


# bf16 path: an exactly low-rank delta (a LoRA given as the variant, a merge) must come out
# exact, which bf16's rounding (~1e-4 of the energy in the values, ~1e-3 on a 96 x 96
# layer) would spoil; ``_refined`` recomputes such a delta's factors with fp32 products.
# It is recognised by the factors keeping more than 1 - REFINE_RESIDUAL of the energy, or
# by a cliff in the values found: one below REFINE_CLIFF times the one before it (where the
# exact rank ends, bf16's rounding stands in for zeros; a realistic delta's values fall
# smoothly, by less than 2x from one to the next).
REFINE_RESIDUAL = 1e-3
REFINE_CLIFF = 1e-2


def _exactly_low_rank(values: torch.Tensor, total_energy: float) -> bool:
    if total_energy - float((to_float64(values) ** 2).sum()) < REFINE_RESIDUAL * total_energy:
        return True
    return bool((values[1:] < REFINE_CLIFF * values[:-1]).any())


def _refined(exact_a: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fp32 half power step from the bf16 path's right vectors: Y = A^T (A V) = P R
    spans a space inside A's row space (exactly, to fp32 precision), and the SVD of A P
    gives triplets whose values are lower bounds and whose energy is exact. Two fp32
    passes over A."""
    p = on_supporting_device(torch.linalg.qr, exact_a.T @ (exact_a @ vh.T))[0]
    u, s, w_t = on_supporting_device(torch.linalg.svd, exact_a @ p, full_matrices=False)
    return u, s, w_t @ p.T


_scratch = threading.local()


def release_scratch() -> None:
    """Free this thread's buffers (the bf16 copy, the largest layer's size: 78 MB for a
    [10240, 3840] layer; the Krylov basis and Z^T, a few MB; the sketches, a few MB). A CLI
    run ends with its process; a long-lived worker thread (WebUI, ComfyUI) keeps them for
    the next run unless its caller releases them after one."""
    _scratch.bf16 = _scratch.basis = _scratch.projection = _scratch.sketches = None


def _sketch(rows: int, cols: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """The Gaussian test matrix S^T [rows, cols]. With a generator (a run's), drawn once per
    shape and generator and reused by every layer of that width: each layer's analysis holds
    for any sketch drawn independently of that layer, and drawing it anew cost ~0.4 ms a
    layer (0.13 CPU s of SD1.5's 355 layers). Without one, a fresh draw."""
    if generator is None:
        return torch.randn(rows, cols, device=device)
    cache = getattr(_scratch, "sketches", None)
    if cache is None or cache[0] is not generator:
        cache = _scratch.sketches = (generator, {})
    key = (rows, cols, str(device))
    if key not in cache[1]:
        cache[1][key] = torch.randn(rows, cols, device=device, generator=generator)
    return cache[1][key]


def _scratch_rows(name: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """An fp32 [rows, cols] view of this thread's buffer ``name`` (CPU), grown as needed and
    reused across layers: the Krylov basis and Z^T, freshly allocated, faulted their pages
    in again at every layer (a few thousand page faults a layer). Its contents are
    garbage; the caller writes rows before reading them."""
    if device.type != "cpu":
        return torch.empty(rows, cols, device=device)
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = torch.empty(rows * cols)
        setattr(_scratch, name, buffer)
    return buffer[: rows * cols].view(rows, cols)


def _bf16_copy(matrix: torch.Tensor) -> torch.Tensor:
    """A bf16 copy of ``matrix`` (CPU) with its memory layout, in a buffer kept per thread
    and reused across layers: a fresh allocation of a large layer costs more in page
    faults than the cast itself (0.05 vs 0.01 CPU s for [10240, 3840])."""
    if matrix.is_contiguous():
        rows, cols, flip = *matrix.shape, False
    elif matrix.T.is_contiguous():
        (cols, rows), flip = matrix.shape, True
    else:
        return matrix.bfloat16()
    buffer = getattr(_scratch, "bf16", None)
    if buffer is None or buffer.numel() < matrix.numel():
        buffer = _scratch.bf16 = torch.empty(matrix.numel(), dtype=torch.bfloat16)
    copy = buffer[: matrix.numel()].view(rows, cols)
    if flip:
        return copy.copy_(matrix.T).T
    return copy.copy_(matrix)


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

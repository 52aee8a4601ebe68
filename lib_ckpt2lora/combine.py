"""Two variants: their common part, or their weighted union.

Write the two deltas as agreement and disagreement:

    M = (D1 + D2) / 2        A = (D1 - D2) / 2        (D1 = M + A, D2 = M - A)

For two numbers a, b the common part is min(|a|, |b|) when their signs agree and 0
otherwise, which is |m| - |d| clipped at 0 (m, d their half sum and half difference).
The matrix version does the same per singular direction of M:

    C = sum_i max(m_i - t_i, 0) u_i v_i^T,    t_i = max(a_i, tau)

- m_i, u_i, v_i: M's singular triplets (the leading ones; see "tail" below);
- a_i: how strongly the variants disagree through that direction, the norm of A
  restricted to row u_i or column v_i: a_i^2 = |A v_i|^2 + |A^T u_i|^2 - (u_i^T A v_i)^2
  (for M itself this is m_i^2, so a_i and m_i are the same measure);
- tau: A's noise floor, the top of its noise bulk (Marchenko-Pastur edge estimated
  from A's energy outside its spikes). Independent noise in the two variants lands in
  M and in A with the same distribution, so M's directions below tau are noise that the
  variants do not share.

Properties (checked on realistic noisy bf16 deltas in tests/test_combine_realistic.py):
- common(D, D) = D exactly (A = 0: no SVD at all, the same bits as D);
- common(D, -D) = 0 (M holds only rounding noise, below what A says per direction);
- deltas with orthogonal row spaces or orthogonal column spaces -> 0 (a_i >= m_i
  exactly: A is M reflected on the column or row space);
- symmetric in D1, D2 (swapping only negates A, and only norms of A are used);
- common(D, 2D) = D (the smaller of the two, as for numbers).

Tail: with a truncated SVD only M's leading ``width`` triplets are known. The rest of M
(M minus those) is all below the last known value m_k; it is scaled by 1 - tau / m_k
(0 when m_k <= tau: all noise), which is exact in both limits and continuous between.

union = C + w1 (D1 - C) + w2 (D2 - C) = w1 D1 + w2 D2 - C with w1 = 2 alpha and
w2 = 2 (1 - alpha): each variant's own part weighted, the shared part counted once.
Computed as 2 M - C + (w1 - w2) A, so union(D, D) = D to the bit for any alpha.
"""

from __future__ import annotations

import math

import torch

from .devices import on_supporting_device, to_float64  # MPS has no float64, QR or SVD
from .svd import squared_norm, top_singular_triplets

# M's leading triplets computed per layer: twice the output's rank cap.
WIDTH_FACTOR = 2
# A common part under this fraction of the smaller delta's norm is "nothing in common":
# the layer is skipped (a noise-level leftover, not something the variants share).
NEGLIGIBLE = 0.01
# Rounds of the spike / noise-level estimate (it converges in two or three).
NOISE_ROUNDS = 5
# Energy left outside the spikes below this fraction of the total is rounding, not noise.
ROUNDING = 1e-5


def common_part(
    d1: torch.Tensor, d2: torch.Tensor, width: int, exact: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The part of two same-shaped deltas that both share (see the module docstring)."""
    shape = d1.shape
    m1, m2 = _as_matrix(d1), _as_matrix(d2)
    agreement = (m1 + m2) / 2
    disagreement = (m1 - m2) / 2
    if not bool(disagreement.any()):
        return agreement.reshape(shape)  # the same delta twice: all of it is common
    if not bool(agreement.any()) or not bool(m1.any()) or not bool(m2.any()):
        return torch.zeros_like(d1)  # opposite deltas, or one variant leaves the layer alone
    wanted = max(1, min(width, min(agreement.shape)))
    # The same generator, in the same order, whichever variant comes first: symmetric.
    ua, a_values, vah = top_singular_triplets(disagreement, wanted, exact, generator)
    floor, spikes = noise_floor(a_values, squared_norm(disagreement), *disagreement.shape)
    if spikes == 0:
        return _shared_directions(agreement, disagreement, floor, wanted, exact, generator).reshape(shape)
    # Split M into the part touching A's spikes (rows or columns in their spaces: low rank,
    # decomposed exactly) and the rest, where A is only noise.
    u_spikes, v_spikes = _fixed_signs(ua[:, :spikes]), _fixed_signs(vah[:spikes].T)
    rows_in = u_spikes.T @ agreement  # [k, cols]
    cols_in = agreement @ v_spikes  # [rows, k]
    outside = agreement - u_spikes @ rows_in - cols_in @ v_spikes.T + u_spikes @ (rows_in @ v_spikes) @ v_spikes.T
    touching = agreement - outside
    left = on_supporting_device(torch.linalg.qr, torch.cat([u_spikes, cols_in], dim=1))[0]
    right = on_supporting_device(torch.linalg.qr, torch.cat([v_spikes, rows_in.T], dim=1))[0]
    core_u, core_s, core_vh = on_supporting_device(torch.linalg.svd, left.T @ touching @ right, full_matrices=False)
    common = _shrink(left @ core_u, core_s, core_vh @ right.T, disagreement, floor)
    common += _shared_directions(outside, disagreement, floor, wanted, exact, generator)
    return common.reshape(shape)


def _shared_directions(agreement, disagreement, floor, wanted, exact, generator) -> torch.Tensor:
    """The rule per singular direction of ``agreement`` (leading ``wanted``), plus the tail."""
    u, s, vh = top_singular_triplets(agreement, wanted, exact, generator)
    u, s, vh = u[:, :wanted], s[:wanted], vh[:wanted]
    common = _shrink(u, s, vh, disagreement, floor)
    if len(s) < min(agreement.shape) and float(s[-1]) > floor:
        tail = agreement - (u * s) @ vh
        common += (1.0 - floor / float(s[-1])) * tail
    return common


def _fixed_signs(basis: torch.Tensor) -> torch.Tensor:
    """Each column with its largest entry positive: A and -A (the variants swapped) then
    give the same bases to the bit, only their spans matter here, and so the result is
    symmetric exactly rather than to rounding."""
    largest = basis.gather(0, basis.abs().argmax(0, keepdim=True))
    return basis * torch.where(largest < 0, -1.0, 1.0).to(basis.dtype)


def _shrink(u, s, vh, disagreement, floor) -> torch.Tensor:
    through_inputs = disagreement @ vh.T  # A v_i
    through_outputs = disagreement.T @ u  # A^T u_i
    both = (u * through_inputs).sum(0)  # u_i^T A v_i, counted in both above
    crossing = (through_inputs.square().sum(0) + through_outputs.square().sum(0) - both.square()).clamp_min(0).sqrt()
    kept = (s - torch.clamp(crossing, min=floor)).clamp_min(0)
    return (u * kept) @ vh


def noise_floor(singular_values: torch.Tensor, total_energy: float, rows: int, cols: int) -> tuple[float, int]:
    """Top of the noise bulk of a matrix with these leading singular values and ||.||^2,
    and how many of the values (spikes) stand above it.

    Spikes are the values above the bulk edge sigma (sqrt(rows) + sqrt(cols)) of i.i.d.
    noise with the energy left outside them; the count and sigma are refined together."""
    if min(rows, cols) < 2 or total_energy <= 0:
        return 0.0, 0
    values = to_float64(singular_values)
    energies = values.square()
    spikes, edge = 0, 0.0
    for _ in range(NOISE_ROUNDS):
        rest = total_energy - float(energies[:spikes].sum())
        if rest <= ROUNDING * total_energy:
            # The spikes hold all of it (an exactly low-rank matrix): no noise bulk. The rest
            # is fp32 rounding of either sign, and -A's SVD rounds differently from A's:
            # deciding on its value made the common part of (V1, V2) and (V2, V1) differ.
            return 0.0, spikes
        r, c = rows - spikes, cols - spikes
        if r <= 0 or c <= 0:
            return 0.0, spikes
        edge = math.sqrt(rest / (r * c)) * (math.sqrt(r) + math.sqrt(c))
        count = int((values > edge).sum())
        if count == spikes:
            break
        spikes = count
    return edge, spikes


def nothing_in_common(common_energy: float, delta_energies: list[float]) -> bool:
    """True when a layer's common part is negligible next to the smaller delta (which
    includes one variant not changing the layer at all)."""
    return max(delta_energies) > 0 and common_energy <= NEGLIGIBLE**2 * min(delta_energies)


def combine(d1: torch.Tensor, d2: torch.Tensor, opts, generator: torch.Generator | None = None) -> torch.Tensor:
    """The delta to extract for ``--variant2``: common (default) or ``--union``."""
    width = (opts.rank if opts.rank > 0 else opts.rank_max) * WIDTH_FACTOR
    common = common_part(d1, d2, width, opts.svd == "exact", generator)
    if not opts.union:
        return common
    w1, w2 = 2.0 * opts.alpha, 2.0 * (1.0 - opts.alpha)
    union = (d1 + d2) - common  # 2 M - C
    if w1 != w2:
        union += (w1 - w2) / 2 * (d1 - d2)  # (w1 - w2) A
    return union


def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(1, -1) if delta.dim() == 1 else delta.reshape(delta.shape[0], -1)

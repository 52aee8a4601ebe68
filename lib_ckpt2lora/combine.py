"""Two variants: their common part, or their weighted union.

common(D1, D2) = ( P_U2 D1 P_V2 + P_U1 D2 P_V1 ) / 2

where P_Ui / P_Vi project onto the dominant left / right singular subspaces of Di (the
spaces holding almost all of its energy: the rank rule with a tighter threshold, so
that the common part of a delta with itself is that delta). Each delta is kept only
where it acts in the other's dominant directions, and the two views are averaged:

- common(D, D) = D (up to the tiny energy outside the subspaces),
- common(D, -D) = 0 (the projections cancel exactly),
- D1, D2 with orthogonal row or column spaces -> 0 (each projection vanishes),
- symmetric in D1 and D2 by construction.

union = C + w1 (D1 - C) + w2 (D2 - C) = w1 D1 + w2 D2 - C with w1 = 2 alpha and
w2 = 2 (1 - alpha): each variant's own part weighted, the shared part counted once, so
union(D, D) = D for any alpha and orthogonal deltas give w1 D1 + w2 D2.
"""

from __future__ import annotations

import torch

from .svd import dominant_subspaces

# Subspaces keep all but a fifth of what the output's rank rule leaves out (0.99 for
# the default 0.95), and may be twice as wide as the output's rank cap.
SUBSPACE_SHORTFALL = 0.2
SUBSPACE_CAP_FACTOR = 2


def subspace_threshold(rank_thresh: float) -> float:
    return 1.0 - (1.0 - rank_thresh) * SUBSPACE_SHORTFALL


def common_part(
    d1: torch.Tensor, d2: torch.Tensor, threshold: float, cap: int, exact: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The part of two same-shaped deltas that both share (see the module docstring)."""
    shape = d1.shape
    m1, m2 = _as_matrix(d1), _as_matrix(d2)
    if not bool(m1.any()) or not bool(m2.any()):
        return torch.zeros_like(d1)
    u1, v1 = dominant_subspaces(m1, threshold, cap, exact, generator)
    u2, v2 = dominant_subspaces(m2, threshold, cap, exact, generator)
    one_in_two = u2 @ ((u2.T @ m1) @ v2) @ v2.T
    two_in_one = u1 @ ((u1.T @ m2) @ v1) @ v1.T
    return ((one_in_two + two_in_one) / 2).reshape(shape)


def combine(d1: torch.Tensor, d2: torch.Tensor, opts, generator: torch.Generator | None = None) -> torch.Tensor:
    """The delta to extract for ``--variant2``: common (default) or ``--union``."""
    cap = (opts.rank if opts.rank > 0 else opts.rank_max) * SUBSPACE_CAP_FACTOR
    common = common_part(d1, d2, subspace_threshold(opts.rank_thresh), cap, opts.svd == "exact", generator)
    if not opts.union:
        return common
    w1, w2 = 2.0 * opts.alpha, 2.0 * (1.0 - opts.alpha)
    return w1 * d1 + w2 * d2 - common


def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(1, -1) if delta.dim() == 1 else delta.reshape(delta.shape[0], -1)

"""Merging LoRA modules: the truncated SVD of sum_i w_i * dW_i, computed from the factors.

Each input module i adds dW_i = s_i * U_i @ D_i (U_i [m, r_i], D_i [r_i, n], s_i = alpha / rank
as loaders apply it). Stacked, the weighted sum is one product

    sum_i w_i dW_i = A @ B,   A = [w_1 s_1 U_1 | ... ] (m x R),   B = [D_1; ...] (R x n),

with R = sum r_i. With A = Qa Ra and B^T = Qb Rb (thin QR), A @ B = Qa (Ra Rb^T) Qb^T, and
the SVD of the small R x R core Ra Rb^T = Uc S Vc^T gives the SVD of the sum:
U = Qa Uc, V = Qb Vc. Nothing m x n is ever formed: the cost is O((m + n) R^2) instead of
a dense SVD's O(m n min(m, n)), and the result is exact (every singular value, so the
exact total energy too) for any output rank >= R.

Modules that are not a plain up @ down (LoHa, LoKr, Tucker, full ``.diff``) have no such
factors: a module with any of them is summed densely and factorised like an extraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..svd import squared_norm, top_singular_triplets


@dataclass
class Term:
    """One input's contribution to a module: ``weight * up @ down`` or ``weight * dense``
    (2-D: a conv kernel's dims after the first flattened), loader scale folded into up."""

    weight: float
    up: torch.Tensor | None = None  # [m, r]
    down: torch.Tensor | None = None  # [r, n]
    dense: torch.Tensor | None = None  # [m, n]

    @property
    def low_rank(self) -> bool:
        return self.dense is None


@dataclass
class Spectrum:
    """The leading singular triplets of a merged module and its exact ||sum||_F^2."""

    u: torch.Tensor  # [m, k]
    s: torch.Tensor  # [k], fp32 on the CPU, largest first
    vh: torch.Tensor  # [k, n]
    total_energy: float
    route: str  # "factors" or "dense"

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced (up, down) of the first ``rank`` triplets, as extraction writes them."""
        root = self.s[:rank].to(self.u.device, self.u.dtype).sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vh[:rank]


def merge_terms(terms: list[Term], cap: int, generator: torch.Generator | None = None) -> Spectrum:
    """The leading ``cap`` (at least) singular triplets of ``sum weight * term``."""
    if all(term.low_rank for term in terms):
        return factor_route(terms, cap)
    return dense_route(terms, cap, generator)


def factor_route(terms: list[Term], cap: int) -> Spectrum:
    """Exact SVD of sum_i w_i up_i @ down_i from QRs of the stacked factors (module docstring)."""
    stacked_up = torch.cat([term.up.float() * term.weight for term in terms], dim=1)
    stacked_down = torch.cat([term.down.float() for term in terms], dim=0)
    q_up, r_up = torch.linalg.qr(stacked_up)
    q_down, r_down = torch.linalg.qr(stacked_down.T)
    # The core is (sum r_i)^2 at most: float64 on the CPU costs nothing and keeps the small
    # singular values (the energy rule reads them) accurate.
    core = r_up.cpu().double() @ r_down.cpu().double().T
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    keep = min(len(s), max(cap, 1))
    total_energy = float((s * s).sum())
    u = q_up @ u_core[:, :keep].to(q_up.device, q_up.dtype)
    vh = vh_core[:keep].to(q_down.device, q_down.dtype) @ q_down.T
    return Spectrum(u, s[:keep].float(), vh, total_energy, "factors")


def dense_route(terms: list[Term], cap: int, generator: torch.Generator | None = None) -> Spectrum:
    """Materialise the weighted sum and take its leading triplets (randomized SVD when cheaper)."""
    total = None
    for term in terms:
        part = term.dense.float() if term.dense is not None else term.up.float() @ term.down.float()
        total = part * term.weight if total is None else total.add_(part, alpha=term.weight)
    total_energy = squared_norm(total)
    wanted = max(1, min(cap, *total.shape))
    u, s, vh = top_singular_triplets(total, wanted, False, generator)
    return Spectrum(u[:, :wanted], s[:wanted].float().cpu(), vh[:wanted], total_energy, "dense")

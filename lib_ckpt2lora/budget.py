"""A global rank budget: the ranks of all layers chosen together, for a file size or a
model-wide captured fraction (``--target-size`` / ``--target-energy``).

Every layer offers its leading singular triplets up to ``--rank-max``. Keeping the j-th
triplet of layer l costs ``cost_l`` bytes (its up column plus its down row, at the save
dtype) and buys ``s_lj^2 * weight_l`` of the objective. Within a layer the values only
fall, and the cost per triplet is constant, so taking triplets in decreasing order of
value per byte, each layer's in its own order, is the optimal allocation (up to the one
triplet that no longer fits; a fractional knapsack over concave per-layer curves).

The objective (``weight_l``), measured in benchmarks/bench_budget.py:

* ``relative``: s^2 / ||W_l||^2, the change relative to the layer's own weight, which is
  what the layer's output sees (a unit change in a small layer matters more than in a
  large one).
* ``energy``: s^2, the raw Frobenius energy. Favours layers whose weights are large.
* ``fraction``: s^2 / ||delta_l||^2, each layer's own captured fraction (the quantity the
  per-layer 95% rule looks at), so every layer counts the same whatever it changed.
* ``balanced``: s^2 / ||delta_l||, the geometric mean of ``energy`` and ``fraction``: the
  model-wide energy favours layers that changed much, the mean layer-output error
  counts every layer alike; this weighs a layer by the square root of its change. The
  default: at the per-layer rule's own file size it beat that rule on both figures on
  every pair measured, where ``relative`` lost model-wide energy on a pair whose layers
  all changed by the same relative amount (there it equals ``fraction``, which ignores
  how large each change is); figures in benchmarks/README.md.

Every layer with a real delta keeps at least ``RANK_FLOOR`` triplets, so none drops out
silently; a budget too small even for that is refused with the smallest possible size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UserError

RANK_FLOOR = 1
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes from "100MB", "1.5GB", "300MiB" or a plain number of bytes (MB = 10^6 bytes)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise UserError(f"--target-size must be a size such as 100MB, 1.5GB or 300MiB, not {text!r}.")
    size = round(float(match.group(1)) * _UNITS[unit])  # 8.2 * 10**6 is 8199999.99... in binary
    if size <= 0:
        raise UserError(f"--target-size must be more than 0 bytes, not {text!r}.")
    return size


def format_size(size: int, round_up: bool = False) -> str:
    """``size`` in decimal units, the one unit system of every output (MB = 10^6 bytes): two
    decimals under 10 MB, one above, KB under 0.1 MB (where MB would read 0.00), GB from 1 GB
    (a checkpoint); ``round_up`` for a minimum the named size must still meet."""
    if size < 10**5:
        unit, name, decimals = 10**3, "KB", 1
    elif size < 10**9:
        unit, name, decimals = 10**6, "MB", 2 if size < 10**7 else 1
    else:
        unit, name, decimals = 10**9, "GB", 2
    steps = size / unit * 10**decimals
    return f"{(math.ceil(steps) if round_up else round(steps)) / 10**decimals:.{decimals}f} {name}"


@dataclass
class Spectrum:
    """One layer's candidates: its leading singular values (largest first, up to the cap)."""

    name: str
    values: list[float]
    total_energy: float  # ||delta||_F^2, exact
    weight_energy: float  # ||W||_F^2 of the base weight
    cost: int  # bytes one more triplet adds to the file
    floor: int = RANK_FLOOR

    def weight(self, objective: str) -> float:
        if objective == "energy":
            return 1.0
        if objective == "fraction":
            return 1.0 / self.total_energy if self.total_energy > 0 else 0.0
        if objective == "balanced":
            return 1.0 / math.sqrt(self.total_energy) if self.total_energy > 0 else 0.0
        return 1.0 / self.weight_energy if self.weight_energy > 0 else 0.0

    @property
    def least(self) -> int:
        return min(self.floor, len(self.values))


@dataclass
class Allocation:
    ranks: list[int]
    bytes: int  # the triplets' bytes (without the file's fixed part)
    captured_objective: float  # model-wide fraction of the objective kept
    captured_energy: float  # model-wide fraction of sum ||delta||^2 kept


def allocate(
    spectra: list[Spectrum],
    objective: str = "balanced",
    budget_bytes: int | None = None,
    target: float | None = None,
    energy_target: float | None = None,
) -> Allocation:
    """Ranks for ``spectra`` that fit ``budget_bytes``, best value per byte first; or the
    first ones in that order that reach ``target`` of the objective or ``energy_target`` of
    the model-wide delta energy (what --target-energy means: the figure the report gives).
    Raises BudgetTooSmall when even the floors do not fit."""
    ranks = [spectrum.least for spectrum in spectra]
    floor_bytes = sum(rank * spectrum.cost for rank, spectrum in zip(ranks, spectra))
    if budget_bytes is not None and floor_bytes > budget_bytes:
        raise BudgetTooSmall(floor_bytes)
    weights = [spectrum.weight(objective) for spectrum in spectra]
    totals = sum(w * s.total_energy for w, s in zip(weights, spectra))
    kept = sum(w * _kept(s, r) for w, s, r in zip(weights, spectra, ranks))
    energy_total = sum(s.total_energy for s in spectra)
    energy = sum(_kept(s, r) for s, r in zip(spectra, ranks))
    items = [
        (-(value * value * w) / s.cost, index, j)
        for index, (s, w) in enumerate(zip(spectra, weights))
        for j, value in enumerate(s.values)
        if j >= ranks[index]
    ]
    items.sort()  # best value per byte first; a layer's own triplets stay in order (j)
    spent, closed = floor_bytes, set()
    for negative_ratio, index, j in items:
        if target is not None and totals > 0 and kept / totals >= target:
            break
        if energy_target is not None and energy_total > 0 and energy / energy_total >= energy_target:
            break
        if index in closed:
            continue
        cost = spectra[index].cost
        if budget_bytes is not None and spent + cost > budget_bytes:
            closed.add(index)  # its later triplets need this one first
            continue
        ranks[index] = j + 1
        spent += cost
        kept += -negative_ratio * cost
        energy += spectra[index].values[j] ** 2
    energy = sum(_kept(s, r) for s, r in zip(spectra, ranks))  # exactly, not the running sum
    return Allocation(
        ranks,
        spent,
        min(kept / totals, 1.0) if totals > 0 else 1.0,
        min(energy / energy_total, 1.0) if energy_total > 0 else 1.0,
    )


def largest_bytes(spectra: list[Spectrum]) -> int:
    """The triplets' bytes with every layer at its cap (all candidates kept)."""
    return sum(len(s.values) * s.cost for s in spectra)


def smallest_bytes(spectra: list[Spectrum]) -> int:
    return sum(s.least * s.cost for s in spectra)


class BudgetTooSmall(UserError):
    def __init__(self, floor_bytes: int):
        super().__init__(f"needs {floor_bytes} bytes for the rank floors")
        self.floor_bytes = floor_bytes


def _kept(spectrum: Spectrum, rank: int) -> float:
    return math.fsum(value * value for value in spectrum.values[:rank])

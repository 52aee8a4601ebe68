"""Fidelity against file size, worked out analytically from a report's ``"spectra"``.

Every low-rank layer of a report JSON carries, per part (canonical weight), its leading
singular values up to the run's cap, ||delta||^2, ||W||^2 and the bytes one triplet
costs. The written factors are projections of the delta, so at rank r:

    captured_l       = sum(values[:r]^2) / ||delta_l||^2             (exact)
    relative error   = sqrt(1 - captured_l)                           (exact)
    output error     = sqrt(1 - captured_l)  for isotropic random x   (its expectation:
                       E||(L-D)x||^2 / E||Dx||^2 = ||L-D||^2 / ||D||^2)

and a file of ranks r_l takes ``overhead + sum(r_l * cost_l)`` bytes. So any allocation
can be scored without writing it: the global one (``lib_ckpt2lora.budget.allocate``, per
objective) at a given size, and the per-layer rule (``rank.rank_for_energy`` at
``--rank-thresh``) with ``--rank-max`` varied, the knob users turn to change the size.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)  # run as a script from anywhere: the engine beside benchmarks/

from lib_ckpt2lora.budget import BudgetTooSmall, Spectrum, allocate  # noqa: E402
from lib_ckpt2lora.rank import rank_for_energy  # noqa: E402


@dataclass
class Part:
    key: str
    values: list[float]
    total_energy: float
    weight_energy: float
    cost: int


def parts_of(report: dict) -> tuple[list[Part], list[int]]:
    """Every part of every low-rank layer, and the rank the report's run gave it."""
    parts, ranks = [], []
    for layer in report.get("layers", []):
        spectra = layer.get("spectra") or []
        part_ranks = layer.get("part_ranks") or [layer.get("rank", 0)] * len(spectra)
        for entry, rank in zip(spectra, part_ranks):
            parts.append(Part(entry["key"], [float(v) for v in entry["values"]], float(entry["total_energy"]),
                              float(entry["weight_energy"]), int(entry["cost"])))
            ranks.append(int(rank))
    return parts, ranks


def has_spectra(report: dict) -> bool:
    return any(layer.get("spectra") for layer in report.get("layers", []))


def kept(part: Part, rank: int) -> float:
    return math.fsum(v * v for v in part.values[:rank])


def figures(parts: list[Part], ranks: list[int], overhead: int) -> dict:
    """The benchmark's three figures (and the file size) for ranks ``ranks``."""
    total = math.fsum(p.total_energy for p in parts)
    captured = [min(kept(p, r) / p.total_energy, 1.0) if p.total_energy > 0 else 1.0 for p, r in zip(parts, ranks)]
    errors = [math.sqrt(max(0.0, 1.0 - c)) for c in captured]
    return {
        "bytes": overhead + sum(r * p.cost for p, r in zip(parts, ranks)),
        "energy": math.fsum(kept(p, r) for p, r in zip(parts, ranks)) / total if total > 0 else 1.0,
        "worst_relative_error": max(errors),
        "mean_output_error": math.fsum(errors) / len(errors),
    }


def per_layer_ranks(parts: list[Part], threshold: float, cap: int) -> list[int]:
    return [
        rank_for_energy(torch.tensor(p.values, dtype=torch.float64), p.total_energy, threshold, cap)
        for p in parts
    ]


def global_ranks(parts: list[Part], objective: str, budget_bytes: int) -> list[int] | None:
    spectra = [Spectrum(p.key, p.values, p.total_energy, p.weight_energy, p.cost) for p in parts]
    try:
        return allocate(spectra, objective, budget_bytes=budget_bytes).ranks
    except BudgetTooSmall:
        return None


def per_layer_sweep(parts: list[Part], threshold: float, overhead: int) -> list[tuple[int, dict]]:
    """(rank_max, figures) for every cap from 1 to the longest spectrum, sizes distinct."""
    longest = max(len(p.values) for p in parts)
    sweep: list[tuple[int, dict]] = []
    for cap in range(1, longest + 1):
        point = figures(parts, per_layer_ranks(parts, threshold, cap), overhead)
        if not sweep or point["bytes"] != sweep[-1][1]["bytes"]:
            sweep.append((cap, point))
    return sweep


def per_layer_at(sweep: list[tuple[int, dict]], size: int) -> dict | None:
    """The per-layer rule at ``size``: linear interpolation in bytes between the two caps
    whose files bracket it (a real file has one of those two sizes, not this one)."""
    if size < sweep[0][1]["bytes"]:
        return None
    for (cap_lo, lo), (cap_hi, hi) in zip(sweep, sweep[1:]):
        if lo["bytes"] <= size <= hi["bytes"]:
            t = (size - lo["bytes"]) / (hi["bytes"] - lo["bytes"])
            point = {k: lo[k] + t * (hi[k] - lo[k]) for k in ("energy", "worst_relative_error", "mean_output_error")}
            point.update(bytes=size, rank_max=f"{cap_lo}-{cap_hi}", interpolated=True)
            return point
    cap, last = sweep[-1]
    return dict(last, rank_max=str(cap), interpolated=False, capped=size > last["bytes"])


def curve(parts: list[Part], sizes: list[int], objectives: list[str], threshold: float, overhead: int) -> list[dict]:
    """One row per (size, method): the per-layer rule and the global allocation per objective."""
    sweep = per_layer_sweep(parts, threshold, overhead)
    all_at_cap = figures(parts, [len(p.values) for p in parts], overhead)["bytes"]
    rows = []
    for size in sizes:
        capped = min(size, all_at_cap)
        point = per_layer_at(sweep, capped)
        rows.append({"size": size, "method": "per-layer", **(point or {"bytes": None})})
        for objective in objectives:
            ranks = global_ranks(parts, objective, capped - overhead)
            point = figures(parts, ranks, overhead) if ranks is not None else {"bytes": None}
            rows.append({"size": size, "method": f"global {objective}", **point})
    return rows

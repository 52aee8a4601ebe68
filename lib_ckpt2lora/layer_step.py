"""The per-layer step: a unit's tensors in, its delta's factors out.

Pure computation on the compute device: no reading, no file format, no writing. A LoRA
run turns the result into a LoRA module (lora_format), a checkpoint run into a change
added to the base (checkpoint.py), a budget run keeps every candidate triplet up to the
cap and truncates later (allocation.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .block_lora import factorize_parts, join_blocks
from .options import ExtractOptions
from .planning import Plan, Unit
from .report import LayerRecord, record_for
from .sources import base_energy, known_energy, on_device
from .svd import Factorization, squared_norm

# The skip reason of a layer whose two variants share nothing (see combine.nothing_in_common).
NOTHING_IN_COMMON = "nothing in common"


@dataclass
class LayerStep:
    unit: Unit
    relative_delta: float  # ||delta|| / ||base||
    full: torch.Tensor | None = None  # the whole delta (1-D tensors, --checkpoint-full)
    parts: list[Factorization | None] = field(default_factory=list)  # one per row block
    weight_energies: list[float] = field(default_factory=list)  # ||W||^2 per row block
    detail: Factorization | None = None  # the residual's factors (--detail)

    def joined(self, ranks: list[int] | None = None, shapes_only: bool = False) -> Factorization:
        """The parts as one factorization, each truncated to ``ranks`` when given.

        ``shapes_only``: factors on the meta device (shapes, no data), to size a file."""
        parts = self.parts
        if ranks is not None:
            parts = [None if part is None else part.truncated(rank) for part, rank in zip(parts, ranks)]
        if shapes_only:
            parts = [None if part is None else _on_meta(part) for part in parts]
        return join_blocks(parts, self.unit.rows)

    def keep_on_cpu(self, dtype: torch.dtype) -> None:
        """Candidates waiting for a global budget: on the CPU, in the save dtype."""
        for part in self.parts:
            if part is not None:
                part.up = part.up.to("cpu", dtype)
                part.down = part.down.to("cpu", dtype)


def compute_step(
    plan: Plan,
    opts: ExtractOptions,
    unit: Unit,
    loaded,
    device: torch.device,
    generator: torch.Generator | None,
    candidates: bool = False,
) -> LayerStep | None:
    """Delta -> factors for one unit; None (with the reason in the report) when it is skipped.

    ``candidates``: keep every triplet up to --rank-max (a budget chooses the ranks later)
    instead of applying the per-layer rank rule."""
    report = plan.report
    base_parts, source_parts = loaded
    bases = [on_device(base, device) for base in base_parts]
    deltas = [
        _stack_rows([source.delta(item, base) for item, base in zip(items, bases)])
        for source, items in zip(plan.sources, source_parts)
    ]
    # One pass per delta gives ||delta||^2 accurately, and NaN/Inf propagate into it (the
    # reader's, when it formed the delta: the same sums).
    known = [known_energy(items) for items in source_parts]
    exact_delta = _exact_delta_of(source_parts)
    del base_parts, source_parts
    energies = [squared_norm(delta) if energy is None else energy for delta, energy in zip(deltas, known)]
    if not all(math.isfinite(energy) for energy in energies):
        report.skip("NaN or Inf in the delta", unit.key)
        report.warnings.append(f"{unit.key} holds NaN or Inf in the variant; it was left out.")
        return None
    if len(deltas) == 1:
        delta, energy = deltas[0], energies[0]
    else:
        from .combine import combine, nothing_in_common

        delta = combine(deltas[0], deltas[1], opts, generator)
        energy = squared_norm(delta)
        if not opts.union and nothing_in_common(energy, energies):
            report.skip(NOTHING_IN_COMMON, unit.key)
            return None
    if energy == 0.0:
        report.skip("no change", unit.key)
        return None
    # ||W||^2 per part: the report's relative change and the budget's "relative" objective.
    weight_energies = [base_energy(base) for base in bases]
    del bases
    relative = math.sqrt(energy / max(sum(weight_energies), 1e-24))
    if len(unit.shape) == 1 or opts.checkpoint_full:
        return LayerStep(unit, relative, full=delta)
    matrix = delta.reshape(unit.shape[0], -1)
    exact = opts.svd == "exact"
    # A fused unit (Z-Image's q|k|v in comfy style) is factored part by part, each with
    # its own rank, so it carries exactly what the split modules would.
    fixed = opts.rank_max if candidates else opts.rank
    exact_matrix = None if exact_delta is None else lambda: exact_delta().reshape(matrix.shape)
    parts = factorize_parts(matrix, unit.rows, fixed, opts.rank_thresh, opts.rank_max, exact, generator, energy, exact_matrix)
    step = LayerStep(unit, relative, parts=parts, weight_energies=weight_energies)
    if opts.detail and unit.module is not None and not candidates:
        factors = step.joined()
        residual = matrix - factors.up @ factors.down
        if float(torch.linalg.vector_norm(residual)) > 0:
            extra = factorize_parts(residual, unit.rows, opts.rank, opts.rank_thresh, opts.rank_max, exact, generator)
            step.detail = join_blocks(extra, unit.rows)
    return step


def record_of(plan: Plan, step: LayerStep, factors: Factorization | None) -> LayerRecord:
    """The report's line for a step: its kept rank and energy, and every part's spectrum."""
    unit = step.unit
    name = unit.module or unit.key
    group = plan.arch.group(unit.key)
    if factors is None:  # a whole (.diff) tensor
        return record_for(name, unit.key, group, unit.shape, 0, 0.0, 0.0, 1.0, step.relative_delta)
    record = record_for(
        name, unit.key, group, unit.shape, factors.rank, factors.s_max, factors.s_min, factors.energy, step.relative_delta
    )
    record.spectra = spectra_of(plan, step)
    return record


def spectra_of(plan: Plan, step: LayerStep) -> list[dict]:
    """Each part's candidate singular values, energies and byte cost per triplet."""
    unit = step.unit
    size = torch.empty((), dtype=plan.save_dtype).element_size()
    columns = math.prod(unit.shape[1:])
    up_rows = unit.shape[0]  # a fused module's up column spans every part's rows
    spectra = []
    for part_key, part, weight_energy, rows in zip(unit.parts, step.parts, step.weight_energies, unit.rows):
        if part is None:
            continue
        spectra.append(
            {
                "key": part_key,
                "values": [float(value) for value in part.singular_values],
                "total_energy": part.total_energy,
                "weight_energy": weight_energy,
                "cost": size * ((up_rows if len(unit.parts) > 1 else rows) + columns),
            }
        )
    return spectra


def _on_meta(part: Factorization) -> Factorization:
    def meta(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    return Factorization(meta(part.up), meta(part.down), part.rank, part.singular_values, part.total_energy, part.energy)


def _exact_delta_of(source_parts: list[list]):
    """How to get the fp32 delta of a unit the reader handed over rounded to bf16 (one
    source, one part: see extract.Runner.rounds), else None."""
    if len(source_parts) == 1 and len(source_parts[0]) == 1:
        return getattr(source_parts[0][0], "exact", None)
    return None


def _stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

"""Phase 2 of a budget run: every layer's candidates in, the ranks and the LoRA's tensors out.

Phase 1 (extract.run_lora) factored every layer up to --rank-max and kept the factors
on the CPU in the save dtype: what a per-layer run holds of its LoRA when every layer
hits the cap (a Z-Image LoRA at rank 64: ~0.4 GB), so the peak stays that of a normal
run. Here budget.allocate picks the ranks, and each try is sized exactly (header
included) from meta tensors, without data; only the chosen allocation is built,
dropping each layer's candidates as its tensors are made. The file at rank 1
everywhere is measured first: it is the smallest possible size and gives the header's
size; the header then grows a little with the ranks, so the triplets' budget moves by
the measured difference until the file is as large as the target allows and never
larger.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from .budget import Allocation, BudgetTooSmall, Spectrum, allocate, format_size, largest_bytes, parse_size, smallest_bytes
from .errors import UserError
from .layer_step import LayerStep, record_of, spectra_of
from .lora_format import lora_file_metadata, unit_tensors
from .options import ExtractOptions
from .planning import Plan
from .writing import tensors_file_size

# Allocations tried while the header's size settles (it grows a little with the ranks).
MAX_TRIES = 6


def apply_budget(
    plan: Plan,
    opts: ExtractOptions,
    steps: list[LayerStep],
    fixed_tensors: dict[str, torch.Tensor],
    complete: Callable[[dict], dict],
) -> dict[str, torch.Tensor]:
    """The LoRA's tensors at the ranks the budget chooses; adds every record to the report.

    ``fixed_tensors``: what the budget does not choose (whole .diff tensors); ``complete``
    adds modules a loader needs whole (zero te2 members), counted in the size too."""
    spectra, owners = [], []
    for index, step in enumerate(steps):
        for part_index, spectrum in enumerate(_spectra(plan, step)):
            if spectrum is not None:
                spectra.append(spectrum)
                owners.append((index, part_index))
    if not spectra:
        return dict(fixed_tensors)
    objective = opts.budget_objective
    target_bytes = parse_size(opts.target_size) if str(opts.target_size or "").strip() else None
    # The file at the floors (rank 1 everywhere) is the smallest possible; measuring it
    # exactly also gives the header's size, so the first allocation is nearly exact.
    floors = allocate(spectra, objective, budget_bytes=smallest_bytes(spectra))
    floor_size = tensors_file_size(*_sized(plan, opts, steps, owners, floors, fixed_tensors, complete))
    fixed = floor_size - floors.bytes
    if target_bytes is not None and target_bytes < floor_size:
        raise UserError(
            f"--target-size {format_size(target_bytes)} is too small: rank 1 on each of the {len(steps)} changed "
            f"layers already takes {format_size(floors.bytes)}; the smallest possible size is "
            f"{format_size(floor_size, round_up=True)} "
            f"({floor_size} bytes; or leave layers out with --exclude)."
        )
    if target_bytes is not None:
        everything = largest_bytes(spectra) + fixed
        if target_bytes >= everything:
            plan.report.warnings.append(
                f"--target-size {format_size(target_bytes)} is more than every layer at --rank-max {opts.rank_max} "
                f"takes (about {format_size(everything)}), so every layer keeps its cap; raise --rank-max for a "
                "larger, more faithful LoRA."
            )
    budget = None if target_bytes is None else target_bytes - fixed
    best, previous = None, None
    for _ in range(MAX_TRIES):
        allocation = _allocate(spectra, objective, budget, opts)
        if allocation.ranks == previous:
            break  # a larger budget buys nothing more (every layer at its cap)
        previous = allocation.ranks
        size = tensors_file_size(*_sized(plan, opts, steps, owners, allocation, fixed_tensors, complete))
        if target_bytes is None:
            best = (allocation, size)
            break
        if size <= target_bytes and (best is None or size > best[1]):
            best = (allocation, size)
        # The header grows a little with the ranks: move the triplets' budget by the
        # difference until the file is as large as the target allows.
        if size <= target_bytes and target_bytes - size < min(spectrum.cost for spectrum in spectra):
            break
        budget = allocation.bytes + target_bytes - size
    if best is None:
        raise UserError(f"--target-size {format_size(target_bytes)} could not be met; give a larger size.")
    allocation, size = best
    if opts.target_energy > 0 and allocation.captured_energy < opts.target_energy - 1e-9:
        plan.report.warnings.append(
            f"--target-energy {opts.target_energy} is out of reach at --rank-max {opts.rank_max}: every layer at its "
            f"cap keeps {allocation.captured_energy:.4f} of the model-wide delta energy; raise --rank-max to keep more."
        )
    at_cap = [True] * len(steps)
    for (index, _), rank, spectrum in zip(owners, allocation.ranks, spectra):
        at_cap[index] = at_cap[index] and rank >= len(spectrum.values)
    records = []
    for step, ranks in zip(steps, _step_ranks(steps, owners, allocation)):
        record = record_of(plan, step, step.joined(ranks, shapes_only=True))
        plan.report.add(record)
        records.append(record)
    tensors = _tensors(plan, opts, steps, owners, allocation, fixed_tensors, complete, release=True)
    if tensors_file_size(tensors, lora_file_metadata(plan, opts, tensors, opts.out, "main")) != size:
        raise RuntimeError("internal: the budget's file size changed between sizing and building")
    summary = budget_summary(opts, records, tensors, allocation, size, target_bytes)
    summary["at_cap"] = sum(at_cap)
    plan.report.budget = summary
    return tensors


def budget_summary(opts, records, tensors, allocation: Allocation, size: int, target_bytes) -> dict:
    """The report's "budget": the size and energy chosen, and ranks and bytes per group."""
    bytes_of: dict[str, int] = defaultdict(int)
    for name, tensor in tensors.items():
        bytes_of[_module_of(name)] += _nbytes(tensor)
    groups: dict[tuple, list] = defaultdict(list)
    for record in records:
        groups[(record.auxiliary, record.order, record.level, record.type)].append(record)
    rows = []
    for (auxiliary, _, level, kind), members in sorted(groups.items(), key=lambda item: item[0][:3] + (item[0][3],)):
        spent = sum(bytes_of.get(record.name, 0) for record in members)
        rows.append(
            {
                "level": level,
                "type": kind,
                "auxiliary": auxiliary,
                "n": len(members),
                "rank": sum(record.rank for record in members) / len(members),
                "bytes": spent,
            }
        )
    return {
        "target_bytes": target_bytes,
        "target_energy": opts.target_energy or None,
        "objective": opts.budget_objective,
        "bytes": size,
        "captured_objective": allocation.captured_objective,
        "captured_energy": allocation.captured_energy,
        "layers": len(records),
        "at_floor": sum(1 for record in records if record.rank <= 1),
        "at_cap": 0,  # filled in by apply_budget, which knows each part's cap
        "groups": rows,
    }


def _allocate(spectra, objective, budget, opts) -> Allocation:
    if budget is None:
        return allocate(spectra, objective, energy_target=opts.target_energy)
    try:
        return allocate(spectra, objective, budget_bytes=budget)
    except BudgetTooSmall:  # the header grew past the floors' margin: the floors it is
        return allocate(spectra, objective, budget_bytes=smallest_bytes(spectra))


def _spectra(plan: Plan, step: LayerStep) -> list[Spectrum | None]:
    """One Spectrum per part of a step (None for a part that did not change)."""
    described = iter(spectra_of(plan, step))
    result = []
    for part in step.parts:
        if part is None:
            result.append(None)
            continue
        data = next(described)
        result.append(Spectrum(data["key"], data["values"], data["total_energy"], data["weight_energy"], data["cost"]))
    return result


def _sized(plan, opts, steps, owners, allocation, fixed_tensors, complete):
    """The file's tensors on the meta device (no data) and its metadata: what sizes it."""
    tensors = _tensors(plan, opts, steps, owners, allocation, fixed_tensors, complete, shapes_only=True)
    return tensors, lora_file_metadata(plan, opts, tensors, opts.out, "main")


def _tensors(
    plan, opts, steps, owners, allocation, fixed_tensors, complete, shapes_only=False, release=False
) -> dict[str, torch.Tensor]:
    """The LoRA's tensors at ``allocation``'s ranks. ``release``: drop each layer's
    candidates once its tensors are built, so candidates and file are never both whole."""
    tensors = dict(fixed_tensors)
    for step, ranks in zip(steps, _step_ranks(steps, owners, allocation)):
        if step.unit.module is None:
            continue
        factors = step.joined(ranks, shapes_only=shapes_only)
        tensors.update(unit_tensors(plan, opts, step.unit, factors, device="meta" if shapes_only else "cpu"))
        if release:
            step.parts = []
    return complete(tensors)


def _step_ranks(steps, owners, allocation: Allocation) -> list[list[int]]:
    """``allocation.ranks`` (one per spectrum) as each step's ranks per part (0: unchanged part)."""
    ranks = [[0] * len(step.parts) for step in steps]
    for (index, part_index), rank in zip(owners, allocation.ranks):
        ranks[index][part_index] = rank
    return ranks


def _module_of(name: str) -> str:
    """The module a LoRA tensor belongs to: name less ".alpha" or its ".lora_x.weight"."""
    if name.endswith(".alpha"):
        return name[: -len(".alpha")]
    head, _, _ = name.rpartition(".weight")
    return head.rsplit(".", 1)[0] if head and head.rsplit(".", 1)[-1].startswith("lora_") else name


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

"""--list-layers: which layers a run would extract, and why the others would be left out.

A dry run: it reads the headers and plans the run exactly as ``extract`` does (the same
``make_plan``), then reports each floating-point weight of the base with its shape and
the plan's decision. No tensor is read, no SVD computed, nothing written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from .options import ExtractOptions
from .reading import FLOAT_DTYPES

EXTRACTED = "extract"


@dataclass
class LayerLine:
    key: str  # canonical checkpoint key
    shape: tuple[int, ...]
    status: str  # EXTRACTED, or why the layer would be left out
    module: str = ""  # the LoRA module it would be written as


@dataclass
class LayerListing:
    lines: list[LayerLine]
    architecture: str
    warnings: list[str]

    @property
    def extracted(self) -> int:
        return sum(line.status == EXTRACTED for line in self.lines)

    def text(self) -> str:
        width = max((len(line.key) for line in self.lines), default=10)
        rows = []
        for line in self.lines:
            shape = "x".join(str(d) for d in line.shape)
            status = f"extract as {line.module}" if line.status == EXTRACTED and line.module else line.status
            rows.append(f"{line.key:<{width}}  {shape:>12}  {status}")
        rows.append(f"{self.extracted} of {len(self.lines)} layers would be extracted.")
        return "\n".join(rows + [f"Warning: {w}" for w in self.warnings])


def list_layers(opts: ExtractOptions, log: Callable[[str], None] | None = None) -> LayerListing:
    """Plan ``opts`` as a run would and list every layer's decision (``opts.out`` may be None)."""
    from .planning import make_plan

    log = log or (lambda message: None)
    opts.validate()
    with contextlib.ExitStack() as stack:
        plan = make_plan(opts, stack, log)
    extracted = {part: unit for unit in plan.units for part in unit.parts}
    why = {key: reason for reason, keys in plan.report.skipped.items() for key in keys}
    lines = []
    for key, shape in plan.base.shapes.items():
        if key in extracted:
            lines.append(LayerLine(key, tuple(shape), EXTRACTED, extracted[key].module or ""))
        elif key in why:
            lines.append(LayerLine(key, tuple(shape), why.pop(key)))
        elif plan.base.dtype(key) in FLOAT_DTYPES:
            lines.append(LayerLine(key, tuple(shape), "not extracted"))
    mark_zero_members(lines, plan)
    for key, reason in why.items():  # only in a variant: not a weight of the base
        shapes = [source.shapes[key] for source in plan.sources if key in source.shapes]
        lines.append(LayerLine(key, tuple(shapes[0]) if shapes else (), reason))
    return LayerListing(lines, plan.arch.name, list(plan.report.warnings))


def mark_zero_members(lines: list[LayerLine], plan) -> None:
    """A te2 attention member left out while another of its layer is extracted is written
    as zero (see lora_format.complete_attention_groups): say so beside the reason."""
    from .lora_format import WHOLE_GROUP

    groups: dict[str, list[tuple[LayerLine, bool]]] = {}
    for line in lines:
        module = line.module if line.status == EXTRACTED else plan.arch.lora_module(line.key, plan.fmt)
        match = WHOLE_GROUP.match(module or "") if line.key.endswith(".weight") else None
        if match:
            groups.setdefault(match.group(1), []).append((line, line.status == EXTRACTED))
    for members in groups.values():
        if any(extracted for _, extracted in members):
            for line, extracted in members:
                if not extracted:
                    line.status += "; written as a zero module (A1111 needs all of q/k/v/out)"

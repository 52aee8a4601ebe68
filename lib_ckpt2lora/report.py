"""The report: per-layer statistics, the original's grouped summary table, JSON.

The table keeps the original script's columns and grouping: rank, S_max, S_min and
energy are averaged over the layers of a group, ratio is the average per-layer
S_max/S_min. Main levels come first, then an "[ Auxiliary ]" part per top-level module.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from .architectures import Group
from .budget import format_size

RULE = "=" * 74
THIN = "-" * 74
TYPE_ORDER = ("Attn", "FF", "Mod", "Proj", "Cond", "Other")


@dataclass
class LayerRecord:
    name: str  # LoRA module name as written
    key: str  # canonical checkpoint key
    level: str
    type: str
    auxiliary: bool
    order: int
    shape: tuple[int, ...]
    rank: int  # 0 for a full (.diff) tensor
    s_max: float
    s_min: float
    energy: float  # captured fraction of ||delta||_F^2
    relative_delta: float  # ||delta|| / ||base||
    # Each part's candidate singular values (up to the cap), energies and byte cost per
    # triplet (layer_step.spectra_of): enough to work out any other allocation exactly.
    spectra: list[dict] = field(default_factory=list)


@dataclass
class Report:
    architecture: str = ""
    description: str = ""
    format: str = ""  # the LoRA format written (auto and neo resolved)
    loads_in: str = ""  # which loaders apply that format
    layers: list[LayerRecord] = field(default_factory=list)
    full_tensors: list[LayerRecord] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: list[str] = field(default_factory=list)
    budget: dict | None = None  # what a global rank budget chose (allocation.budget_summary)

    def add(self, record: LayerRecord) -> None:
        (self.layers if record.rank else self.full_tensors).append(record)

    def skip(self, reason: str, key: str) -> None:
        self.skipped[reason].append(key)

    # -- grouping ----------------------------------------------------------------------
    def groups(self) -> list[dict]:
        buckets: dict[tuple, list[LayerRecord]] = defaultdict(list)
        for record in self.layers:
            buckets[(record.auxiliary, record.order, record.level, record.type)].append(record)
        rows = []
        for (auxiliary, _, level, kind), records in sorted(
            buckets.items(), key=lambda item: (item[0][0], item[0][1], item[0][2], _type_rank(item[0][3]))
        ):
            n = len(records)
            rows.append(
                {
                    "level": level,
                    "type": kind,
                    "auxiliary": auxiliary,
                    "n": n,
                    "rank": sum(r.rank for r in records) / n,
                    "s_max": sum(r.s_max for r in records) / n,
                    "s_min": sum(r.s_min for r in records) / n,
                    "ratio": sum(r.s_max / r.s_min if r.s_min > 0 else 0.0 for r in records) / n,
                    "energy": sum(r.energy for r in records) / n,
                }
            )
        return rows

    def total(self) -> dict:
        n = len(self.layers)
        if not n:
            return {"n": 0, "rank": 0.0, "energy": 0.0}
        return {
            "n": n,
            "rank": sum(r.rank for r in self.layers) / n,
            "energy": sum(r.energy for r in self.layers) / n,
        }

    # -- text --------------------------------------------------------------------------
    def summary_text(self) -> str:
        lines = [RULE, "LoRA Summary", RULE, _row("Level", "Type", "n", "rank", "S_max", "S_min", "ratio", "energy"), THIN]
        previous_level, in_auxiliary = None, False
        for group in self.groups():
            if previous_level is not None and group["level"] != previous_level:
                lines.append(THIN)
            if group["auxiliary"] and not in_auxiliary:
                lines.append("[ Auxiliary ]" + "-" * (len(THIN) - len("[ Auxiliary ]")))
                in_auxiliary = True
            label = group["level"] if group["level"] != previous_level else ""
            lines.append(
                _row(
                    label,
                    group["type"],
                    str(group["n"]),
                    f"{group['rank']:.1f}",
                    _number(group["s_max"]),
                    _number(group["s_min"]),
                    f"{group['ratio']:.1f}x",
                    f"{100 * group['energy']:.1f}%",
                )
            )
            previous_level = group["level"]
        total = self.total()
        lines += [
            THIN,
            _row("Total", "ALL", str(total["n"]), f"{total['rank']:.1f}", "", "", "", f"{100 * total['energy']:.1f}%"),
            RULE,
        ]
        extra = self.skipped_lines()
        return "\n".join(lines + extra)

    def skipped_lines(self) -> list[str]:
        lines = []
        if self.full_tensors:
            lines.append(f"Full tensors (.diff/.diff_b): {len(self.full_tensors)}")
        for reason, keys in self.skipped.items():
            if keys:
                sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
                lines.append(f"Skipped, {reason}: {len(keys)} ({sample})")
        return lines

    def verbose_text(self) -> str:
        lines = [f"{'layer':<64} {'shape':>16} {'rank':>5} {'S_max':>9} {'S_min':>9} {'energy':>7}"]
        for r in self.layers + self.full_tensors:
            shape = "x".join(str(d) for d in r.shape)
            lines.append(f"{r.name[:64]:<64} {shape:>16} {r.rank:>5} {r.s_max:>9.4f} {r.s_min:>9.4f} {100 * r.energy:>6.1f}%")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "architecture": self.architecture,
            "description": self.description,
            "format": self.format,
            "loads_in": self.loads_in,
            "groups": self.groups(),
            "total": self.total(),
            "layers": [_record_dict(r) for r in self.layers],
            "full_tensors": [_record_dict(r) for r in self.full_tensors],
            "skipped": {reason: list(keys) for reason, keys in self.skipped.items() if keys},
            "warnings": list(self.warnings),
            "budget": self.budget,
        }

    def budget_lines(self) -> list[str]:
        """What a global rank budget chose, in words: size, energy, ranks and bytes per group."""
        budget = self.budget
        if not budget:
            return []
        wanted = (
            f"target {format_size(budget['target_bytes'])}"
            if budget.get("target_bytes")
            else f"target {100 * budget['target_energy']:.4g}% of the delta energy"
        )
        lines = [
            f"Rank budget ({budget['objective']}): {format_size(budget['bytes'])} written ({wanted}); "
            f"{100 * budget['captured_energy']:.1f}% of the model-wide delta energy kept "
            f"({100 * budget['captured_objective']:.1f}% of the objective); {budget['layers']} layers, "
            f"{budget['at_cap']} at the rank cap, {budget['at_floor']} at rank 1.",
            f"{'Level':<22}{'Type':<6}{'n':>5}{'rank':>7}{'MB':>9}{'share':>8}",
        ]
        spent = sum(group["bytes"] for group in budget["groups"]) or 1
        for group in budget["groups"]:
            level = ("[Aux] " if group["auxiliary"] else "") + group["level"]
            lines.append(
                f"{level[:21]:<22}{group['type']:<6}{group['n']:>5}{group['rank']:>7.1f}"
                f"{group['bytes'] / 1e6:>9.2f}{100 * group['bytes'] / spent:>7.1f}%"
            )
        return lines


def record_for(name: str, key: str, group: Group, shape, rank, s_max, s_min, energy, relative_delta) -> LayerRecord:
    return LayerRecord(
        name, key, group.level, group.type, group.auxiliary, group.order, tuple(shape), rank, s_max, s_min, energy, relative_delta
    )


def _record_dict(record: LayerRecord) -> dict:
    data = asdict(record)
    data["shape"] = list(record.shape)
    return data


def _number(value: float) -> str:
    """Two decimals like the original, but small singular values keep 3 significant digits."""
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.3g}"


def _type_rank(kind: str) -> int:
    return TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER)


def _row(level, kind, n, rank, s_max, s_min, ratio, energy) -> str:
    return f"{level:<16}{kind:<6}{n:>5}{rank:>7}{s_max:>9}{s_min:>9}{ratio:>8}{energy:>8}"

"""Per-layer captured energy of a written LoRA against the optimal one of the same rank.

For every checkpoint weight the LoRA touches:

    ours    = 1 - ||D - R||_F^2 / ||D||_F^2      D = variant - base (fp32, flattened),
                                                  R = the LoRA's up @ down * scale, rebuilt
                                                  from the file (row slices for split q/k/v)
    optimal = sum(s[:r]^2) / sum(s^2)             s = exact singular values of D, r = the
                                                  LoRA's rank on that weight

The exact spectra come from the peer run's ``--spectra`` file when given, else they are
computed here. The LoRA file is read generically (kohya ``lora_down/lora_up/alpha`` or
peft ``lora_A/lora_B`` [+ ``alpha``]); module names are mapped back to checkpoint rows by
``keymap.py``, the one place that knows about naming.

    python benchmarks/evaluate.py --base B --variant V --lora ours.safetensors \\
        [--spectra peer_spectra.pt] [--report report.json] [--json-out eval.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

try:
    from . import keymap
    from .stio import PlainReader
except ImportError:  # run as a script
    import keymap
    from stio import PlainReader

Rows = keymap.Rows

_SUFFIXES = keymap.LORA_SUFFIXES


@dataclass
class Module:
    name: str
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


def read_lora(path: Path) -> tuple[dict[str, Module], list[str]]:
    """Modules of a LoRA file, and the keys that are not plain LoRA factors."""
    sd = load_file(str(path))
    modules: dict[str, Module] = {}
    other: list[str] = []
    for key, value in sd.items():
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                module = modules.setdefault(name, Module(name))
                if role == "alpha":
                    module.alpha = float(value.float().item())
                else:
                    setattr(module, role, value)
                break
        else:
            other.append(key)
    incomplete = [m.name for m in modules.values() if m.up is None or m.down is None]
    for name in incomplete:
        other.append(name + " (incomplete)")
        del modules[name]
    return modules, other


def energy_of_rank(s: torch.Tensor, r: int) -> float:
    e = s.double().square()
    total = float(e.sum())
    return float(e[:r].sum()) / total if total > 0 else 1.0


def effective_rank(parts: list[tuple[Rows, Module]]) -> int:
    """Rank of the rebuilt product: factors that share one down (a fused module split by
    rows of up) count once."""
    downs = [m.down for _, m in parts]
    if len(parts) > 1 and all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs):
        return parts[0][1].rank
    return sum(m.rank if rows is None else min(m.rank, rows[1] - rows[0]) for rows, m in parts)


def evaluate(base: Path, variant: Path, lora: Path, spectra_path: Path | None = None,
             report_path: Path | None = None, device: str = "cpu", use_engine: bool = True,
             max_seconds: float = 0) -> dict:
    t0 = time.perf_counter()
    dev = torch.device(device)
    modules, other = read_lora(lora)
    spectra = {}
    if spectra_path is not None and Path(spectra_path).exists():
        spectra = torch.load(spectra_path, weights_only=True)["spectra"]
    report_ranks: dict[str, int] = {}
    report_energy: dict[str, float] = {}
    if report_path is not None and Path(report_path).exists():
        for layer in json.loads(Path(report_path).read_text()).get("layers", []):
            if layer.get("key") is not None and layer.get("rank"):
                report_ranks[layer["key"]] = int(layer["rank"])
                if layer.get("energy") is not None:
                    report_energy[layer["key"]] = float(layer["energy"])
    layers = []
    with PlainReader(base) as rb, PlainReader(variant) as rv:
        shapes = {k: i.shape for k, i in rb.infos.items() if i.dtype.is_floating_point}
        targets, unmatched, source = keymap.lora_targets(list(modules), base, shapes, use_engine)
        mismatches = keymap.cross_check(list(modules), base, shapes) if source == "engine" else []
        per_unit: dict[keymap.Unit, list[tuple[Rows, Module]]] = {}
        for name, parts in targets.items():
            for unit, rows in parts:
                per_unit.setdefault(unit, []).append((rows, modules[name]))
        by_raw: dict[str, list[keymap.Unit]] = {}
        for unit in per_unit:
            by_raw.setdefault(unit.raw_key, []).append(unit)
        stopped = False
        for raw_key in sorted(by_raw, key=lambda k: rb.infos[k].begin):
            if max_seconds and layers and time.perf_counter() - t0 > max_seconds:
                stopped = True
                break
            b = rb.get(raw_key).to(device=dev, dtype=torch.float32)
            full = rv.get(raw_key).to(device=dev, dtype=torch.float32).sub_(b).flatten(1)
            del b
            for unit in sorted(by_raw[raw_key], key=lambda u: u.rows or (0, 0)):
                d = full if unit.rows is None else full[unit.rows[0]:unit.rows[1]]
                approx = torch.zeros_like(d)
                for rows, m in per_unit[unit]:
                    up = m.up.to(device=dev, dtype=torch.float32).flatten(1)
                    if rows is not None:
                        up = up[rows[0]:rows[1]]
                    down = m.down.to(device=dev, dtype=torch.float32).flatten(1)
                    approx.add_(up @ down, alpha=m.scale)
                d_norm2 = float(d.double().square().sum())
                err2 = float((d - approx).double().square().sum())
                ours = 1.0 - err2 / d_norm2 if d_norm2 > 0 else 1.0
                r = effective_rank(per_unit[unit])
                s = spectra.get(raw_key) if unit.rows is None else None
                if s is None:
                    s = torch.linalg.svdvals(d).cpu()
                optimal = energy_of_rank(s, r)
                layers.append({
                    "key": unit.name, "raw_key": raw_key, "rows": list(unit.rows) if unit.rows else None,
                    "shape": list(d.shape), "modules": len(per_unit[unit]), "rank": r,
                    "report_rank": report_ranks.get(unit.name), "report_energy": report_energy.get(unit.name),
                    "ours": ours, "optimal": optimal,
                    "ratio": ours / optimal if optimal > 0 else 1.0,
                })
    covered = {unit.name for unit in per_unit}
    ratios = [x["ratio"] for x in layers]
    reported = [abs(x["report_energy"] - x["ours"]) for x in layers if x["report_energy"] is not None]
    summary = {
        "mapping": source,
        "layers": len(layers),
        "layers_in_lora": sum(len(units) for units in by_raw.values()),
        "stopped_early": stopped,
        "min_ratio": min(ratios) if ratios else None,
        "mean_ratio": sum(ratios) / len(ratios) if ratios else None,
        "worst": sorted(layers, key=lambda x: x["ratio"])[:5],
        "unmatched_modules": unmatched,
        "other_keys": other,
        "report_layers_not_in_lora": sorted(set(report_ranks) - covered),
        "rank_mismatches": [x["key"] for x in layers if x["report_rank"] not in (None, x["rank"])],
        "mapping_disagreements": mismatches,
        "max_report_energy_error": max(reported) if reported else None,
    }
    return {"summary": summary, "layers": layers}


def format_summary(result: dict) -> str:
    s = result["summary"]
    if not s["layers"]:
        return "energy: no layer of the LoRA could be matched to the checkpoint"
    counted = f"{s['layers']} layers" + (f" (time limit: {s['layers']} of {s['layers_in_lora']})"
                                         if s.get("stopped_early") else "")
    lines = [f"energy, ours vs optimal at the same rank, {counted} (names: {s['mapping']}): "
             f"min ratio {s['min_ratio']:.5f}, mean {s['mean_ratio']:.5f}"]
    if s.get("max_report_energy_error") is not None:
        lines.append(f"  the report's per-layer energy differs from the energy measured on the file by at most "
                     f"{s['max_report_energy_error']:.2e}")
    for x in s["worst"]:
        lines.append(f"  {x['key']:<60} r={x['rank']:<3} ours {x['ours']:.5f}  optimal {x['optimal']:.5f}"
                     f"  ratio {x['ratio']:.5f}")
    for label in ("unmatched_modules", "other_keys", "report_layers_not_in_lora", "rank_mismatches",
                  "mapping_disagreements"):
        if s[label]:
            lines.append(f"  {label.replace('_', ' ')}: {len(s[label])}: {s[label][:5]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--variant", type=Path, required=True)
    ap.add_argument("--lora", type=Path, required=True)
    ap.add_argument("--spectra", type=Path, help="the peer run's --spectra file (else computed here)")
    ap.add_argument("--report", type=Path, help="our --report-json, to cross-check ranks and coverage")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--no-engine-names", action="store_true", help="map names with the benchmark's own rules only")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop after this long (0 = every layer)")
    args = ap.parse_args(argv)
    result = evaluate(args.base, args.variant, args.lora, args.spectra, args.report, args.device,
                      use_engine=not args.no_engine_names, max_seconds=args.max_seconds)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    print(format_summary(result))
    return 0 if result["summary"]["layers"] and not math.isnan(result["summary"]["min_ratio"]) else 1


if __name__ == "__main__":
    sys.exit(main())

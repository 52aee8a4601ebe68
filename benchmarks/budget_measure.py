"""Fidelity of written LoRA files, measured from the files themselves, layer by layer.

For every canonical weight (Z-Image: q, k and v separately) that a LoRA touches:

    D = variant - base (fp32, flattened), L = the LoRA's product with the alpha scale the
    loaders apply (alpha / rank, kohya and peft alike; row slices for a fused module)
    relative error  = ||D - L||_F / ||D||_F
    output error    = ||(L - D) x|| / ||D x||   for a batch of Gaussian x (as
                      lib_ckpt2lora/demo.py::fidelity computes it: ((W+L)x - (W+D)x) /
                      ((W+D)x - Wx)); the probes are seeded per layer, so every LoRA
                      of one pair sees the same x

and over the model: the captured energy 1 - sum ||D-L||^2 / sum ||D||^2 (energy-weighted),
the worst layer's relative error and the mean output error over layers.

Several LoRAs of one pair are measured in one pass: each checkpoint tensor pair is read
once (plain positioned reads, one tensor at a time), so memory stays at a few layers
whatever the model's size; the LoRA factors are read per module (safetensors mmap).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

try:
    from . import keymap
    from .stio import PlainReader
except ImportError:  # run as a script
    import keymap
    from stio import PlainReader

_SUFFIXES = keymap.LORA_SUFFIXES


@dataclass
class ModuleKeys:
    """Where one LoRA module's tensors are in its file (read lazily, one module at a time)."""

    name: str
    up: str | None = None
    down: str | None = None
    alpha: str | None = None


def module_index(handle) -> tuple[dict[str, ModuleKeys], list[str]]:
    modules: dict[str, ModuleKeys] = {}
    other: list[str] = []
    for key in handle.keys():
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                setattr(modules.setdefault(name, ModuleKeys(name)), role, key)
                break
        else:
            other.append(key)
    incomplete = [name for name, m in modules.items() if m.up is None or m.down is None]
    for name in incomplete:
        other.append(name + " (incomplete)")
        del modules[name]
    return modules, other


def product(handle, module: ModuleKeys, rows: keymap.Rows) -> torch.Tensor:
    """up @ down * alpha / rank, as a loader applies it (fp32; the rows that land on one part)."""
    up = handle.get_tensor(module.up).float().flatten(1)
    down = handle.get_tensor(module.down).float().flatten(1)
    scale = 1.0
    if module.alpha is not None:
        scale = float(handle.get_tensor(module.alpha).float().item()) / down.shape[0]
    if rows is not None:
        up = up[rows[0]:rows[1]]
    return (up @ down).mul_(scale)


def probes(key: str, columns: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
    return torch.randn(columns, count, generator=generator)


def measure(base: Path, variant: Path, loras: dict[str, Path], probe_count: int = 64, seed: int = 0) -> dict:
    """label -> {"layers": [{key, rank?, relative_error, output_error, delta_energy, error_energy}], "summary"}."""
    handles = {label: safe_open(str(path), "pt") for label, path in loras.items()}
    per_lora: dict[str, dict[keymap.Unit, list[tuple[keymap.Rows, ModuleKeys]]]] = {}
    problems: dict[str, list[str]] = {}
    with PlainReader(base) as rb, PlainReader(variant) as rv:
        shapes = {k: i.shape for k, i in rb.infos.items() if i.dtype.is_floating_point}
        for label, handle in handles.items():
            modules, other = module_index(handle)
            targets, unmatched, _ = keymap.lora_targets(list(modules), base, shapes)
            units: dict[keymap.Unit, list[tuple[keymap.Rows, ModuleKeys]]] = {}
            for name, parts in targets.items():
                for unit, rows in parts:
                    units.setdefault(unit, []).append((rows, modules[name]))
            per_lora[label] = units
            problems[label] = [f"not a LoRA factor: {k}" for k in other] + [f"unplaced module: {m}" for m in unmatched]
        all_units = {unit for units in per_lora.values() for unit in units}
        by_raw: dict[str, list[keymap.Unit]] = {}
        for unit in all_units:
            by_raw.setdefault(unit.raw_key, []).append(unit)
        layers: dict[str, list[dict]] = {label: [] for label in loras}
        for raw_key in sorted(by_raw, key=lambda k: rb.infos[k].begin):
            base_w = rb.get(raw_key).to(torch.float32, copy=True)  # the reader reuses its buffer
            full = rv.get(raw_key).to(torch.float32, copy=True).sub_(base_w).flatten(1)
            del base_w
            for unit in sorted(by_raw[raw_key], key=lambda u: u.rows or (0, 0)):
                d = full if unit.rows is None else full[unit.rows[0]:unit.rows[1]]
                x = probes(unit.name, d.shape[1], probe_count, seed)
                dx = d @ x
                d_energy = float(d.double().square().sum())
                dx_norm = float(dx.norm())
                for label, units in per_lora.items():
                    if unit not in units:
                        continue
                    approx = torch.zeros_like(d)
                    for rows, module in units[unit]:
                        approx.add_(product(handles[label], module, rows))
                    error = approx.sub_(d)
                    e_energy = float(error.double().square().sum())
                    output = float((error @ x).norm())
                    layers[label].append({
                        "key": unit.name,
                        "delta_energy": d_energy,
                        "error_energy": e_energy,
                        "relative_error": math.sqrt(e_energy / d_energy) if d_energy > 0 else 0.0,
                        "output_error": output / dx_norm if dx_norm > 0 else 0.0,
                    })
                    del approx, error
    result = {}
    for label, path in loras.items():
        result[label] = {"file": str(path), "bytes": Path(path).stat().st_size, "layers": layers[label],
                         "problems": problems[label], "summary": summarise(layers[label])}
    return result


def summarise(layers: list[dict]) -> dict:
    if not layers:
        return {"layers": 0, "energy": float("nan"), "worst_relative_error": float("nan"),
                "mean_output_error": float("nan"), "mean_relative_error": float("nan")}
    total = math.fsum(x["delta_energy"] for x in layers)
    lost = math.fsum(x["error_energy"] for x in layers)
    worst = max(layers, key=lambda x: x["relative_error"])
    return {
        "layers": len(layers),
        "energy": 1.0 - lost / total if total > 0 else 1.0,
        "worst_relative_error": worst["relative_error"],
        "worst_layer": worst["key"],
        "mean_output_error": math.fsum(x["output_error"] for x in layers) / len(layers),
        "mean_relative_error": math.fsum(x["relative_error"] for x in layers) / len(layers),
    }

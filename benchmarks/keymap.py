"""Naming, in one place: which checkpoint rows each LoRA module and each report layer addresses.

The engine names layers by *canonical* keys (Z-Image: diffusers names, the fused
``attention.qkv`` split into to_q/to_k/to_v row ranges) and writes LoRA modules in its
own formats. The benchmark needs, for every such name, the raw checkpoint key and row
range it covers. The engine's own mapping (``lib_ckpt2lora.architectures`` +
``lora_input.alias_index``) is used when it imports; an independent fallback below
covers the layouts this benchmark generates (Z-Image original layout; SD1.5 ldm UNet +
CLIP-L), and ``cross_check`` reports where the two disagree.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

Rows = tuple[int, int] | None


# A LoRA tensor's name suffix -> its role, for kohya and peft spellings alike.
LORA_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}


@dataclass(frozen=True)
class Unit:
    """One layer as the benchmark evaluates it: rows of a raw checkpoint tensor."""

    raw_key: str
    rows: Rows
    name: str  # the canonical key (for display and to match report layers)


# ------------------------------------------------------------------------ engine


def _engine():
    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path and (Path(repo) / "lib_ckpt2lora").is_dir():
        sys.path.append(repo)  # run as a script from anywhere: the engine beside benchmarks/
    try:
        from lib_ckpt2lora.architectures import FileView, detect
        from lib_ckpt2lora.lora_input import alias_index, normalise
        from lib_ckpt2lora.reading import TensorFile
    except ImportError:
        return None
    return FileView, detect, alias_index, normalise, TensorFile


def _engine_view(base: Path):
    eng = _engine()
    if eng is None:
        return None
    FileView, detect, alias_index, normalise, TensorFile = eng
    with TensorFile(base, role="base") as f:
        arch = detect(f.infos)
        view = FileView.build(f, arch)
        index = alias_index(arch, view)
    return view, index, normalise


def canonical_units(base: Path, infos: dict[str, tuple[int, ...]], use_engine: bool = True) -> dict[str, Unit]:
    """Canonical key -> Unit for every tensor of the base (``infos``: raw key -> shape)."""
    ev = _engine_view(base) if use_engine else None
    if ev is not None:
        view = ev[0]
        return {key: Unit(ref.key, ref.rows, key) for key, ref in view.refs.items()}
    return _fallback_units(infos)


def lora_targets(module_names: list[str], base: Path, infos: dict[str, tuple[int, ...]], use_engine: bool = True
                 ) -> tuple[dict[str, list[tuple[Unit, Rows]]], list[str], str]:
    """LoRA module -> [(unit, rows of the module's up that land on it)], unmatched modules, source."""
    ev = _engine_view(base) if use_engine else None
    if ev is None:
        targets, unmatched = _fallback_targets(module_names, infos)
        return targets, unmatched, "benchmark fallback"
    view, index, normalise = ev
    targets: dict[str, list[tuple[Unit, Rows]]] = {}
    unmatched = []
    for name in module_names:
        target = index.get(normalise(name))
        if target is None or not target.parts:
            unmatched.append(name)
            continue
        targets[name] = [(Unit(view.refs[key].key, view.refs[key].rows, key), rows) for key, rows in target.parts]
    return targets, unmatched, "engine"


def raw_ranks(report: dict, units: dict[str, Unit], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Our per-layer ranks as ranks per raw checkpoint tensor (for the peer, which factors
    whole tensors): a fused tensor gets the sum of its parts' ranks, capped at its size."""
    ranks: dict[str, int] = {}
    for layer in report.get("layers", []):
        unit = units.get(layer.get("key"))
        if unit is None or not layer.get("rank"):
            continue
        ranks[unit.raw_key] = ranks.get(unit.raw_key, 0) + int(layer["rank"])
    for key, r in ranks.items():
        shape = shapes[key]
        ranks[key] = min(r, shape[0], _prod(shape[1:]))
    return ranks


def cross_check(module_names: list[str], base: Path, infos: dict[str, tuple[int, ...]]) -> list[str]:
    """Modules whose raw-key coverage differs between the engine's mapping and the fallback."""
    eng, _, source = lora_targets(module_names, base, infos, use_engine=True)
    if source != "engine":
        return []
    own, _ = _fallback_targets(module_names, infos)
    differ = []
    for name in module_names:
        a = {u.raw_key for u, _ in eng.get(name, [])}
        b = {u.raw_key for u, _ in own.get(name, [])}
        if a != b:
            differ.append(f"{name}: engine {sorted(a)} vs fallback {sorted(b)}")
    return differ


# ---------------------------------------------------------------------- fallback

_LORA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lycoris_", "base_model.model.",
                  "transformer.", "diffusion_model.", "unet.", "text_encoder.")
_CKPT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "cond_stage_model.transformer.",
                  "cond_stage_model.", "model.", "transformer.")
_ZIMAGE_RENAMES = (("x_embedder", "all_x_embedder.2-1"), ("final_layer", "all_final_layer.2-1"))


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _norm(name: str) -> str:
    return re.sub(r"[._]", "_", name).lower()


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _zimage_diffusers(module: str) -> str:
    module = module.replace("attention.out", "attention.to_out.0")
    module = module.replace("attention.q_norm", "attention.norm_q").replace("attention.k_norm", "attention.norm_k")
    for old, new in _ZIMAGE_RENAMES:
        if module == old or module.startswith(old + "."):
            module = new + module[len(old):]
    return module


def _fallback_units(infos: dict[str, tuple[int, ...]]) -> dict[str, Unit]:
    zimage = any(k.endswith("attention.qkv.weight") for k in infos)
    units = {}
    for key, shape in infos.items():
        if zimage:
            module, _, param = key.rpartition(".")
            if module.endswith("attention.qkv") and param == "weight":
                third = shape[0] // 3
                for i, x in enumerate("qkv"):
                    name = f"{_zimage_diffusers(module[:-3])}to_{x}.weight"
                    units[name] = Unit(key, (i * third, (i + 1) * third), name)
                continue
            name = f"{_zimage_diffusers(module)}.{param}" if module else key
            units[name] = Unit(key, None, name)
        else:
            units[key] = Unit(key, None, key)
    return units


def _sd_unet_diffusers_names(keys: list[str]) -> dict[str, str]:
    """ldm UNet key -> diffusers key, via diffusers' own converter when it is installed."""
    unet = [k for k in keys if k.startswith("model.diffusion_model.")]
    if not unet:
        return {}
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        converted = convert_ldm_unet_checkpoint({k: k for k in unet}, {"layers_per_block": 2})
    except Exception:  # noqa: BLE001 - no diffusers, or a layout it does not know: no aliases
        return {}
    return {ldm: diffusers for diffusers, ldm in converted.items() if isinstance(ldm, str)}


def _fallback_targets(module_names: list[str], infos: dict[str, tuple[int, ...]]
                      ) -> tuple[dict[str, list[tuple[Unit, Rows]]], list[str]]:
    units = _fallback_units(infos)
    sd_unet = _sd_unet_diffusers_names(list(infos))
    index: dict[str, list[tuple[Unit, Rows]]] = {}

    def add(alias: str, parts: list[tuple[Unit, Rows]]) -> None:
        index.setdefault(_norm(alias), parts)

    by_raw: dict[str, list[Unit]] = {}
    for unit in units.values():
        by_raw.setdefault(unit.raw_key, []).append(unit)
    for name, unit in units.items():
        if len(infos[unit.raw_key]) < 2 or not name.endswith(".weight"):
            continue
        stem = name.removesuffix(".weight")
        add(stem, [(unit, None)])
        add(_strip(stem, _CKPT_PREFIXES), [(unit, None)])
        raw_stem = unit.raw_key.removesuffix(".weight")
        if unit.rows is None:
            add(raw_stem, [(unit, None)])
            add(_strip(raw_stem, _CKPT_PREFIXES), [(unit, None)])
        if unit.raw_key in sd_unet:
            add(sd_unet[unit.raw_key].removesuffix(".weight"), [(unit, None)])
    for raw_key, parts in by_raw.items():  # fused modules (e.g. ComfyUI's qkv) cover all row parts
        if len(parts) > 1:
            ordered = sorted(parts, key=lambda u: u.rows[0])
            covered = [(u, (u.rows[0], u.rows[1])) for u in ordered]
            add(_strip(raw_key.removesuffix(".weight"), _CKPT_PREFIXES), covered)
    targets: dict[str, list[tuple[Unit, Rows]]] = {}
    unmatched = []
    for name in module_names:
        hit = index.get(_norm(name)) or index.get(_norm(_strip(name, _LORA_PREFIXES)))
        if hit is None:
            unmatched.append(name)
        else:
            targets[name] = hit
    return targets, unmatched

"""The peers' extraction algorithm, as the benchmark's reference (run (b)).

What the widely used extractors do (kohya's extract_lora_from_models, ComfyUI's
LoraSave/ModelUtils and their descendants), reduced to its cost-determining steps:

1. load both state dicts whole (``safetensors.torch.load_file``);
2. for every eligible weight: delta = variant.float() - base.float(), flattened to
   [out, in*k*k], and a full ``torch.linalg.svd(delta, full_matrices=False)``;
3. keep the top r singular triplets (r per layer: the rank our run chose, read from its
   ``--report-json``, or else the same automatic rule applied to the exact spectrum),
   up = U_r * S_r, down = Vh_r;
4. save the LoRA with ``safetensors.torch.save_file``.

It also writes every layer's exact singular values (``--spectra``) so that the
benchmark can compute the optimal captured energy of any rank afterwards.

    python benchmarks/peer_full_svd.py --base B --variant V --out peer.safetensors \\
        [--ranks-from report.json] [--spectra spectra.pt] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def eligible(shape: tuple[int, ...], min_dim: int) -> bool:
    """2-D weights and conv kernels whose flattened matrix has both sides >= min_dim."""
    if len(shape) < 2:
        return False
    return min(shape[0], math.prod(shape[1:])) >= min_dim


def auto_rank(s: torch.Tensor, thresh: float, rank_max: int) -> int:
    """Smallest r with sum(s[:r]^2) / sum(s^2) >= thresh, capped at rank_max."""
    e = s.double().square()
    total = e.sum()
    if total <= 0:
        return 0
    cum = e.cumsum(0) / total
    r = int((cum < thresh - 1e-12).sum().item()) + 1
    return min(r, rank_max, len(s))


def ranks_from_report(path: Path) -> dict[str, int]:
    """Checkpoint key -> rank from our CLI's ``--report-json`` ("layers": [{"key", "rank"}, ...])."""
    report = json.loads(Path(path).read_text())
    ranks: dict[str, int] = {}
    for layer in report.get("layers", []):
        key = layer.get("key")
        if key is None or layer.get("rank") is None:
            continue
        ranks[key] = max(ranks.get(key, 0), int(layer["rank"]))
    return ranks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Peers' algorithm: whole state dicts + full SVD per weight.")
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--variant", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ranks-from", type=Path, help="our --report-json: use the rank it chose per layer, "
                    "and process exactly its layers")
    ap.add_argument("--rank-thresh", type=float, default=0.95)
    ap.add_argument("--rank-max", type=int, default=64)
    ap.add_argument("--min-dim", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spectra", type=Path, help="write {key: singular values} here (torch.save)")
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="stop factoring after this long and extrapolate the total from the work done "
                         "(cost of a layer ~ m*n*min(m,n)); 0 = run to the end")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    device = torch.device(args.device)
    base = load_file(str(args.base))
    variant = load_file(str(args.variant))
    t_load = time.perf_counter() - t0
    ranks = ranks_from_report(args.ranks_from) if args.ranks_from else None

    todo = []
    for key in sorted(base):
        w = base[key]
        if not w.is_floating_point():
            continue
        if ranks is not None:
            if key not in ranks:
                continue
        elif not eligible(tuple(w.shape), args.min_dim) or key not in variant:
            continue
        todo.append(key)

    def cost(key: str) -> float:
        m, n = base[key].shape[0], math.prod(base[key].shape[1:])
        return float(m) * n * min(m, n)

    out: dict[str, torch.Tensor] = {}
    spectra: dict[str, torch.Tensor] = {}
    chosen: dict[str, int] = {}
    t_svd0 = time.perf_counter()
    done_cost = 0.0
    stopped_early = False
    for key in todo:
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds and chosen:
            stopped_early = True
            break
        w = base[key]
        delta = variant[key].to(device=device, dtype=torch.float32) - w.to(device=device, dtype=torch.float32)
        delta = delta.flatten(1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = ranks[key] if ranks is not None else auto_rank(s, args.rank_thresh, args.rank_max)
        r = max(1, min(r, s.numel()))
        up = u[:, :r] * s[:r]
        down = vh[:r]
        if w.dim() == 4:  # LoCon layout
            down = down.reshape(r, *w.shape[1:])
            up = up.reshape(w.shape[0], r, 1, 1)
        name = key.removesuffix(".weight")
        out[f"{name}.lora_up.weight"] = up.to(w.dtype).cpu().contiguous()
        out[f"{name}.lora_down.weight"] = down.to(w.dtype).cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(r), dtype=w.dtype)
        spectra[key] = s.cpu()
        chosen[key] = r
        done_cost += cost(key)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_svd = time.perf_counter() - t_svd0
    if ranks is not None:
        missing = sorted(set(ranks) - set(chosen))
        if missing:
            print(f"peer: {len(missing)} layers of the report are not in the base: {missing[:5]}", file=sys.stderr)
    t_save0 = time.perf_counter()
    save_file(out, str(args.out), metadata={"ss_network_module": "networks.lora"})
    t_save = time.perf_counter() - t_save0
    total = time.perf_counter() - t0
    estimate = total
    if stopped_early:
        # Only the factoring is extrapolated; loading and saving were measured as they are.
        all_cost = sum(cost(k) for k in todo)
        estimate = t_load + t_svd * all_cost / done_cost + t_save * len(todo) / len(chosen)
    info = {"load_s": t_load, "svd_s": t_svd, "save_s": t_save, "total_s": total, "layers": len(chosen),
            "layers_planned": len(todo), "complete": not stopped_early, "estimated_total_s": estimate}
    if args.spectra:
        torch.save({"spectra": spectra, "ranks": chosen, **info}, args.spectra)
    print("peer: " + json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

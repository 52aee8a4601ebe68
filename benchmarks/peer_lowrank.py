"""The strongest peer's algorithm, as the benchmark's reference (run (p)).

Written here from its description (issue 18; no peer code): silveroxides/ComfyUI-ModelUtils'
extraction at a fixed rank, per eligible weight:

1. delta = variant.float() - base.float(), flattened to [out, in*k*k];
2. ``torch.svd_lowrank(delta, q=rank, niter=2)`` (rank 64: no oversampling, two power
   iterations);
3. the singular values clamped at their 0.99 quantile;
4. up = U * S, down = V^T, stored in fp16.

Tensors are streamed one pair at a time with the same plain reader as the I/O floor, so
the run times the algorithm, not a different way of loading. ``--energy-json J`` (untimed
use) also records, per weight, the energy its factors capture, 1 - ||D - up@down||^2 /
||D||^2, against the optimum at the same rank from the exact singular values (fp32
``svdvals``), and ``--spectra S`` writes those exact values for ``evaluate.py``.

    python benchmarks/peer_lowrank.py --base B --variant V --out peer.safetensors
        [--threads N] [--energy-json J] [--spectra S]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

try:
    from .stio import PlainReader
except ImportError:  # run as a script
    from stio import PlainReader

QUANTILE = 0.99


def factor(delta: torch.Tensor, rank: int, generator_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer's per-layer step on a 2-D fp32 delta: fp16 (up, down)."""
    q = min(rank, *delta.shape)
    torch.manual_seed(generator_seed)  # svd_lowrank draws its sketch from the global generator
    u, s, v = torch.svd_lowrank(delta, q=q, niter=2)
    s = s.clamp(max=float(torch.quantile(s, QUANTILE)))
    return (u * s).half(), v.T.contiguous().half()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--variant", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--min-dim", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--energy-json", type=Path, help="also measure each layer's energy against the optimum")
    ap.add_argument("--spectra", type=Path, help="with --energy-json: write the exact singular values here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    factors: dict[str, torch.Tensor] = {}
    layers, spectra = [], {}
    with PlainReader(args.base) as rb, PlainReader(args.variant) as rv:
        for index, (name, info) in enumerate(rb.infos.items()):
            shape = tuple(info.shape)
            if name not in rv.infos or not info.dtype.is_floating_point or len(shape) < 2:
                continue
            if min(shape[0], math.prod(shape[1:])) < args.min_dim:
                continue
            delta = (rv.get(name).float() - rb.get(name).float()).flatten(1)
            up, down = factor(delta, args.rank, index)
            stem = name.removesuffix(".weight")
            factors[stem + ".lora_up.weight"] = up
            factors[stem + ".lora_down.weight"] = down
            if args.energy_json:
                total = float(delta.double().square().sum())
                error = float((delta - up.float() @ down.float()).double().square().sum())
                exact = torch.linalg.svdvals(delta).double()
                rank = up.shape[1]
                optimum = float(exact[:rank].square().sum() / exact.square().sum()) if total > 0 else 1.0
                captured = 1 - error / total if total > 0 else 1.0
                layers.append({"key": name, "shape": list(delta.shape), "rank": rank, "energy": captured,
                               "optimal": optimum, "ratio": captured / optimum if optimum > 0 else 1.0})
                spectra[name] = exact.float()
    save_file(factors, str(args.out))
    print(f"peer_lowrank: {len(factors) // 2} layers in {time.perf_counter() - started:.1f} s")
    if args.energy_json:
        ratios = [layer["ratio"] for layer in layers]
        summary = {"layers": len(layers), "min_ratio": min(ratios), "mean_ratio": sum(ratios) / len(ratios),
                   "worst": sorted(layers, key=lambda x: x["ratio"])[:5], "all": layers}
        args.energy_json.write_text(json.dumps(summary, indent=1))
        print(f"peer energy vs optimum: worst {summary['min_ratio']:.4f}, mean {summary['mean_ratio']:.4f}")
        if args.spectra:
            torch.save({"spectra": spectra}, args.spectra)
    return 0


if __name__ == "__main__":
    sys.exit(main())

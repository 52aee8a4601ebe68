"""The SVD step alone, layer by layer, on a real pair: CPU seconds and energy vs the optimum.

Reads up to ``--per-shape`` layers of every 2-D shape of a (base, variant) pair (a fused
Z-Image ``qkv`` is factored as its three row blocks, as the engine does), forms the fp32
delta as the engine does, and times ``svd.factorize`` (default options: auto rank,
threshold 0.95, cap 64) under each policy on one thread (thread CPU time), against the
peer's per-layer step (``peer_lowrank.factor``: ``svd_lowrank(q=64, niter=2)``). Times are
scaled by how many layers of that shape the pair holds, so the totals estimate the whole
pair's SVD seconds (no read, delta or write). Energy: the fraction the factors capture,
1 - ||delta - up @ down||^2 / ||delta||^2, over the optimum at the same rank (exact
spectrum: float64 eigenvalues of the Gram matrix of the smaller side, cached under
``--cache``); ranks against the exact rule.

Policies are ``name=ATTR:VALUE,ATTR:VALUE`` settings of ``lib_ckpt2lora.svd`` module
attributes (e.g. ``bf16=BF16_ON_CPU:1``); ``default`` is the module as it is.

    python benchmarks/bench_svd_layers.py --base B --variant V [--per-shape 2] \
        [--policy bf16=BF16_ON_CPU:1] [--cache DIR] [--json-out F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from peer_lowrank import factor as peer_factor  # noqa: E402

from lib_ckpt2lora import svd  # noqa: E402

THRESHOLD, CAP, MIN_DIM = 0.95, 64, 32
NEAR_TIE = 1e-4


def layers_of(base: Path, per_shape: int) -> tuple[list[str], Counter]:
    """Up to ``per_shape`` keys of every eligible 2-D shape, and how many the pair holds."""
    chosen, counts = [], Counter()
    with safe_open(str(base), "pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            if len(shape) < 2 or min(shape[0], math.prod(shape[1:])) < MIN_DIM:
                continue
            matrix = (shape[0], math.prod(shape[1:]))
            counts[matrix] += 1
            if counts[matrix] <= per_shape:
                chosen.append(key)
    return chosen, counts


def exact_spectrum(delta: torch.Tensor, cache: Path, key: str) -> torch.Tensor:
    """All singular values, float64 (eigenvalues of the smaller Gram matrix), cached."""
    digest = hashlib.sha1(delta[:64, :64].numpy().tobytes() + str(tuple(delta.shape)).encode()).hexdigest()[:12]
    path = cache / f"{key.replace('/', '_')}.{digest}.pt"
    if path.exists():
        return torch.load(path)
    a = delta.double()
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    values = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(values, path)
    return values


def parse_policy(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition("=")
    values = {}
    for item in filter(None, settings.split(",")):
        attr, _, raw = item.partition(":")
        values[attr] = type(getattr(svd, attr))(float(raw)) if not isinstance(getattr(svd, attr), bool) else raw in ("1", "true")
    return name, values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--variant", type=Path, required=True)
    ap.add_argument("--per-shape", type=int, default=2)
    ap.add_argument("--policy", action="append", default=[], help="name=ATTR:VALUE,... (repeatable)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="time each step this many times, keep the least")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/ckpt2lora_spectra"))
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    policies = [("default", {})] + [parse_policy(p) for p in args.policy]
    saved = {attr: getattr(svd, attr) for _, values in policies for attr in values}
    keys, counts = layers_of(args.base, args.per_shape)
    sampled = Counter()
    seconds = defaultdict(lambda: defaultdict(float))  # policy -> shape -> CPU s
    worst = defaultdict(lambda: (2.0, ""))
    mismatches = defaultdict(int)
    ratios = defaultdict(list)
    krylov_blocks = defaultdict(list)  # policy -> Krylov blocks per factorization (the kept energy is measured once per block)
    measured = svd._ritz_energies
    calls = [0]

    def counting(*a, **k):
        calls[0] += 1
        return measured(*a, **k)

    svd._ritz_energies = counting
    with safe_open(str(args.base), "pt") as hb, safe_open(str(args.variant), "pt") as hv:
        for key in keys:
            delta = (hv.get_tensor(key).float() - hb.get_tensor(key).float()).flatten(1)
            shape = tuple(delta.shape)
            sampled[shape] += 1
            blocks = delta.split(shape[1]) if "qkv" in key and shape[0] == 3 * shape[1] else [delta]
            for index, block in enumerate(blocks):
                block = block.contiguous()
                exact = exact_spectrum(block, args.cache, f"{key}.{index}")
                cumulative = torch.cumsum(exact**2, 0) / float((exact**2).sum())
                expected = min(int(torch.nonzero(cumulative >= THRESHOLD - 1e-12)[0]) + 1, CAP)
                total = svd.squared_norm(block)
                for name, values in policies:
                    for attr, value in values.items():
                        setattr(svd, attr, value)
                    try:
                        best = float("inf")
                        calls[0] = 0
                        for _ in range(args.repeats):
                            started = time.thread_time()
                            fact = svd.factorize(
                                block,
                                threshold=THRESHOLD,
                                cap=CAP,
                                total_energy=total,
                                generator=torch.Generator().manual_seed(0),
                            )
                            best = min(best, time.thread_time() - started)
                    finally:
                        for attr, value in saved.items():
                            setattr(svd, attr, value)
                    seconds[name][shape] += best
                    krylov_blocks[name].append(calls[0] / args.repeats)
                    optimum = float(cumulative[fact.rank - 1])
                    # What the factors really capture (after bf16 products the values carry
                    # ~1e-4 of rounding either way; the factors' energy is what a LoRA keeps).
                    captured = 1 - svd.squared_norm(block - fact.up @ fact.down) / total
                    ratio = captured / optimum
                    ratios[name].append(ratio)
                    if ratio < worst[name][0]:
                        worst[name] = (ratio, f"{key}[{index}] r{fact.rank}")
                    if fact.rank != expected:
                        tie = min(abs(float(cumulative[r - 1]) - THRESHOLD) for r in (fact.rank, expected))
                        if not (abs(fact.rank - expected) == 1 and tie <= NEAR_TIE):
                            mismatches[name] += 1
                            print(f"  rank {name} {key}[{index}]: {fact.rank} vs exact {expected} (tie {tie:.1e})")
            if not args.no_peer:
                best = float("inf")
                for _ in range(args.repeats):
                    started = time.thread_time()
                    peer_factor(delta, CAP, 0)
                    best = min(best, time.thread_time() - started)
                seconds["peer"][shape] += best
            print(f"{key} {shape}: " + " ".join(f"{n} {seconds[n][shape]:.3f}" for n in seconds), flush=True)
    names = [n for n, _ in policies] + ([] if args.no_peer else ["peer"])
    scaled = {n: {s: seconds[n][s] * counts[s] / sampled[s] for s in sampled} for n in names}
    print(f"\nestimated whole-pair SVD CPU s (one thread), {sum(counts.values())} layers, {len(keys)} sampled")
    print(f"{'shape':>14} {'count':>5} " + " ".join(f"{n:>12}" for n in names))
    for shape in sorted(sampled, key=lambda s: -scaled[names[0]][s]):
        print(f"{'x'.join(map(str, shape)):>14} {counts[shape]:5d} " + " ".join(f"{scaled[n][shape]:12.3f}" for n in names))
    print(f"{'total':>14} {sum(counts.values()):5d} " + " ".join(f"{sum(scaled[n].values()):12.2f}" for n in names))
    for name, _ in policies:
        r = ratios[name]
        print(
            f"{name}: energy/optimum worst {worst[name][0]:.5f} ({worst[name][1]}), mean {sum(r) / len(r):.5f}, "
            f"rank mismatches {mismatches[name]}, Krylov blocks mean {sum(krylov_blocks[name]) / len(krylov_blocks[name]):.2f} "
            f"max {max(krylov_blocks[name]):.0f}"
        )
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "totals": {n: sum(scaled[n].values()) for n in names},
                    "per_shape": {n: {"x".join(map(str, s)): v for s, v in scaled[n].items()} for n in names},
                    "worst": {n: worst[n] for n, _ in policies},
                    "mismatches": dict(mismatches),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

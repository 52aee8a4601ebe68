"""Measure the randomized SVD's iteration policies against the exact float64 SVD.

Not a test: run ``python tests/measure_randomized_svd.py [--full]`` (nice it; --full adds
the full-width [3840,3840], [10240,3840], [3840,10240] layers, minutes on 2 cores).
For each policy (block Krylov iterations, fp32 or bf16 products) it prints the captured
energy at the automatic rank as a fraction of the optimum at that rank (worst and mean
over layers and thresholds), the rank mismatches against the exact rule, the Krylov
iterations run, and the CPU time of the randomized SVDs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
import realistic as rl  # noqa: E402

from lib_ckpt2lora import svd  # noqa: E402
from lib_ckpt2lora.rank import rank_for_energy  # noqa: E402

SPECTRA = {"noisy": dict(decay=1.0, noise=0.3), "steep": dict(decay=1.5, noise=0.1), "flat": dict(decay=0.5, noise=0.5)}
TEST_SHAPES = [(1024, 1024), (1536, 1024), (1024, 1280)]
FULL_SHAPES = [(3840, 3840), (10240, 3840), (3840, 10240)]
THRESHOLDS = (0.5, 0.8, 0.95)
CAP = 64
# name: (oversample, keyword arguments of randomized_svd, bf16 products where the CPU has them)
POLICIES = {
    "fixed 2, fp32, block 80": (16, dict(min_iterations=2, max_iterations=2, block=80), False),
    "adaptive 3e-3, fp32, block 80": (16, dict(min_iterations=1, max_iterations=8, tolerance=3e-3, block=80), False),
    "adaptive 3e-3, bf16, block 80": (16, dict(min_iterations=1, max_iterations=8, tolerance=3e-3, block=80), True),
    "adaptive 1e-3, fp32, block 48": (16, dict(min_iterations=1, max_iterations=8, tolerance=1e-3, block=48), False),
    "adaptive 3e-3, bf16, block 48": (16, dict(min_iterations=1, max_iterations=8, tolerance=3e-3, block=48), True),
    "adaptive 1e-3, bf16, block 48 (default)": (16, dict(min_iterations=1, max_iterations=8, tolerance=1e-3, block=48), True),
}


def realistic_layer(rows, cols, seed, spectrum):
    """bf16(base + delta) - bf16(base): the delta the engine sees."""
    base = (rl.WEIGHT_STD * torch.randn(rows, cols, generator=rl.generator(seed))).to(torch.bfloat16)
    delta = rl.noisy_delta(rows, cols, seed=seed + 1, **SPECTRA[spectrum])
    return (base.float() + delta).to(torch.bfloat16).float() - base.float()


def count_iterations():
    """Krylov iterations run: blocks measured after the first."""
    counter = {"blocks": 0}
    real = svd._ritz_energies

    def counting(*args, **kwargs):
        counter["blocks"] += 1
        return real(*args, **kwargs)

    return counter, counting


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="add the full-width layers")
    parser.add_argument("--only-full", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU seconds of one thread: comparable across policies
    layers = []
    if not args.only_full:
        layers += [(f"{name} {r}x{c}", r, c, s, name) for name in SPECTRA for s, (r, c) in enumerate(TEST_SHAPES)]
    if args.full or args.only_full:
        layers += [(f"{name} {r}x{c}", r, c, 100 + s, name) for name in ("noisy", "flat") for s, (r, c) in enumerate(FULL_SHAPES)]
    results = {name: [] for name in POLICIES}
    for label, rows, cols, seed, spectrum in layers:
        delta = realistic_layer(rows, cols, seed, spectrum)
        total = svd.squared_norm(delta)
        started = time.perf_counter()
        exact = torch.linalg.svdvals(delta.double())
        exact_time = time.perf_counter() - started
        cumulative = torch.cumsum(exact**2, 0) / float((exact**2).sum())
        print(f"{label}: exact float64 svdvals {exact_time:.1f} s, optimum at cap {float(cumulative[CAP - 1]):.4f}", flush=True)
        for name, (oversample, kwargs, bf16) in POLICIES.items():
            counter, counting = count_iterations()
            real, svd._ritz_energies, svd.BF16_ON_CPU = svd._ritz_energies, counting, bf16
            try:
                started = time.process_time()
                _, s, _ = svd.randomized_svd(delta, CAP + oversample, keep=CAP, generator=rl.generator(seed + 7), **kwargs)
                elapsed = time.process_time() - started
            finally:
                svd._ritz_energies, svd.BF16_ON_CPU = real, True
            for threshold in THRESHOLDS:
                rank = rank_for_energy(s, total, threshold, CAP)
                expected = min(int(torch.nonzero(cumulative >= threshold)[0]) + 1, CAP)
                captured = float((s[:rank].double() ** 2).sum()) / total
                ratio = captured / float(cumulative[rank - 1])
                results[name].append((ratio, rank != expected, counter["blocks"] - 1, elapsed, label, threshold))
    print(f"\n{len(layers)} layers x {len(THRESHOLDS)} thresholds, cap {CAP}")
    print(f"{'policy':32} {'worst':>8} {'mean':>8} {'rank!=':>6} {'iters':>9} {'CPU s':>8}  worst case")
    for name, rows in results.items():
        ratios = [r[0] for r in rows]
        worst = min(rows, key=lambda r: r[0])
        per_layer = rows[:: len(THRESHOLDS)]
        iterations = [r[2] for r in per_layer]
        by_spectrum = {}
        for r in per_layer:
            by_spectrum.setdefault(r[4].split()[0], []).append(r[2])
        spread = " ".join(f"{k}:{min(v)}-{max(v)}" for k, v in by_spectrum.items())
        seconds = sum(r[3] for r in per_layer)
        print(
            f"{name:32} {min(ratios):8.4f} {sum(ratios) / len(ratios):8.4f} {sum(r[1] for r in rows):6d} "
            f"{min(iterations)}-{max(iterations):<2} {sum(iterations) / len(iterations):4.1f} {seconds:8.2f}"
            f"  {worst[4]} @ {worst[5]}  [{spread}]"
        )


if __name__ == "__main__":
    main()

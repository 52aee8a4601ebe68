"""Where one extraction's CPU time goes, per phase and per layer shape.

Runs the CLI in this process (default settings unless ``--engine-args``) with a
TorchFunctionMode on the main thread that charges the thread CPU time of every torch call
to a phase, and to the shape of the layer being computed:

    widen     .float() / .to(): bf16/fp16 -> fp32 (and the factors' cast to the save dtype)
    delta     the subtraction variant - base
    norm      ||delta||^2 and ||W||^2 (chunked dot products)
    matmul    the sketch's and the power/Krylov iterations' products with the delta
    orth      QR (orthonormal bases)
    small     the small SVD / eigenvalue problems on the projected matrix
    other     every other torch call (slicing, cat, randn, ...)

plus, outside any torch call: "python" (the interpreter between calls), "write" (the
safetensors file) and "read" (the reader thread's CPU: process CPU - main thread CPU).

    python benchmarks/profile_phases.py --base B --variant V [--threads 1] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHASES = {
    "float": "widen", "to": "widen", "copy_": "widen",
    "sub": "delta", "__sub__": "delta", "sub_": "delta", "__rsub__": "delta",
    "dot": "norm", "vdot": "norm",
    "matmul": "matmul", "__matmul__": "matmul", "mm": "matmul",
    "linalg_qr": "orth", "qr": "orth",
    "linalg_svd": "small", "svd": "small", "linalg_eigvalsh": "small", "eigvalsh": "small", "linalg_svdvals": "small",
}


class PhaseTimer(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seconds = defaultdict(float)  # (shape, phase) -> thread CPU s
        self.shape = "(outside layers)"
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:  # a call inside a call: charged to the outer one
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        self.depth += 1
        started = time.thread_time()
        try:
            return func(*args, **kwargs)
        finally:
            self.seconds[(self.shape, PHASES.get(name, "other"))] += time.thread_time() - started
            self.depth -= 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--variant", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--engine-args", default="", help="extra CLI arguments")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import importlib

    extract_module = importlib.import_module("lib_ckpt2lora.extract")  # the package exports a function of that name
    layer_step = importlib.import_module("lib_ckpt2lora.layer_step")
    from lib_ckpt2lora.cli import main as cli_main

    timer = PhaseTimer()
    layer_calls = defaultdict(int)
    real_compute = layer_step.compute_step

    def compute_step(plan, opts, unit, *rest, **kwargs):
        timer.shape = "x".join(str(x) for x in unit.shape)
        layer_calls[timer.shape] += 1
        try:
            return real_compute(plan, opts, unit, *rest, **kwargs)
        finally:
            timer.shape = "(outside layers)"

    write_seconds = [0.0]
    real_write = extract_module.write_all

    def write_all(*a, **k):
        started = time.thread_time()
        try:
            return real_write(*a, **k)
        finally:
            write_seconds[0] += time.thread_time() - started

    extract_module.compute_step = compute_step
    extract_module.write_all = write_all
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "lora.safetensors"
        cli = ["--base", str(args.base), "--variant", str(args.variant), "--out", str(out), *args.engine_args.split()]
        process0, thread0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
        with timer:
            code = cli_main(cli)
        process, main_thread, wall = (time.process_time() - process0, time.thread_time() - thread0,
                                      time.perf_counter() - wall0)
    torch_total = sum(timer.seconds.values())
    phases = ["widen", "delta", "norm", "matmul", "orth", "small", "other"]
    shapes = sorted({s for s, _ in timer.seconds}, key=lambda s: -sum(v for (x, _), v in timer.seconds.items() if x == s))
    print(f"\nexit {code}; wall {wall:.1f} s, process CPU {process:.1f} s, main thread {main_thread:.1f} s, "
          f"threads {torch.get_num_threads()}")
    print(f"{'shape':>16} {'layers':>6} " + " ".join(f"{p:>7}" for p in phases) + f" {'total':>7}")
    table = []
    for shape in shapes:
        row = [timer.seconds.get((shape, p), 0.0) for p in phases]
        table.append({"shape": shape, "layers": layer_calls.get(shape, 0), **dict(zip(phases, row)), "total": sum(row)})
        print(f"{shape:>16} {layer_calls.get(shape, 0):>6} " + " ".join(f"{x:7.2f}" for x in row) + f" {sum(row):7.2f}")
    totals = {p: sum(r[p] for r in table) for p in phases}
    print(f"{'all':>16} {sum(layer_calls.values()):>6} " + " ".join(f"{totals[p]:7.2f}" for p in phases)
          + f" {torch_total:7.2f}")
    rest = {"read (reader thread)": process - main_thread, "write": write_seconds[0],
            "python and untimed (main thread)": main_thread - torch_total - write_seconds[0]}
    for name, value in rest.items():
        print(f"{name}: {value:.2f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps({"wall_s": wall, "cpu_s": process, "main_thread_s": main_thread,
                                             "threads": torch.get_num_threads(), "shapes": table, "totals": totals,
                                             **rest}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())

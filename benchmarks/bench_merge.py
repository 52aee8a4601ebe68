"""Merging LoRAs from their factors vs the dense route, side by side in one run.

Three rank-32 LoRAs (bf16, kohya Flux names) on ``--modules`` Flux-size modules
(``double_blocks.N.img_mlp.2``: 3072 x 12288), merged exactly (output rank 96 = the sum of
the input ranks, fp32), two ways, each in its own child process so that its peak RSS is
its own:

- factor route: ``lib_ckpt2lora``'s merge (toolbox/merge.py: QR of the stacked ups and
  downs, SVD of the 96 x 96 core), the whole library run (read, merge, write);
- dense route: what kohya's ``svd_merge_lora`` does per module: read the factors,
  materialise the 3072 x 12288 sum, ``torch.linalg.svd``, keep 96, write.

Each child times only its work (imports and process start-up excluded) in CPU seconds
(``time.process_time``: the machine may be shared) and wall seconds, and reports its peak
RSS (``ru_maxrss``) and the RSS after imports. The parent checks that both outputs hold
the same product (relative error) and prints ``uptime`` beside the figures.

    python benchmarks/bench_merge.py [--modules 2] [--work-dir /tmp/bench_merge] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS, COLS, RANK, INPUTS = 3072, 12288, 32, 3
WEIGHTS = (0.5, 1.0, -0.7)


def module_name(index: int) -> str:
    return f"lora_unet_double_blocks_{index}_img_mlp_2"


def write_inputs(folder: Path, modules: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    paths = []
    for i in range(INPUTS):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for m in range(modules):
            name = module_name(m)
            tensors[name + ".lora_down.weight"] = (torch.randn(RANK, COLS, generator=gen) * 0.01).to(torch.bfloat16)
            tensors[name + ".lora_up.weight"] = (torch.randn(ROWS, RANK, generator=gen) * 0.01).to(torch.bfloat16)
            tensors[name + ".alpha"] = torch.tensor(float(RANK))
        path = folder / f"input{i}.safetensors"
        save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})
        paths.append(path)
    return paths


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(route: str, inputs: list[Path], out: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lib_ckpt2lora.toolbox.merge_run import MergeOptions, merge_loras

    rss_after_imports = peak_rss_mb()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if route == "factor":
        specs = [f"{path}:{weight}" for path, weight in zip(inputs, WEIGHTS)]
        opts = MergeOptions(inputs=specs, out=out, rank=RANK * INPUTS, save_dtype="fp32", device="cpu", overwrite=True)
        merge_loras(opts, log=lambda line: None)
    else:
        handles = [safe_open(str(path), "pt") for path in inputs]
        modules = sorted({key.rsplit(".", 2)[0] for key in handles[0].keys() if key.endswith(".lora_down.weight")})
        tensors = {}
        for name in modules:
            total = torch.zeros(ROWS, COLS)
            for handle, weight in zip(handles, WEIGHTS):
                down = handle.get_tensor(name + ".lora_down.weight").float()
                up = handle.get_tensor(name + ".lora_up.weight").float()
                scale = float(handle.get_tensor(name + ".alpha")) / down.shape[0]
                total.addmm_(up, down, alpha=weight * scale)
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            keep = RANK * INPUTS
            root = s[:keep].sqrt()
            tensors[name + ".lora_up.weight"] = (u[:, :keep] * root).contiguous()
            tensors[name + ".lora_down.weight"] = (root[:, None] * vh[:keep]).contiguous()
            tensors[name + ".alpha"] = torch.tensor(float(keep))
            del total, u, s, vh
        save_file(tensors, str(out))
    return {
        "route": route,
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss_after_imports,
    }


def products(path: Path) -> dict:
    from safetensors.torch import load_file

    lora = load_file(str(path))
    out = {}
    for key in lora:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = lora[key].double(), lora[name + ".lora_up.weight"].double()
            out[name] = (up @ down) * (float(lora[name + ".alpha"]) / down.shape[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modules", type=int, default=2, help="Flux-size modules per LoRA (default 2)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_merge"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--child", choices=("factor", "dense"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    inputs = [args.work_dir / f"input{i}.safetensors" for i in range(INPUTS)]
    if args.child:
        print(json.dumps(child(args.child, inputs, args.work_dir / f"{args.child}.safetensors", args.threads)))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    write_inputs(args.work_dir, args.modules)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() if shutil.which("uptime") else "n/a"
    print(f"uptime before: {uptime}; {os.cpu_count()} CPUs; torch threads per child: {args.threads}")
    print(f"{INPUTS} LoRAs of rank {RANK}, {args.modules} modules of {ROWS}x{COLS}, merged exactly (rank {RANK * INPUTS})")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {}
    for route in ("factor", "dense"):
        cmd = [sys.executable, __file__, "--child", route, "--work-dir", str(args.work_dir), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"bench_merge: the {route} route failed:\n{done.stderr[-3000:]}")
        results[route] = json.loads(done.stdout.strip().splitlines()[-1])
    factor, dense = products(args.work_dir / "factor.safetensors"), products(args.work_dir / "dense.safetensors")
    error = max(float((factor[k] - dense[k]).norm() / dense[k].norm()) for k in dense)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() if shutil.which("uptime") else "n/a"
    print(f"{'route':<8}{'CPU s':>10}{'wall s':>10}{'peak RSS MB':>13}{'RSS after imports MB':>22}")
    for route, r in results.items():
        print(f"{route:<8}{r['cpu_s']:>10.2f}{r['wall_s']:>10.2f}{r['peak_rss_mb']:>13.0f}{r['rss_after_imports_mb']:>22.0f}")
    ratio = results["factor"]["cpu_s"] / results["dense"]["cpu_s"]
    print(f"factor / dense CPU seconds: {ratio:.4f}x (goal <= 0.01x); products agree to {error:.2e} (relative, worst module)")
    print(f"uptime after: {uptime_after}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "results": results,
                    "ratio": ratio,
                    "max_relative_difference": error,
                    "uptime": [uptime, uptime_after],
                    "modules": args.modules,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

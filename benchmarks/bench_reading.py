"""How to read tensors portably: speed and peak RSS of the candidate readers.

Each method reads every tensor of one bf16 safetensors file once and widens it to fp32,
as the engine does per layer, in a fresh subprocess (so peak RSS is that method's own):

* ``preadv``   -- the engine's former reader: one ``os.preadv`` per tensor (Unix only)
* ``readinto`` -- the engine's reader now (``TensorFile.get``): ``seek`` + ``readinto``
  under a per-file lock, looping until the tensor is whole (portable)
* ``safe_open`` -- the safetensors library's own reader (memory-maps the file)

Peak RSS is VmHWM (``ru_maxrss`` off Linux); it counts the pages of a memory map that were touched, which
is also how Windows accounts a mapped file to the process.

    python benchmarks/bench_reading.py [--file F | --dir D --gb 3] [--rounds 2]

Without ``--file`` a Z-Image-like file (``[11520, 3840]`` and ``[10240, 3840]`` bf16
tensors) of about ``--gb`` GB is written to ``--dir`` (default: the temp folder) and
deleted afterwards. The page cache is warm for every method (the file was just written
or is read once before timing), so the figures compare the readers, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("preadv", "readinto", "safe_open")
SHAPES = ((11520, 3840), (10240, 3840))  # Z-Image's w1/w3 and fused qkv-sized matrices


def write_file(path: Path, gigabytes: float) -> None:
    """A bf16 safetensors file of about ``gigabytes`` GB in Z-Image-like shapes."""
    sys.path.insert(0, str(ROOT))
    from lib_ckpt2lora.writing import write_streamed

    entries, total, index = [], 0, 0
    while total < gigabytes * 1e9:
        shape = SHAPES[index % 2]
        entries.append((f"layers.{index // 2}.w{index % 2 + 1}.weight", torch.bfloat16, shape))
        total += shape[0] * shape[1] * 2
        index += 1
    noise = torch.randn(SHAPES[0], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def produce(i: int, name: str) -> torch.Tensor:
        rows = entries[i][2][0]
        return (noise[:rows] * (1 + i / 100)).to(torch.bfloat16)

    write_streamed(path, entries, produce, {}, overwrite=True)


def read_all(method: str, path: Path) -> dict[str, float]:
    """Read and widen every tensor once; wall time and peak RSS of this process."""
    sys.path.insert(0, str(ROOT))
    from lib_ckpt2lora.reading import TensorFile

    rss_before = peak_rss_mib()
    start = time.perf_counter()
    count = 0
    checksum = 0.0
    if method == "safe_open":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                widened = handle.get_tensor(key).float()
                checksum += float(widened[0, 0])
                count += widened.numel()
                del widened
    else:
        with TensorFile(path) as file:
            for key in file.keys():
                if method == "preadv":
                    widened = _read_with_preadv(file, key).float()
                else:
                    widened = file.get(key).float()
                checksum += float(widened[0, 0])
                count += widened.numel()
                del widened
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "rss_before_mib": rss_before,
            "gb": count * 2 / 1e9, "checksum": checksum}


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux: VmHWM, since ``ru_maxrss`` of a child started by
    fork + exec can still hold the parent's peak; elsewhere ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _read_with_preadv(file, key: str) -> torch.Tensor:
    """The reader as it was before it became portable: one preadv, no loop."""
    info = file.infos[key]
    begin, end = file._offsets[key]
    tensor = torch.empty(info.shape, dtype=info.dtype)
    buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    got = os.preadv(file._handle.fileno(), [buffer], file._data_start + begin)
    if got != end - begin:
        raise OSError(f"short read at {key}")
    return tensor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, help="an existing bf16 safetensors file to read")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write the test file")
    ap.add_argument("--gb", type=float, default=3.0, help="size of the written test file")
    ap.add_argument("--rounds", type=int, default=2, help="runs per method (alternating)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        torch.set_num_threads(1)  # the widening is memory-bound; one thread, like a busy machine
        print(json.dumps(read_all(args.child, args.file)))
        return 0
    made = args.file is None
    path = args.file or args.dir / "bench_reading.safetensors"
    try:
        if made:
            started = time.perf_counter()
            write_file(path, args.gb)
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")
        methods = [m for m in args.methods.split(",") if m]
        if "preadv" in methods and not hasattr(os, "preadv"):
            methods.remove("preadv")
        results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method in methods:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", method, "--file", str(path)],
                    capture_output=True, text=True, check=True,
                )
                results[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{'method':<10} {'GB read':>8} {'best s':>7} {'GB/s':>6} {'peak RSS MiB':>13} {'(at start)':>11}")
        for method, runs in results.items():
            best = min(runs, key=lambda r: r["seconds"])
            peak = max(r["peak_rss_mib"] for r in runs)
            print(f"{method:<10} {best['gb']:>8.2f} {best['seconds']:>7.2f} {best['gb'] / best['seconds']:>6.2f} "
                  f"{peak:>13.0f} {best['rss_before_mib']:>11.0f}")
    finally:
        if made:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The I/O floor (run (c)): read every tensor pair of both files and subtract, nothing else.

Plain positioned reads into two reused buffers (no mmap, no state dict), conversion to
fp32 and one subtraction per tensor, on --device. No extraction can be faster than this
on the same files and the same page cache.

    python benchmarks/io_floor.py --base B --variant V [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:
    from .stio import PlainReader
except ImportError:  # run as a script
    from stio import PlainReader


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--variant", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    n = 0
    nbytes = 0
    checksum = 0.0
    with PlainReader(args.base) as rb, PlainReader(args.variant) as rv:
        for name, info in rb.infos.items():
            if name not in rv.infos or not info.dtype.is_floating_point:
                continue
            b = rb.get(name).to(device=device, dtype=torch.float32)
            v = rv.get(name).to(device=device, dtype=torch.float32)
            d = v.sub_(b)
            checksum += float(d.view(-1)[0]) if d.numel() else 0.0  # keeps the work observable
            n += 1
            nbytes += 2 * (info.end - info.begin)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"io_floor: {n} tensor pairs, {nbytes / 2**30:.2f} GiB read in {dt:.1f} s ({checksum:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

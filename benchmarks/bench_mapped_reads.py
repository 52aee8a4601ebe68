"""CPU cost of reading a whole safetensors file in the reader's flat chunks, widened to fp32
into one reused buffer as sources.read_deltas does: plain reads (TensorFile.read_values,
what the reader uses) against mapped windows of the file (written here, for the
comparison only: issue 18 measured them and kept plain reads); alternating, one process.

    python benchmarks/bench_mapped_reads.py FILE [--repeats 2] [--window-mb 8]

Prints per mode the process CPU seconds (user + sys) and minor page faults. The file is
read once untimed first, so both modes read from the page cache.
"""

from __future__ import annotations

import argparse
import mmap
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_ckpt2lora import sources  # noqa: E402
from lib_ckpt2lora.reading import TensorFile  # noqa: E402


def read_all(path: Path, out: torch.Tensor, window_bytes: int) -> None:
    """Every 16/32-bit tensor of ``path`` chunk by chunk into ``out``; ``window_bytes``: 0 for
    plain reads, else the size of the mapped windows."""
    with TensorFile(path) as file, open(path, "rb") as handle:
        for key, info in file.infos.items():
            if info.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not info.shape:
                continue
            scratch = torch.empty(sources.ROW_CHUNK_VALUES, dtype=info.dtype)
            item = scratch.element_size()
            window = None
            for begin, end in sources.value_chunks(info.numel):
                if not window_bytes:
                    out[: end - begin].copy_(file.read_values(key, begin, end, scratch))
                    continue
                first = file._data_start + file._offsets[key][0] + begin * item
                count = (end - begin) * item
                if window is None or not (window[0] <= first and first + count <= window[0] + window[1].numel()):
                    start = first - first % mmap.ALLOCATIONGRANULARITY
                    stop = min(file._data_start + file._offsets[key][1], max(first + count, start + window_bytes))
                    mapped = mmap.mmap(handle.fileno(), stop - start, access=mmap.ACCESS_COPY, offset=start)
                    window = (start, torch.frombuffer(mapped, dtype=torch.uint8))
                view = window[1][first - window[0] : first - window[0] + count].view(info.dtype)
                out[: end - begin].copy_(view)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--window-mb", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = torch.zeros(sources.ROW_CHUNK_VALUES)
    read_all(args.file, out, 0)  # into the page cache
    for _ in range(args.repeats):
        for mapped in (False, True):
            before = resource.getrusage(resource.RUSAGE_SELF)
            read_all(args.file, out, args.window_mb << 20 if mapped else 0)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            label = f"mapped {args.window_mb} MB windows" if mapped else "plain reads"
            print(f"{label:>22}: {cpu:.3f} CPU s, {after.ru_minflt - before.ru_minflt} minor faults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
